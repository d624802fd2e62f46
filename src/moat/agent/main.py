"""Agent entry point: read frames from the host, dispatch, answer.

Started as the sandbox's first process with ``moat.runtime.agentdir.agent_argv``. Speaks on
stdin/stdout, or on ``--channel DEVICE`` (a virtio serial port in a microVM).
"""

from __future__ import annotations

import os
import select
import sys
import threading
from collections.abc import Callable

from moat.agent import shield
from moat.agent.channel import Channel
from moat.agent.commands import Commands
from moat.agent.contexts import JS_LANGUAGES, Context, Contexts, Kernel, NoRuntime
from moat.agent.cwd import default as default_cwd
from moat.agent.cwd import set_default as set_default_cwd
from moat.agent.files import FileError, Files
from moat.agent.netproxy import NetProxy
from moat.agent.reseed import reseed
from moat.agent.watch import Watches
from moat.protocol import (
    HOST_TO_AGENT,
    PROTOCOL_VERSION,
    Decoder,
    Frame,
    MsgType,
    ProtocolError,
    encode,
    resume,
)

# The agent starts in every sandbox: typing costs ~8 ms of imports, so it is only
# imported for the type checker (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


#: File operations before which recursive watches take in pending events (Watches.settle).
_SETTLE = frozenset({MsgType.FILE_WRITE, MsgType.FILE_MKDIR, MsgType.FILE_MOVE})


class Agent:
    def __init__(
        self, in_fd: int, out_fd: int, default_kernel: Kernel | None, resume_fd: int | None = None
    ) -> None:
        self.in_fd = in_fd
        #: restore notices from guest root (microVM only; moat.guest.boot.serve_ctl)
        self.resume_fd = resume_fd
        self.ch = Channel(out_fd)
        self.contexts = Contexts(self.ch, default_kernel)
        self.commands = Commands(self.ch)
        self.files = Files(self.ch)
        self.net = NetProxy(self.ch)
        self.watches = Watches(self.ch)

    def serve(self) -> None:
        self.ch.send(MsgType.READY, 0, version=PROTOCOL_VERSION, pid=os.getpid())
        decoder = Decoder(direction=HOST_TO_AGENT)
        poller = None
        if self.resume_fd is not None:
            poller = select.poll()
            poller.register(self.in_fd, select.POLLIN)
            poller.register(self.resume_fd, select.POLLIN)
        while True:
            if poller is not None:
                ready = [fd for fd, _ in poller.poll()]
                if self.resume_fd in ready:
                    if not self._resumed():
                        poller.unregister(self.resume_fd)
                    decoder = Decoder(direction=HOST_TO_AGENT)
                    continue
            data = os.read(self.in_fd, 1 << 20)
            if not data:
                break
            try:
                frames = decoder.feed(data)
            except ProtocolError:
                break  # the host never sends garbage; a broken stream ends the agent
            for frame in frames:
                if self.ch.held and frame.type is not MsgType.RESUME:
                    continue  # quiesced: the host sends nothing before its RESUME
                self.dispatch(frame)
        self.commands.kill_all()
        os._exit(0)

    def _resumed(self) -> bool:
        """The microVM was restored from a checkpoint: start over with the new host (the
        nonce comes from guest root). Returns False once guest root's end is closed."""
        notice = os.read(self.resume_fd, 256) if self.resume_fd is not None else b""
        if not notice:
            return False
        nonce = notice.splitlines()[-1].decode("ascii", "replace")
        self._start_over(nonce, b"", drain_input=True)
        return True

    def _start_over(self, nonce: str, seed: bytes, *, drain_input: bool) -> None:
        """Start over with a new host (a restore): what the old host sent and this agent
        has not read yet is dropped (``drain_input``: it may end mid-frame), nothing meant
        for the old host reaches the new one (the channel is muted meanwhile: requests of
        the old host no longer get output, streams and watches end, half-written files are
        closed), and the new host learns where its stream starts (moat.protocol.resume).
        """
        self.ch.unhold(mute=True)  # writers waiting since a QUIESCE drop their frames
        self.commands.detach()
        self.watches.stop_all()
        self.files.drop_writes()
        self.net.drop_streams(wait=2.0)
        if seed:
            self._reseed(seed)
        ready = encode(Frame(MsgType.READY, 0, {"version": PROTOCOL_VERSION, "pid": os.getpid()}))
        with self.ch.lock:  # between two whole frames; no other thread writes meanwhile
            if drain_input:
                os.set_blocking(self.in_fd, False)  # the same open file as out_fd: locked
                try:
                    while os.read(self.in_fd, 1 << 20):
                        pass
                except BlockingIOError:
                    pass
                finally:
                    os.set_blocking(self.in_fd, True)
            self.ch.write_locked(resume.line(nonce) + ready)
            self.ch.muted = False

    def _resume(self, f: Frame) -> None:
        """The end of a QUIESCE: the same host goes on, or (``nonce``) a restore's new one.
        gVisor's new stdin starts with this frame, so there is nothing to drop there."""
        nonce = f.fields.get("nonce")
        if nonce is None or not resume.valid_nonce(nonce):
            self.ch.unhold()
            return
        self._start_over(nonce, f.payload, drain_input=False)

    def _reseed(self, seed: bytes) -> None:
        with self.contexts.mu:
            every = [*self.contexts.items.values(), *self.contexts.defaults.values()]
            # Python kernels only: a JS kernel's Math.random is the OS's CSPRNG
            pids = [c.kernel.pid for c in every if c.language not in JS_LANGUAGES]
        reseed(seed, pids)

    def _in_thread(self, rid: int, fn: Callable[[], None]) -> None:
        def run() -> None:
            try:
                fn()
            except FileError as err:
                self.ch.fail(rid, err.kind, str(err))
            except Exception as exc:  # noqa: BLE001 - report, never die silently
                self.ch.fail(rid, "internal", f"{type(exc).__name__}: {exc}")

        threading.Thread(target=run, daemon=True).start()

    def dispatch(self, f: Frame) -> None:
        rid, t, a = f.id, f.type, f.fields
        root = bool(a.get("root"))

        def as_user(fn: Callable[..., Any], *args: Any) -> Any:
            """``fn(*args)`` as the request's user (root: in a child, moat.agent.rootops)."""
            if not root:
                return fn(*args)
            from moat.agent import rootops

            return rootops.run(fn, *args)

        try:
            if t in _SETTLE and self.watches.items:
                self.watches.settle()
            if t is MsgType.TCP_DATA or t is MsgType.TCP_EOF or t is MsgType.TCP_CLOSE:
                self.net.on_frame(t, rid, f.payload)
            elif t is MsgType.TCP_ACK or t is MsgType.TCP_DIAL:
                self.net.on_frame(t, rid, b"", n=a["n"] if t is MsgType.TCP_ACK else a["port"])
            elif t is MsgType.PING:
                self.ch.done(rid)
            elif t is MsgType.RESEED:
                self._reseed(f.payload)
                self.ch.done(rid)
            elif t is MsgType.QUIESCE:
                # Before a checkpoint: acknowledged at a frame boundary (no frame of another
                # thread is half-written), and nothing more goes out until RESUME.
                self.ch.hold(encode(Frame(MsgType.DONE, rid, {})))
            elif t is MsgType.RESUME:
                self._resume(f)
            elif t is MsgType.NET_SETUP:
                self.net.setup(a["port"], a["ca_path"], f.payload)
                self.ch.done(rid)
            elif t is MsgType.EXEC:
                self._exec(f)
            elif t is MsgType.INTERRUPT:
                target = a["target"]
                ok = self.contexts.interrupt(target) or self.commands.interrupt(target)
                self.ch.done(rid, interrupted=ok)
            elif t is MsgType.CTX_CREATE:
                lang = a["language"]
                if lang not in ("python", "bash", *JS_LANGUAGES):
                    self.ch.fail(rid, "invalid", "unsupported language")
                    return
                cwd = a.get("cwd")

                def create() -> None:
                    try:
                        ctx = self.contexts.create(lang, cwd)
                    except NoRuntime as exc:
                        self.ch.fail(rid, "unsupported", str(exc))
                        return
                    except OSError as exc:  # the caller's cwd: bad input, not a fault
                        why = exc.strerror or type(exc).__name__
                        self.ch.fail(rid, "invalid", f"cwd {str(cwd)[:256]!r}: {why}")
                        return
                    self.ch.done(rid, **ctx.info())

                self._in_thread(rid, create)
            elif t is MsgType.CTX_LIST:
                with self.contexts.mu:
                    items = [c.info() for c in self.contexts.items.values()]
                self.ch.done(rid, contexts=items)
            elif t is MsgType.CTX_RESTART:
                ctx = self.contexts.get(a["context"])
                if ctx is None:
                    self.ch.fail(rid, "not_found", "no such context")
                    return

                def restart() -> None:
                    self.contexts.restart(ctx)
                    self.ch.done(rid)

                self._in_thread(rid, restart)
            elif t is MsgType.CTX_REMOVE:
                cid = a["context"]
                self._in_thread(
                    rid,
                    lambda: (
                        self.ch.done(rid)
                        if self.contexts.remove(cid)
                        else self.ch.fail(rid, "not_found", "no such context")
                    ),
                )
            elif t is MsgType.CMD_START:
                size = (a["cols"], a["rows"]) if "cols" in a else None
                self.commands.start(
                    rid, a["cmd"], a.get("envs") or {}, a.get("cwd"), bool(a.get("stdin")),
                    size=size, root=root,
                )  # fmt: skip
            elif t is MsgType.CMD_RESIZE:
                if self.commands.resize(a["pid"], a["cols"], a["rows"]):
                    self.ch.done(rid)
                else:
                    self.ch.fail(rid, "not_found", "no such terminal")
            elif t is MsgType.CMD_STDIN:
                if self.commands.stdin(a["pid"], f.payload, bool(a.get("eof"))):
                    self.ch.done(rid)
                else:
                    self.ch.fail(rid, "not_found", "no such process or its stdin is closed")
            elif t is MsgType.CMD_KILL:
                if self.commands.kill(a["pid"], a.get("signal", 9)):
                    self.ch.done(rid)
                else:
                    self.ch.fail(rid, "not_found", "no such process")
            elif t is MsgType.CMD_CONNECT:
                self.commands.connect(rid, a["pid"])
            elif t is MsgType.CMD_LIST:
                self.ch.done(rid, processes=self.commands.list())
            elif t is MsgType.FILE_READ:
                self._in_thread(rid, lambda: self.files.read(rid, a["path"], a["max_bytes"], root))
            elif t is MsgType.FILE_WRITE:
                self.files.write_open(rid, a["path"], a["max_bytes"], a.get("metadata"), root)
            elif t is MsgType.FILE_CHUNK:
                self.files.write_chunk(rid, f.payload, bool(a.get("eof")))
            elif t is MsgType.FILE_LIST:
                self._in_thread(
                    rid,
                    lambda: self.ch.done(
                        rid, entries=as_user(self.files.list, a["path"], a.get("depth", 1))
                    ),
                )
            elif t is MsgType.FILE_STAT:
                self.ch.done(rid, **as_user(self.files.stat, a["path"]))
            elif t is MsgType.FILE_REMOVE:

                def remove() -> None:
                    as_user(self.files.remove, a["path"])
                    self.ch.done(rid)

                self._in_thread(rid, remove)
            elif t is MsgType.FILE_MKDIR:
                self.ch.done(rid, created=as_user(self.files.mkdir, a["path"]))
            elif t is MsgType.FILE_MOVE:
                self._in_thread(
                    rid, lambda: self.ch.done(rid, **as_user(self.files.move, a["path"], a["dst"]))
                )
            elif t is MsgType.WATCH_START:  # a large tree takes a while to walk: a thread
                self._in_thread(
                    rid, lambda: self.watches.start(rid, a["path"], bool(a.get("recursive")))
                )
            elif t is MsgType.WATCH_STOP:
                if self.watches.stop(a["target"]):
                    self.ch.done(rid)
                else:
                    self.ch.fail(rid, "not_found", "no such watch")
            elif t is MsgType.WATCH_FLUSH:
                if self.watches.flush(a["target"]):
                    self.ch.done(rid)
                else:
                    self.ch.fail(rid, "not_found", "no such watch")
        except FileError as err:
            self.ch.fail(rid, err.kind, str(err))
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the agent
            self.ch.fail(rid, "internal", f"{type(exc).__name__}: {exc}")

    def _exec(self, f: Frame) -> None:
        rid, a = f.id, f.fields
        envs: dict[str, str] = a.get("envs") or {}
        if a["language"] == "bash":
            cwd = None
            ctx = self.contexts.get(a["context"])
            if ctx is not None:
                cwd = ctx.cwd
            self.commands.start(rid, a["code"], envs, cwd, stdin=False, as_exec=True)
            return
        lang = a["language"]
        if lang not in ("python", *JS_LANGUAGES):
            self.ch.fail(rid, "invalid", "unsupported language")
            return
        threading.Thread(target=self._run_cell, args=(f, lang), daemon=True).start()

    def _run_cell(self, f: Frame, lang: str) -> None:
        """Find (or make) the cell's context, then run it there (a thread of its own: a
        kernel's start may take a moment)."""
        rid, a = f.id, f.fields
        envs: dict[str, str] = a.get("envs") or {}
        cid = a["context"]
        try:
            if cid == "default" and lang != "python":
                ctx: Context | None = self.contexts.default_for(lang)
            else:
                ctx = self.contexts.get(cid)
                if ctx is None and cid == "default":
                    ctx = self.contexts.ensure_default()
        except NoRuntime as exc:
            self.ch.fail(rid, "unsupported", str(exc))
            return
        if ctx is None:
            self.ch.fail(rid, "not_found", "no such context")
            return
        if ctx.language != lang:
            self.ch.fail(rid, "invalid", "context language mismatch")
            return
        if ctx.running is not None:
            self.ch.fail(rid, "busy", "the context is already running code")
            return
        self.contexts.execute(rid, ctx, a["code"], envs)


def _parse_args(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"channel": None, "workdir": None, "resume_fd": None}
    opts["split_root"] = False
    for flag, value in zip(argv[::2], argv[1::2], strict=False):
        if flag in ("--channel", "--workdir"):
            opts[flag[2:]] = value
        elif flag == "--split-root":
            opts["split_root"] = value == "1"
        elif flag == "--resume-fd" and value.isdigit():
            opts["resume_fd"] = int(value)
    return opts


def main() -> None:
    # Every tier starts the agent as its pid namespace's init, non-dumpable: user code can
    # neither signal it nor read or write its memory and fds (see moat.agent.shield).
    opts = _parse_args(sys.argv[1:])
    shield.harden(split_root=opts["split_root"])
    if opts["channel"]:
        fd = os.open(opts["channel"], os.O_RDWR | os.O_NOCTTY)
        in_fd, out_fd = fd, os.dup(fd)
    else:
        # Keep the protocol on private fds; fds 0 and 1 become /dev/null so that nothing a
        # child inherits can write into (or read from) the host channel by accident.
        in_fd, out_fd = os.dup(0), os.dup(1)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
    resume_fd = opts["resume_fd"]
    for fd in (in_fd, out_fd) + ((resume_fd,) if resume_fd is not None else ()):
        os.set_inheritable(fd, False)
    if opts["workdir"]:
        set_default_cwd(opts["workdir"])
    os.chdir(default_cwd())
    # Fork the default context's kernel now, while the agent is single-threaded: the first
    # run_code then costs no interpreter start-up.
    kernel = Kernel.fork(close=(in_fd, out_fd) + ((resume_fd,) if resume_fd is not None else ()))
    if os.getpid() == 1:
        shield.start_reaper()
    Agent(in_fd, out_fd, kernel, resume_fd).serve()


if __name__ == "__main__":
    main()
