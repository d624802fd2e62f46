"""E2B envd's Connect RPC services (``process.Process``, ``filesystem.Filesystem``) over
the front door.

Framing, the JSON codec, envelopes and Connect errors are connectrpc's (the stubs in
``moat.envd`` are generated from moat's ``proto/``). Its ASGI applications sit behind
moat's own admission (``moat.server.sandbox``: the sandbox headers, the access token, the
sandbox is running), which hands the admitted sandbox to the handlers through ``CALLER``.
The handlers are thin: every check and every guard is the front door's (invariants 4, 11).

Users: a call runs as the sandbox's user (``user``, uid 1000, home ``/home/user``) unless it
names ``root`` (E2B's ``user="root"``, sent as ``Authorization: Basic base64("root:")``): then
it runs as uid 0 *inside* the sandbox on the tiers that can give it (gVisor: the sentry's
root; microVM: the guest kernel's; never host root, invariant 9). A tier that cannot
answers ``unimplemented`` naming the tier (moat.engine.users), never quietly running as
``user`` (invariant 7); any other user name is ``invalid_argument``. Directory watches run
as the user only (root is refused).

PTYs are the front door's terminals: ``Start`` with ``pty{size}`` streams
``data.pty`` (guarded bytes), ``SendInput``/``StreamInput`` with ``pty`` bytes type into it,
``Update{pty{size}}`` resizes it, ``SendSignal`` kills its session, ``Connect`` re-attaches.

Directory watches: ``WatchDir`` streams the front door's events (``start``, then ``filesystem``
events and keepalives); the polling form keeps each watch in ``Watchers`` under an id of its
own until RemoveWatcher, the watch's end, or the sandbox's. Lost events (``overflow``) end
either form with ``resource_exhausted``: E2B's event types have no word for them, and a
silent gap is not an option.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import dataclasses
import logging
import posixpath
import shlex
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.codec import proto_json_codec
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Oneof
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from moat.engine.api import CommandStream, FrontDoor, WatchStream
from moat.envd import filesystem_pb as fs
from moat.envd import process_pb as pr
from moat.envd.filesystem_connect import Filesystem, FilesystemASGIApplication
from moat.envd.process_connect import Process, ProcessASGIApplication
from moat.errors import (
    DiskFullError,
    InvalidArgumentError,
    IsolationUnavailableError,
    LeakBlockedError,
    NotFoundError,
    PolicyError,
    QuotaExceededError,
    SandboxDiedError,
    SandboxError,
    TimeoutError,
)
from moat.model import (
    HOME,
    USERS,
    End,
    EntryInfo,
    FilesystemEvent,
    Output,
    PtyOutput,
    PtySize,
    Started,
)
from moat.server.watchers import Watchers

log = logging.getLogger("moat.server")

#: The sandbox user a call runs as unless it names ``root`` (E2B's default user).
DEFAULT_USER = "user"
#: Idle seconds before a keepalive event when the client names no interval (envd's default).
KEEPALIVE_DEFAULT_S = 90.0
#: Wire names (tag, cwd) kept per sandbox before those of ended processes are dropped.
MAX_TRACKED = 1024
#: A request message (SendInput carries stdin): larger ones are refused by connectrpc.
READ_MAX_BYTES = 4 << 20
_SIGNALS = {pr.Signal.SIGKILL: "SIGKILL", pr.Signal.SIGTERM: "SIGTERM"}
_TYPES = {"file": fs.FileType.FILE, "dir": fs.FileType.DIRECTORY, "symlink": fs.FileType.SYMLINK}
_EVENTS = {
    "create": fs.EventType.CREATE, "write": fs.EventType.WRITE, "remove": fs.EventType.REMOVE,
    "rename": fs.EventType.RENAME, "chmod": fs.EventType.CHMOD,
}  # fmt: skip

T = TypeVar("T")


@dataclass
class Caller:
    """The admitted sandbox of this request: set by the admission, read by the handlers."""

    tenant: str
    sandbox_id: str
    procs: dict[int, ProcMeta]
    #: The sandbox ended under a stream: the admission drops the connection instead of
    #: ending the stream, as E2B's edge does (the SDKs then probe /health and say so).
    drop: bool = False


@dataclass
class ProcMeta:
    """What the wire names of a process that the front door does not keep."""

    cwd: str | None
    tag: str | None


CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("moat_rpc_caller")


def _caller(ctx: RequestContext[Any, Any]) -> Caller:
    _user_of(ctx)  # a name moat does not know is refused on every call
    return CALLER.get()


def _user_of(ctx: RequestContext[Any, Any]) -> str:
    """The request's user: ``user`` or ``root`` (the front door checks the tier can)."""
    user = _user(ctx.request_headers.get("authorization"))
    if user not in USERS:
        raise ConnectError(
            Code.INVALID_ARGUMENT,
            f"user {user[:32]!r} is not available: moat knows the users {', '.join(USERS)}",
        )
    return user


def _user_watch(ctx: RequestContext[Any, Any]) -> None:
    """Watches run as the sandbox user: a root one is refused, never quietly downgraded."""
    if _user_of(ctx) != DEFAULT_USER:
        raise ConnectError(Code.UNIMPLEMENTED, "moat watches directories only as the user 'user'")


def _user(header: str | None) -> str:
    """The user named by ``Authorization: Basic base64(user:)``; the default without one."""
    if not header:
        return DEFAULT_USER
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise ConnectError(Code.UNAUTHENTICATED, "unsupported authorization scheme")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise ConnectError(Code.UNAUTHENTICATED, "malformed authorization header") from None
    return decoded.partition(":")[0] or DEFAULT_USER


def connect_error(exc: SandboxError) -> ConnectError:
    """A moat error as the Connect error the SDKs map (message safe: invariant 8)."""
    code = Code.INTERNAL
    if isinstance(exc, InvalidArgumentError):
        code = Code.INVALID_ARGUMENT
    elif isinstance(exc, NotFoundError):
        code = Code.NOT_FOUND
    elif isinstance(exc, LeakBlockedError):
        code = Code.PERMISSION_DENIED
    elif isinstance(exc, PolicyError):
        lacks = "lacks the capability" in str(exc)
        code = Code.UNIMPLEMENTED if lacks else Code.PERMISSION_DENIED
    elif isinstance(exc, QuotaExceededError):
        code = Code.RESOURCE_EXHAUSTED
    elif isinstance(exc, TimeoutError):
        code = Code.DEADLINE_EXCEEDED
    elif isinstance(exc, (SandboxDiedError, IsolationUnavailableError)):
        code = Code.UNAVAILABLE
    elif isinstance(exc, DiskFullError):
        code = Code.RESOURCE_EXHAUSTED
    return ConnectError(code, str(exc))


async def _mapped(work: Awaitable[T]) -> T:
    """``work``'s result; moat errors as Connect errors, anything else as ``internal``."""
    try:
        return await work
    except ConnectError:
        raise
    except SandboxError as exc:
        raise connect_error(exc) from None
    except Exception:  # invariant 8: nothing of the host in the reply
        log.exception("envd rpc")
        raise ConnectError(Code.INTERNAL, "internal error") from None


def _path(raw: str) -> str:
    """A path of the request; relative ones resolve against the user's home."""
    if not raw:
        raise ConnectError(Code.INVALID_ARGUMENT, "path is required")
    return raw if raw.startswith("/") else posixpath.join(HOME, raw)


def _unimplemented(what: str) -> ConnectError:
    return ConnectError(Code.UNIMPLEMENTED, f"{what} is not supported by moat serve yet")


# -- process -------------------------------------------------------------------------------


def command_line(config: pr.ProcessConfig) -> str:
    """The shell command for E2B's ``ProcessConfig``.

    The SDKs send ``/bin/bash -l -c CMD``: CMD is what the front door runs (with bash). Any
    other argv is quoted into one command line, so bash execs exactly that argv.
    """
    args = list(config.args)
    if config.cmd in ("/bin/bash", "bash", "/bin/sh", "sh") and len(args) >= 2:
        flags, rest = args[:-2], args[-2:]
        if rest[0] == "-c" and all(f in ("-l", "--login") for f in flags):
            return rest[1]
    if not config.cmd:
        raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
    return shlex.join([config.cmd, *args])


def _event(event: Oneof[Any, Any]) -> pr.ProcessEvent:
    return pr.ProcessEvent(event=event)


def _end(exit_code: int) -> pr.ProcessEvent:
    return _event(
        Oneof("end", pr.ProcessEvent.EndEvent(
            exit_code=exit_code, exited=True, status=f"exit status {exit_code}",
        ))
    )  # fmt: skip


def _keepalive_s(ctx: RequestContext[Any, Any]) -> float:
    raw = ctx.request_headers.get("keepalive-ping-interval", "")
    if raw.isdigit() and 0 < int(raw) <= 3600:
        return float(raw)
    return KEEPALIVE_DEFAULT_S


def _deadline(ctx: RequestContext[Any, Any]) -> float | None:
    """When ``Connect-Timeout-Ms`` runs out (monotonic); 0 or absent: never."""
    raw = ctx.request_headers.get("connect-timeout-ms", "")
    if not raw.isdigit() or len(raw) > 10 or int(raw) == 0:
        return None
    return time.monotonic() + int(raw) / 1000


async def _stream(
    front: FrontDoor,
    c: Caller,
    handle: CommandStream,
    ctx: RequestContext[Any, Any],
    owner: bool,
) -> AsyncIterator[pr.ProcessEvent]:
    """A command's events as envd's: start, data..., end; keepalives while idle. When the
    call's deadline passes the stream ends with deadline_exceeded, and the command is
    killed if this stream started it (``owner``: Start; a re-attached Connect only leaves).
    A client that leaves only detaches: the command runs on (E2B's background commands)."""
    events = handle.events()
    every = _keepalive_s(ctx)
    deadline = _deadline(ctx)
    pending: asyncio.Future[Any] | None = asyncio.ensure_future(anext(events))
    try:
        while pending is not None:
            wait = every if deadline is None else min(every, deadline - time.monotonic())
            done, _ = await asyncio.wait({pending}, timeout=max(wait, 0))
            if not done:
                if deadline is not None and time.monotonic() >= deadline:
                    if not owner:
                        raise ConnectError(Code.DEADLINE_EXCEEDED, "the call's timeout elapsed")
                    with contextlib.suppress(SandboxError):
                        await front.signal(c.tenant, c.sandbox_id, handle.pid, "SIGKILL")
                    raise ConnectError(
                        Code.DEADLINE_EXCEEDED, "the call's timeout elapsed: the process was killed"
                    )
                yield _event(Oneof("keepalive", pr.ProcessEvent.KeepAlive()))
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                break
            except SandboxError as exc:
                if not await _running(front, c):
                    c.drop = True
                raise connect_error(exc) from None
            pending = None
            if isinstance(event, Started):
                yield _event(Oneof("start", pr.ProcessEvent.StartEvent(pid=event.pid)))
            elif isinstance(event, Output):
                out: Any = Oneof(event.stream, event.text.encode())  # stdout | stderr
                yield _event(Oneof("data", pr.ProcessEvent.DataEvent(output=out)))
            elif isinstance(event, PtyOutput):
                out = Oneof("pty", event.data)
                yield _event(Oneof("data", pr.ProcessEvent.DataEvent(output=out)))
            elif isinstance(event, End):
                c.procs.pop(handle.pid, None)
                yield _end(event.exit_code if event.exit_code is not None else -1)
                break
            pending = asyncio.ensure_future(anext(events))
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        with contextlib.suppress(BaseException):
            await events.aclose()  # type: ignore[attr-defined]


def _pty_size(pty: pr.PTY | None) -> PtySize:
    """The size of E2B's ``PTY`` message (checked by the front door)."""
    size = pty.size if pty is not None else None
    if size is None:
        raise ConnectError(Code.INVALID_ARGUMENT, "pty.size is required")
    return PtySize(cols=size.cols, rows=size.rows)


def _prune(c: Caller, running: set[int]) -> None:
    for pid in [p for p in c.procs if p not in running]:
        del c.procs[pid]


async def _running(front: FrontDoor, c: Caller) -> bool:
    try:
        return await front.is_running(c.tenant, c.sandbox_id)
    except SandboxError:
        return False


class ProcessService(Process):
    """``process.Process`` over the front door's commands."""

    def __init__(self, front: FrontDoor) -> None:
        self.front = front

    def _pid(self, c: Caller, selector: pr.ProcessSelector | None) -> int:
        sel = selector.selector if selector is not None else None
        if sel is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "process (pid or tag) is required")
        if sel.field == "pid":
            pid: int = sel.value
            return pid
        for pid, meta in c.procs.items():
            if meta.tag == sel.value:
                return pid
        raise ConnectError(Code.NOT_FOUND, f"process with tag {str(sel.value)[:64]!r} not found")

    async def start(
        self, request: pr.StartRequest, ctx: RequestContext[pr.StartRequest, pr.StartResponse]
    ) -> AsyncIterator[pr.StartResponse]:
        c, user = _caller(ctx), _user_of(ctx)
        config = request.process or pr.ProcessConfig()
        cmd = command_line(config)
        cwd = _path(config.cwd) if config.has_field("cwd") and config.cwd else None
        # Absent means true (E2B: older SDKs expect an open stdin).
        stdin = request.stdin if request.has_field("stdin") else True
        if request.has_field("pty"):
            handle = await _mapped(
                self.front.start_pty(
                    c.tenant, c.sandbox_id, _pty_size(request.pty),
                    cmd=cmd, envs=dict(config.envs), cwd=cwd, user=user,
                )
            )  # fmt: skip
        else:
            handle = await _mapped(
                self.front.start_command(
                    c.tenant,
                    c.sandbox_id,
                    cmd,
                    envs=dict(config.envs),
                    cwd=cwd,
                    stdin=stdin,
                    user=user,
                )
            )
        tag = request.tag if request.has_field("tag") else None
        if len(c.procs) >= MAX_TRACKED:  # ended unwatched (their streams left): forget them
            running = await _mapped(self.front.list_commands(c.tenant, c.sandbox_id))
            _prune(c, {p.pid for p in running})
        c.procs[handle.pid] = ProcMeta(cwd, tag)
        async for event in _stream(self.front, c, handle, ctx, owner=True):
            yield pr.StartResponse(event=event)

    async def connect(
        self, request: pr.ConnectRequest, ctx: RequestContext[pr.ConnectRequest, pr.ConnectResponse]
    ) -> AsyncIterator[pr.ConnectResponse]:
        c = _caller(ctx)
        pid = self._pid(c, request.process)
        handle = await _mapped(self.front.connect_command(c.tenant, c.sandbox_id, pid))
        async for event in _stream(self.front, c, handle, ctx, owner=False):
            yield pr.ConnectResponse(event=event)

    async def list(
        self, request: pr.ListRequest, ctx: RequestContext[pr.ListRequest, pr.ListResponse]
    ) -> pr.ListResponse:
        c = _caller(ctx)
        procs = await _mapped(self.front.list_commands(c.tenant, c.sandbox_id))
        _prune(c, {p.pid for p in procs})
        out = []
        for p in procs:  # p.cmd has passed the guard (invariant 6)
            meta = c.procs.get(p.pid, ProcMeta(None, None))
            config = pr.ProcessConfig(cmd="/bin/bash", args=["-l", "-c", p.cmd], cwd=meta.cwd)
            out.append(pr.ProcessInfo(config=config, pid=p.pid, tag=meta.tag))
        return pr.ListResponse(processes=out)

    async def send_input(
        self, request: pr.SendInputRequest, ctx: RequestContext[pr.SendInputRequest, Any]
    ) -> pr.SendInputResponse:
        c = _caller(ctx)
        await self._input(c, self._pid(c, request.process), request.input)
        return pr.SendInputResponse()

    async def _input(self, c: Caller, pid: int, given: pr.ProcessInput | None) -> None:
        data = given.input if given is not None else None
        if data is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "input is required")
        if data.field == "pty":
            await _mapped(self.front.send_pty_input(c.tenant, c.sandbox_id, pid, bytes(data.value)))
            return
        await _mapped(self.front.send_stdin(c.tenant, c.sandbox_id, pid, bytes(data.value)))

    async def stream_input(
        self,
        request: AsyncIterator[pr.StreamInputRequest],
        ctx: RequestContext[pr.StreamInputRequest, pr.StreamInputResponse],
    ) -> pr.StreamInputResponse:
        c = _caller(ctx)
        pid: int | None = None
        async for message in request:
            event = message.event
            if event is None or event.field == "keepalive":
                continue
            if event.field == "start":
                pid = self._pid(c, event.value.process)
            elif pid is None:
                raise ConnectError(Code.INVALID_ARGUMENT, "the first message must be start")
            else:
                await self._input(c, pid, event.value.input)
        return pr.StreamInputResponse()

    async def close_stdin(
        self, request: pr.CloseStdinRequest, ctx: RequestContext[pr.CloseStdinRequest, Any]
    ) -> pr.CloseStdinResponse:
        c = _caller(ctx)
        pid = self._pid(c, request.process)
        await _mapped(self.front.close_stdin(c.tenant, c.sandbox_id, pid))
        return pr.CloseStdinResponse()

    async def send_signal(
        self, request: pr.SendSignalRequest, ctx: RequestContext[pr.SendSignalRequest, Any]
    ) -> pr.SendSignalResponse:
        c = _caller(ctx)
        pid = self._pid(c, request.process)
        name = _SIGNALS.get(request.signal)
        if name is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "signal must be SIGKILL or SIGTERM")
        if not await _mapped(self.front.signal(c.tenant, c.sandbox_id, pid, name)):
            raise ConnectError(Code.NOT_FOUND, f"process {pid} not found")
        return pr.SendSignalResponse()

    async def update(
        self, request: pr.UpdateRequest, ctx: RequestContext[pr.UpdateRequest, Any]
    ) -> pr.UpdateResponse:
        c = _caller(ctx)
        pid = self._pid(c, request.process)
        if not request.has_field("pty"):
            raise ConnectError(Code.INVALID_ARGUMENT, "pty (its new size) is required")
        size = _pty_size(request.pty)
        await _mapped(self.front.resize_pty(c.tenant, c.sandbox_id, pid, size))
        return pr.UpdateResponse()


# -- filesystem ----------------------------------------------------------------------------


async def _followed(front: FrontDoor, c: Caller, e: EntryInfo, user: str) -> EntryInfo:
    """A symlink's entry as envd shows it: the type of what it points at and the target's
    absolute path (a dangling or looping link stays a symlink)."""
    if e.type != "symlink" or e.symlink_target is None:
        return e
    target, seen = e, 0
    path = e.path
    while target.type == "symlink" and target.symlink_target is not None and seen < 8:
        path = posixpath.normpath(posixpath.join(posixpath.dirname(path), target.symlink_target))
        try:
            target = await front.stat(c.tenant, c.sandbox_id, path, user=user)
        except NotFoundError:
            return e
        seen += 1
    if target.type == "symlink":
        return e
    return dataclasses.replace(e, type=target.type, symlink_target=path)


def entry_info(e: EntryInfo) -> fs.EntryInfo:
    """The front door's entry (names already guarded, invariant 6) as envd's."""
    seconds = int(e.modified_time.timestamp())
    nanos = round((e.modified_time.timestamp() - seconds) * 1e9) % 1_000_000_000
    return fs.EntryInfo(
        name=e.name,
        type=_TYPES.get(e.type, fs.FileType.UNSPECIFIED),
        path=e.path,
        size=e.size,
        mode=e.mode,
        permissions=e.permissions,
        owner=DEFAULT_USER,
        group=DEFAULT_USER,
        modified_time=Timestamp(seconds=seconds, nanos=nanos),
        symlink_target=e.symlink_target,
        metadata=dict(e.metadata or {}),
    )


class FilesystemService(Filesystem):
    """``filesystem.Filesystem`` over the front door's files."""

    def __init__(self, front: FrontDoor) -> None:
        self.front = front
        self.watchers = Watchers()

    async def stat(
        self, request: fs.StatRequest, ctx: RequestContext[fs.StatRequest, Any]
    ) -> fs.StatResponse:
        c, user = _caller(ctx), _user_of(ctx)
        e = await _mapped(self.front.stat(c.tenant, c.sandbox_id, _path(request.path), user=user))
        return fs.StatResponse(entry=entry_info(await _mapped(_followed(self.front, c, e, user))))

    async def list_dir(
        self, request: fs.ListDirRequest, ctx: RequestContext[fs.ListDirRequest, Any]
    ) -> fs.ListDirResponse:
        c, user = _caller(ctx), _user_of(ctx)
        depth = request.depth or 1
        entries = await _mapped(
            self.front.list_dir(c.tenant, c.sandbox_id, _path(request.path), depth, user=user)
        )
        out = [entry_info(await _mapped(_followed(self.front, c, e, user))) for e in entries]
        return fs.ListDirResponse(entries=out)

    async def make_dir(
        self, request: fs.MakeDirRequest, ctx: RequestContext[fs.MakeDirRequest, Any]
    ) -> fs.MakeDirResponse:
        c, user = _caller(ctx), _user_of(ctx)
        path = _path(request.path)
        if not await _mapped(self.front.make_dir(c.tenant, c.sandbox_id, path, user=user)):
            raise ConnectError(Code.ALREADY_EXISTS, "the directory already exists")
        e = await _mapped(self.front.stat(c.tenant, c.sandbox_id, path, user=user))
        return fs.MakeDirResponse(entry=entry_info(e))

    async def move(
        self, request: fs.MoveRequest, ctx: RequestContext[fs.MoveRequest, Any]
    ) -> fs.MoveResponse:
        c, user = _caller(ctx), _user_of(ctx)
        src, dst = _path(request.source), _path(request.destination)
        e = await _mapped(self.front.move(c.tenant, c.sandbox_id, src, dst, user=user))
        return fs.MoveResponse(entry=entry_info(e))

    async def remove(
        self, request: fs.RemoveRequest, ctx: RequestContext[fs.RemoveRequest, Any]
    ) -> fs.RemoveResponse:
        c, user = _caller(ctx), _user_of(ctx)
        try:
            await _mapped(self.front.remove(c.tenant, c.sandbox_id, _path(request.path), user=user))
        except ConnectError as exc:
            # E2B removes like ``rm -rf``: a missing path is no error; a missing sandbox is.
            if exc.code is not Code.NOT_FOUND or not await _running(self.front, c):
                raise
        return fs.RemoveResponse()

    async def _watch(
        self, c: Caller, path: str, recursive: bool, include_entry: bool
    ) -> WatchStream:
        try:
            return await self.front.watch_dir(
                c.tenant, c.sandbox_id, _path(path), recursive=recursive,
                include_entry=include_entry,
            )  # fmt: skip
        except PolicyError as exc:  # the sandbox's cap on watches
            raise ConnectError(Code.RESOURCE_EXHAUSTED, str(exc)) from None
        except SandboxError as exc:
            raise connect_error(exc) from None

    async def watch_dir(
        self, request: fs.WatchDirRequest, ctx: RequestContext[fs.WatchDirRequest, Any]
    ) -> AsyncIterator[fs.WatchDirResponse]:
        c = _caller(ctx)
        _user_watch(ctx)
        stream = await self._watch(c, request.path, request.recursive, request.include_entry)
        events = stream.events()
        every = _keepalive_s(ctx)
        deadline = _deadline(ctx)  # the SDKs' watch timeout: the stream ends there
        pending: asyncio.Future[Any] | None = None
        try:
            yield _watch_event(Oneof("start", fs.WatchDirResponse.StartEvent()))
            while True:
                pending = pending or asyncio.ensure_future(anext(events))
                wait = every if deadline is None else min(every, deadline - time.monotonic())
                done, _ = await asyncio.wait({pending}, timeout=max(wait, 0))
                if not done:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise ConnectError(Code.DEADLINE_EXCEEDED, "the watch's timeout elapsed")
                    yield _watch_event(Oneof("keepalive", fs.WatchDirResponse.KeepAlive()))
                    continue
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    break
                except SandboxError as exc:
                    if not await _running(self.front, c):
                        c.drop = True
                    raise connect_error(exc) from None
                pending = None
                yield _watch_event(Oneof("filesystem", _fs_event(event)))
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            with contextlib.suppress(BaseException):
                await events.aclose()  # type: ignore[attr-defined]
            with contextlib.suppress(BaseException):
                await stream.stop()

    async def create_watcher(
        self, request: fs.CreateWatcherRequest, ctx: RequestContext[fs.CreateWatcherRequest, Any]
    ) -> fs.CreateWatcherResponse:
        c = _caller(ctx)
        _user_watch(ctx)
        stream = await self._watch(c, request.path, request.recursive, request.include_entry)
        return fs.CreateWatcherResponse(
            watcher_id=self.watchers.add(c.tenant, c.sandbox_id, stream)
        )

    async def get_watcher_events(
        self,
        request: fs.GetWatcherEventsRequest,
        ctx: RequestContext[fs.GetWatcherEventsRequest, Any],
    ) -> fs.GetWatcherEventsResponse:
        c = _caller(ctx)
        stream = self._watcher(c, request.watcher_id)
        try:
            events = await stream.take()
            out = [_fs_event(e) for e in events]
        except (SandboxError, ConnectError) as exc:  # ended with an error, or lost events
            self.watchers.pop(c.tenant, c.sandbox_id, request.watcher_id)
            with contextlib.suppress(SandboxError):
                await stream.stop()
            raise connect_error(exc) if isinstance(exc, SandboxError) else exc from None
        return fs.GetWatcherEventsResponse(events=out)

    async def remove_watcher(
        self, request: fs.RemoveWatcherRequest, ctx: RequestContext[fs.RemoveWatcherRequest, Any]
    ) -> fs.RemoveWatcherResponse:
        c = _caller(ctx)
        stream = self._watcher(c, request.watcher_id)
        self.watchers.pop(c.tenant, c.sandbox_id, request.watcher_id)
        await _mapped(stream.stop())
        return fs.RemoveWatcherResponse()

    def _watcher(self, c: Caller, watcher_id: str) -> WatchStream:
        stream = self.watchers.get(c.tenant, c.sandbox_id, watcher_id)
        if stream is None:  # unknown, removed, or another sandbox's: all alike (invariant 11)
            raise ConnectError(Code.NOT_FOUND, f"watcher {watcher_id[:64]!r} not found")
        return stream


def _watch_event(event: Oneof[Any, Any]) -> fs.WatchDirResponse:
    return fs.WatchDirResponse(event=event)


def _fs_event(e: FilesystemEvent) -> fs.FilesystemEvent:
    """A front-door event (name guarded) as envd's; lost events end the watch, loudly."""
    if e.type == "overflow":
        raise ConnectError(
            Code.RESOURCE_EXHAUSTED,
            "the watch fell behind and events were lost; watch the directory again",
        )
    entry = entry_info(e.entry) if e.entry is not None else None
    return fs.FilesystemEvent(name=e.name, type=_EVENTS[e.type], entry=entry)


ASGI = Callable[[Any, Any, Any], Awaitable[None]]


class _JSONCodec:
    """connectrpc's proto JSON codec, with malformed input as ``invalid_argument``: its own
    lets a JSON or schema error escape as a 500 (connectrpc 0.12.1)."""

    def __init__(self) -> None:
        self._codec = proto_json_codec()

    def name(self) -> str:
        return self._codec.name()

    def encode(self, message: Any) -> bytes:
        return self._codec.encode(message)

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        try:
            return self._codec.decode(data, message_class)
        # JSON syntax (JSONDecodeError), wrong types, bad values, too deep a nesting
        except (ValueError, TypeError, RecursionError, AssertionError, UnicodeDecodeError):
            raise ConnectError(Code.INVALID_ARGUMENT, "malformed request message") from None


def envd_apps(front: FrontDoor) -> dict[str, ASGI]:
    """The two services' ASGI applications by path prefix. JSON codec only (what the SDKs
    speak), no compression, requests capped at ``READ_MAX_BYTES``."""
    codecs = [_JSONCodec()]
    process = ProcessASGIApplication(
        ProcessService(front), read_max_bytes=READ_MAX_BYTES, compressions=(), codecs=codecs
    )
    files = FilesystemASGIApplication(
        FilesystemService(front), read_max_bytes=READ_MAX_BYTES, compressions=(), codecs=codecs
    )
    return {"/process.Process/": process, "/filesystem.Filesystem/": files}
