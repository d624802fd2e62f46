"""``AsyncSandbox``: the asyncio SDK. The sync ``Sandbox`` drives this same code."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import inspect
import os
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, Literal

from moat.errors import (
    CommandExitError,
    InvalidArgumentError,
    NotFoundError,
    SandboxError,
    TimeoutError,
)
from moat.model import (
    CommandResult,
    Context,
    End,
    EntryInfo,
    ErrorEvent,
    Execution,
    ExecutionError,
    Limits,
    Logs,
    Mount,
    Output,
    ProcessInfo,
    Result,
    ResultEvent,
    SandboxInfo,
    SandboxMetrics,
    SnapshotInfo,
)
from moat.model import validate as v
from moat.sdk.pty import AsyncPty
from moat.sdk.transport import CommandEvents, Transport
from moat.sdk.watch import AsyncWatchHandle

if TYPE_CHECKING:  # names of the front door's request vocabulary, for annotations only
    from moat.engine.api import GatewayConfig, GuardPolicy, NetworkPolicy, Secret
    from moat.guard import Guard


def _local() -> Transport:
    """The default transport: this process's engine, as the default tenant (loaded lazily,
    so a program that only uses a remote transport never imports the engine)."""
    from moat.sdk.transport.local import LocalTransport

    return LocalTransport()


def _transport(api_url: str | None, api_key: str | None) -> Transport:
    """A ``moat serve``'s transport when a URL is given (or ``$MOAT_API_URL`` is set), else
    this process's engine."""
    if api_url is not None or api_key is not None or os.environ.get("MOAT_API_URL"):
        from moat.sdk.transport.http import shared

        return shared(api_url, api_key)
    return _local()


def _pick(transport: Transport | None, api_url: str | None, api_key: str | None) -> Transport:
    if transport is None:
        return _transport(api_url, api_key)
    if api_url is not None or api_key is not None:
        raise InvalidArgumentError("give a transport or api_url/api_key, not both")
    return transport


class AsyncCommandHandle:
    """A command started with ``background=True``. Its output is collected as it arrives."""

    def __init__(
        self,
        transport: Transport,
        sandbox_id: str,
        started: CommandEvents,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
    ) -> None:
        self._t = transport
        self._sid = sandbox_id
        self.pid = started.pid
        self._out: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self._task = asyncio.get_running_loop().create_task(self._consume(started))
        # Retrieve a failure even if nobody waits, so it is never reported as lost.
        self._task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _consume(self, started: CommandEvents) -> CommandResult:
        end: End | None = None
        async for event in started.events():
            if isinstance(event, Output):
                self._out[event.stream].append(event.text)
                await _call(self._callbacks[event.stream], event.text)
            elif isinstance(event, End):
                end = event
        if end is None or end.exit_code is None:  # pragma: no cover - the front door ends so
            raise SandboxError("the command ended without an exit code")
        return CommandResult(
            exit_code=end.exit_code,
            stdout=self.stdout,
            stderr=self.stderr,
            truncated=end.truncated,
        )

    async def wait(self, timeout: float | None = None) -> CommandResult:
        """Wait for the command to end; raises CommandExitError on a non-zero exit."""
        if timeout is not None:
            v.number("timeout", timeout, 0.001, 86400)
        try:
            result = await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except builtins.TimeoutError:
            if self._task.done():
                raise
            await self.kill()
            # Let the agent report the end, so the command is gone when we return.
            with contextlib.suppress(builtins.TimeoutError, SandboxError):
                await asyncio.wait_for(asyncio.shield(self._task), 2)
            raise TimeoutError(
                f"command exceeded its {timeout:g}s timeout and was killed"
            ) from None
        return _check_exit(result)

    async def kill(self) -> bool:
        """Kill the command and its process group. False if it had already ended."""
        return await self._t.signal(self._sid, self.pid)

    async def send_stdin(self, data: str | bytes, eof: bool = False) -> None:
        """Write to the command's stdin (started with ``stdin=True``)."""
        await self._t.send_stdin(self._sid, self.pid, _bytes(data), eof)

    @property
    def stdout(self) -> str:
        return "".join(self._out["stdout"])

    @property
    def stderr(self) -> str:
        return "".join(self._out["stderr"])


class AsyncCommands:
    """``sandbox.commands``: shell commands inside the sandbox."""

    def __init__(self, transport: Transport, sandbox_id: str) -> None:
        self._t = transport
        self._sid = sandbox_id

    async def run(
        self,
        cmd: str,
        background: bool = False,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = 60,
        on_stdout: Any = None,
        on_stderr: Any = None,
        stdin: bool | str | bytes | None = None,
        user: str = "user",
    ) -> Any:
        """Run ``cmd`` with bash as ``user`` (``"root"``: uid 0 inside the sandbox, where the
        tier gives it: docs/users.md). Returns a CommandResult, or a handle if
        ``background``."""
        if timeout is not None:
            v.number("timeout", timeout, 0.001, 86400)
        v.callback("on_stdout", on_stdout)
        v.callback("on_stderr", on_stderr)
        if stdin is not None and not isinstance(stdin, (bool, str, bytes)):
            raise InvalidArgumentError("stdin must be True, str or bytes")
        data = None if isinstance(stdin, bool) or stdin is None else _bytes(stdin)
        started = await self._t.start_command(
            self._sid, cmd, envs, cwd, bool(stdin) or data is not None, user
        )
        handle = AsyncCommandHandle(self._t, self._sid, started, on_stdout, on_stderr)
        if data is not None:
            await handle.send_stdin(data, eof=True)
        if background:
            return handle
        return await handle.wait(timeout)

    async def connect(
        self,
        pid: int,
        on_stdout: Any = None,
        on_stderr: Any = None,
    ) -> AsyncCommandHandle:
        """Re-attach to a running command: a handle with its output from now on."""
        v.callback("on_stdout", on_stdout)
        v.callback("on_stderr", on_stderr)
        started = await self._t.connect_command(self._sid, v.pid(pid))
        return AsyncCommandHandle(self._t, self._sid, started, on_stdout, on_stderr)

    async def list(self) -> list[ProcessInfo]:
        return await self._t.list_commands(self._sid)

    async def kill(self, pid: int) -> bool:
        return await self._t.signal(self._sid, v.pid(pid))


class AsyncFiles:
    """``sandbox.files``: the sandbox's filesystem, resolved inside the sandbox."""

    def __init__(self, transport: Transport, sandbox_id: str) -> None:
        self._t = transport
        self._sid = sandbox_id

    async def read(
        self, path: str, format: Literal["text", "bytes"] = "text", user: str = "user"
    ) -> Any:
        """The file's content (guarded by the front door, like all output), read as ``user``
        (every method here takes it: ``"root"`` is uid 0 inside, docs/users.md)."""
        return await self._t.read_file(self._sid, path, format, user)

    async def write(self, path: str, data: str | bytes | IO[Any], user: str = "user") -> EntryInfo:
        return await self._t.write_file(self._sid, path, data, user)

    async def list(self, path: str = ".", depth: int = 1, user: str = "user") -> list[EntryInfo]:
        return await self._t.list_dir(self._sid, path, depth, user)

    async def exists(self, path: str, user: str = "user") -> bool:
        try:
            await self._t.stat(self._sid, path, user)
        except NotFoundError:
            return False
        return True

    async def get_info(self, path: str, user: str = "user") -> EntryInfo:
        return await self._t.stat(self._sid, path, user)

    async def rename(self, old_path: str, new_path: str, user: str = "user") -> EntryInfo:
        """Rename or move a file or directory (parents made); the entry at ``new_path``."""
        return await self._t.move(self._sid, old_path, new_path, user)

    async def remove(self, path: str, user: str = "user") -> None:
        await self._t.remove(self._sid, path, user)

    async def make_dir(self, path: str, user: str = "user") -> bool:
        """Create a directory (and parents). False if it already existed."""
        return await self._t.make_dir(self._sid, path, user)

    async def watch_dir(
        self,
        path: str,
        on_event: Any = None,
        recursive: bool = False,
        *,
        include_entry: bool = False,
        on_exit: Any = None,
        timeout: float | None = None,
    ) -> AsyncWatchHandle:
        """Watch a directory: ``on_event(FilesystemEvent)`` for each create, write, remove,
        rename or chmod (``name`` relative to ``path``; ``entry`` with ``include_entry``), or
        ``get_new_events()`` on the handle without ``on_event``. An ``overflow`` event marks
        lost events. ``on_exit(error or None)`` when it ends; ``timeout`` bounds its life."""
        v.callback("on_event", on_event)
        v.callback("on_exit", on_exit)
        if timeout is not None:
            v.number("timeout", timeout, 0.001, 86400)
        watch = await self._t.watch_dir(self._sid, path, recursive, include_entry)
        return AsyncWatchHandle(watch, on_event, on_exit, timeout)


class AsyncSandbox:
    """A sandbox, used from asyncio. Create it with ``await AsyncSandbox.create(...)``."""

    def __init__(self, transport: Transport, info: SandboxInfo) -> None:
        self._t = transport
        self._id = info.sandbox_id
        self.commands = AsyncCommands(transport, self._id)
        self.files = AsyncFiles(transport, self._id)
        self.pty = AsyncPty(transport, self._id)

    @property
    def sandbox_id(self) -> str:
        return self._id

    @classmethod
    async def create(
        cls,
        template: str = "default",
        isolation: str | None = None,
        trust: str | None = None,
        timeout: float | None = None,
        envs: dict[str, str] | None = None,
        mounts: list[Mount] | None = None,
        limits: Limits | dict[str, Any] | None = None,
        network: NetworkPolicy | dict[str, Any] | None = None,
        secrets: dict[str, Secret] | None = None,
        metadata: dict[str, str] | None = None,
        *,
        allow_internet_access: bool = False,
        gateway_config: GatewayConfig | None = None,
        guard: GuardPolicy | dict[str, Any] | None = None,
        sensitive: list[str] | dict[str, str] | None = None,
        profile: str | None = None,
        policy_file: str | None = None,
        max_output_bytes: int | None = None,
        on_timeout: str = "kill",
        idle_timeout: float | None = None,
        transport: Transport | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
    ) -> AsyncSandbox:
        """Start a sandbox. With ``trust="untrusted"`` (the default) that is a microVM.

        ``isolation`` picks a tier explicitly ("container", "gvisor", "microvm"); a tier this
        host can't run raises IsolationUnavailableError (never a silent downgrade).
        ``network`` opens egress per host (nothing by default; ``allow_internet_access=True``
        opens public hosts on 80/443, never private ranges). ``secrets`` maps an environment
        variable to a ``Secret``: the sandbox sees a placeholder, the gateway swaps in the
        value on requests to the secret's hosts only. ``gateway_config`` tunes the gateway's
        caps (and its ``unsafe_*`` switches, for tests and admins). ``guard`` sets how output
        is scanned (``GuardPolicy(mode="redact"|"block"|"off")``, redact by default) and
        ``sensitive`` adds values (a list, or value -> label) it must never let through.
        ``profile`` names a profile of the policy file (``policy_file`` or
        ``$MOAT_POLICY_FILE``) whose settings apply where the caller gives none (see
        docs/profiles.md). Defaults without a profile: ``trust="untrusted"``, 300 s.
        ``max_output_bytes`` caps what one call may print (default 4 MiB; beyond it the
        output is cut and ``Execution.truncated`` is set). ``transport`` carries the calls
        (default: the engine in this process, as the default tenant). ``api_url`` and
        ``api_key`` (or ``$MOAT_API_URL``/``$MOAT_API_KEY``) send them to a ``moat serve``
        instead, as the key's tenant (docs/server.md: what its policy decides there).
        ``on_timeout="pause"`` pauses it at the end of its lifetime instead of killing it
        (``connect`` resumes it); ``idle_timeout`` applies that end after so many seconds
        without a call, output or traffic (docs/persistence.md).
        """
        transport = _pick(transport, api_url, api_key)
        info = await transport.create(
            template=template,
            isolation=isolation,
            trust=trust,
            timeout=timeout,
            envs=envs,
            mounts=mounts,
            limits=limits,
            network=network,
            secrets=secrets,
            metadata=metadata,
            allow_internet_access=allow_internet_access,
            gateway_config=gateway_config,
            guard=guard,
            sensitive=sensitive,
            profile=profile,
            policy_file=policy_file,
            max_output_bytes=max_output_bytes,
            on_timeout=on_timeout,
            idle_timeout=idle_timeout,
        )
        return cls(transport, info)

    @property
    def guard(self) -> Guard:
        """This sandbox's guard: ``register(value, label)``, ``canary(kind)``."""
        guard: Guard = self._t.guard(self._id)
        return guard

    async def update_network(self, network: NetworkPolicy | dict[str, Any] | None) -> None:
        """Replace the egress policy; open tunnels it no longer allows are closed."""
        await self._t.update_network(self._id, network)

    async def audit(self, denied_only: bool = False, limit: int = 1000) -> list[dict[str, Any]]:
        """This sandbox's audit rows: egress decisions, executions, guard findings."""
        return await self._t.audit(self._id, denied_only, limit)

    async def run_code(
        self,
        code: str,
        language: str | None = None,
        context: Context | str | None = None,
        timeout: float | None = 60,
        envs: dict[str, str] | None = None,
        on_stdout: Any = None,
        on_stderr: Any = None,
        on_result: Any = None,
        on_error: Any = None,
    ) -> Execution:
        """Run code in a persistent context. Errors in the code are on ``Execution.error``.

        ``language``: python (the default), bash, js or ts; with a ``Context`` object and no
        language, the context's own."""
        if language is None:
            language = context.language if isinstance(context, Context) else "python"
        ctx = _context_id(context)
        for name, cb in (
            ("on_stdout", on_stdout),
            ("on_stderr", on_stderr),
            ("on_result", on_result),
            ("on_error", on_error),
        ):
            v.callback(name, cb)
        execution = Execution()
        logs = Logs()
        streams = {"stdout": (logs.stdout, on_stdout), "stderr": (logs.stderr, on_stderr)}
        events = self._t.run_code(self._id, code, language, ctx, timeout, envs)
        async for event in events:
            if isinstance(event, Output):
                chunks, cb = streams[event.stream]
                chunks.append(event.text)
                await _call(cb, event.text)
            elif isinstance(event, ResultEvent):
                execution.results.append(event.result)
                await _call(on_result, event.result)
            elif isinstance(event, ErrorEvent):
                execution.error = event.error
                await _call(on_error, event.error)
            elif isinstance(event, End):
                execution.execution_count = event.execution_count
                execution.truncated = event.truncated
        execution.logs = logs
        return execution

    async def create_code_context(
        self, language: str = "python", cwd: str | None = None
    ) -> Context:
        return await self._t.create_context(self._id, language, cwd)

    async def list_code_contexts(self) -> list[Context]:
        return await self._t.list_contexts(self._id)

    async def restart_code_context(self, context: Context | str) -> None:
        await self._t.restart_context(self._id, _context_id(context))

    async def remove_code_context(self, context: Context | str) -> None:
        await self._t.remove_context(self._id, _context_id(context))

    async def kill(self) -> None:
        """Kill the sandbox; everything in it dies and nothing of it remains."""
        await self._t.kill(self._id)

    async def set_timeout(self, seconds: float) -> None:
        """Give the sandbox ``seconds`` more to live, from now (``0``: its timeout's action,
        kill or pause, runs at once)."""
        await self._t.set_timeout(self._id, seconds)

    async def is_running(self) -> bool:
        try:
            return await self._t.is_running(self._id)
        except NotFoundError:
            return False

    async def get_info(self) -> SandboxInfo:
        return await self._t.info(self._id)

    async def get_metrics(
        self, start: dt.datetime | None = None, end: dt.datetime | None = None
    ) -> list[SandboxMetrics]:
        """Resource samples (CPU, memory, disk) read from the host's kernel every few
        seconds, oldest first, within ``[start, end]`` (timezone-aware datetimes)."""
        return await self._t.metrics(self._id, start, end)

    async def pause(self, memory: bool = True) -> None:
        """Stop the sandbox and keep its state on disk under its id; ``connect`` brings it
        back. ``memory=True`` keeps processes and memory, where the tier can (else
        PolicyError: never a quiet files-only pause); ``memory=False`` keeps the files
        (processes start afresh)."""
        await self._t.pause(self._id, memory)

    async def beta_pause(self, memory: bool = True) -> None:
        """E2B's name for ``pause``."""
        await self.pause(memory)

    async def create_snapshot(
        self, name: str | None = None, memory: bool | None = None
    ) -> SnapshotInfo:
        """Snapshot this sandbox; it keeps running. ``create(template=info.snapshot_id)``
        starts new sandboxes from it. ``memory``: None keeps the most the tier can
        (processes and memory on gVisor and the microVM, files on the container tier)."""
        return await self._t.create_snapshot(self._id, name, memory)

    async def fork(
        self, count: int = 1, timeout: float | None = None
    ) -> builtins.list[AsyncSandbox | SandboxError]:
        """``count`` (1-20) new sandboxes from this one's state now, each with its own id,
        tokens and randomness; an entry is the error that stopped that fork."""
        got = await self._t.fork(self._id, count, timeout)
        return [AsyncSandbox(self._t, g) if isinstance(g, SandboxInfo) else g for g in got]

    @classmethod
    async def list_snapshots(
        cls,
        sandbox_id: str | None = None,
        name: str | None = None,
        *,
        transport: Transport | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
    ) -> builtins.list[SnapshotInfo]:
        """The caller's snapshots (of one sandbox, or with one name), oldest first."""
        return await _pick(transport, api_url, api_key).list_snapshots(sandbox_id, name)

    @classmethod
    async def delete_snapshot(
        cls,
        snapshot_id: str,
        *,
        transport: Transport | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
    ) -> bool:
        """Delete a snapshot and its state on disk; False if there is no such snapshot."""
        return await _pick(transport, api_url, api_key).delete_snapshot(snapshot_id)

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        timeout: float | None = None,
        *,
        secrets: dict[str, str] | None = None,
        transport: Transport | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
    ) -> AsyncSandbox:
        """The sandbox ``sandbox_id``, resumed if it is paused (same id, its files kept).
        ``timeout``: its lifetime from now (a running one's is only extended). After the
        engine's process restarted, a sandbox with secrets needs their values again
        (``secrets``: variable name -> value)."""
        t = _pick(transport, api_url, api_key)
        info = await t.connect(sandbox_id, timeout, secrets)
        return cls(t, info)

    @classmethod
    async def list(
        cls,
        state: str | None = None,
        metadata: dict[str, str] | None = None,
        *,
        transport: Transport | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
    ) -> list[SandboxInfo]:
        """The caller's sandboxes: running and paused ones (``state``: only those)."""
        t = _pick(transport, api_url, api_key)
        if state is not None:
            return await t.list_sandboxes(metadata, state)
        return await t.list_sandboxes(metadata, "running") + await t.list_sandboxes(
            metadata, "paused"
        )

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()


def _context_id(context: Context | str | None) -> str:
    if context is None:
        return "default"
    if isinstance(context, Context):
        return context.id
    return v.context_id(context)


async def _call(callback: Callable[[Any], Any] | None, arg: Any) -> None:
    if callback is not None:
        out = callback(arg)
        if inspect.isawaitable(out):
            await out


def _bytes(data: str | bytes) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, bytes):
        return data
    raise InvalidArgumentError("data must be str or bytes")


def _check_exit(result: CommandResult) -> CommandResult:
    if result.exit_code != 0:
        raise CommandExitError(result.exit_code, result.stdout, result.stderr)
    return result


__all__ = [
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncSandbox",
    "AsyncWatchHandle",
    "Execution",
    "ExecutionError",
    "Result",
    "SandboxError",
]
