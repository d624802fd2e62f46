"""Code contexts: kernel processes, their output pumps, interrupt and restart."""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

from moat.agent import shield
from moat.agent.channel import Channel
from moat.agent.cwd import default as default_cwd
from moat.protocol import Decoder, Frame, MsgType, encode

# The agent starts in every sandbox: typing costs ~8 ms of imports, so it is only
# imported for the type checker (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: How long an interrupted cell gets to unwind after SIGINT before its kernel is killed...
INTERRUPT_GRACE = 2.0
#: ...provided the kernel had this much CPU time since the SIGINT (seconds): a starved kernel
#: (a loaded host, a busy sandbox) is not a kernel that ignores interrupts...
INTERRUPT_CPU = 0.25
#: ...and in any case by then: well inside the host's own 5 s (engine INTERRUPT_GRACE), which
#: also covers starting the replacement kernel.
INTERRUPT_HARD = 3.0
#: While the cell still runs, SIGINT is sent again this often: one that arrived before the
#: kernel started the cell's code is dropped there (kernel._on_sigint).
INTERRUPT_REPEAT = 0.5
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _child_setup() -> None:
    """Run in a fresh forked kernel: own session, first in line for the OOM killer."""
    os.setsid()
    oom_first(os.getpid())
    shield.child_setup()


def oom_first(pid: int) -> None:
    """Make ``pid`` the OOM killer's first choice, so a memory bomb kills user code, not us."""
    try:
        fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_WRONLY)
        try:
            os.write(fd, b"1000")
        finally:
            os.close(fd)
    except OSError:
        pass


#: Languages whose kernel is Node (``ts`` is stripped of types first, where Node can).
JS_LANGUAGES = ("js", "ts")
_NODES = ("/usr/bin/node", "/usr/local/bin/node")


def _hold_reseed() -> set[int | signal.Signals]:
    """Block SIGUSR2 (the reseed signal, moat.agent.reseed) in this thread for a kernel's
    fork or spawn; returns the mask to restore. The child inherits the block (across exec
    too) and lifts it once its handler is in (``kernel.serve``): a reseed sent while it
    starts waits for the handler instead of killing it (SIGUSR2's default action), and a
    Node kernel, which has no handler, keeps it blocked."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})


class NoRuntime(Exception):
    """The template lacks what a language's kernel runs on."""


class Kernel:
    """One kernel process with its control pipe and output pipes."""

    def __init__(self, child: shield.Child, ctl_w: int, ctl_r: int, out_r: int, err_r: int) -> None:
        self.pid = child.pid
        self.child = child  # its exit status (as init, the agent's reaper reaps it)
        self.ctl_w, self.ctl_r, self.out_r, self.err_r = ctl_w, ctl_r, out_r, err_r

    @classmethod
    def fork(cls, close: tuple[int, ...] = ()) -> Kernel:
        """Fork a kernel from the (still single-threaded) agent: no interpreter start-up.

        ``close``: the agent's channel fds, which user code must never hold.
        """
        fds = [os.pipe() for _ in range(4)]
        (c_in_r, c_in_w), (c_out_r, c_out_w), (o_r, o_w), (e_r, e_w) = fds
        with shield.spawn_lock:
            mask = _hold_reseed()
            try:
                pid = os.fork()
            except BaseException:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                raise
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                child = shield.own(pid)
        if pid == 0:  # child
            try:
                _child_setup()
                for fd in close:
                    os.close(fd)
                os.close(c_in_w)
                os.close(c_out_r)
                os.close(o_r)
                os.close(e_r)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(o_w, 1)
                os.dup2(e_w, 2)
                os.chdir(default_cwd())
                from moat.agent import kernel

                kernel.serve(c_in_r, c_out_w)
            finally:
                os._exit(1)
        for fd in (c_in_r, c_out_w, o_w, e_w):
            os.close(fd)
        return cls(child, c_in_w, c_out_r, o_r, e_r)

    @classmethod
    def spawn(cls, cwd: str | None, language: str = "python") -> Kernel:
        """Start a new kernel interpreter (used once threads exist, where fork is unsafe).

        ``js``/``ts``: Node running moat's ``jskernel.js`` (the same frames), when the
        sandbox's template has ``node``; else NoRuntime (a FAIL ``unsupported``).
        """
        node = None
        if language in JS_LANGUAGES:
            node = next((n for n in _NODES if os.access(n, os.X_OK)), None)
            if node is None:
                raise NoRuntime("JavaScript needs node in the sandbox's template (not found)")
        c_in_r, c_in_w = os.pipe()
        c_out_r, c_out_w = os.pipe()
        # The user's limit and OOM score come first (no preexec_fn: CPython can vfork).
        boot = (
            f"{shield.user_python_boot()}import sys; sys.path.insert(0, '/opt/moat'); "
            "from moat.agent.kernel import main; main()"
        )
        if node is not None:  # the limits are set by Python, then it becomes Node (execv)
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jskernel.js")
            argv = [node, script, str(c_in_r), str(c_out_w), language]
            boot = f"{shield.user_python_boot()}import os; os.execv({node!r}, {argv!r})"
        import subprocess  # lazily: only extra contexts and restarts spawn

        with shield.spawn_lock:
            mask = _hold_reseed()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", boot, str(c_in_r), str(c_out_w)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    pass_fds=(c_in_r, c_out_w),
                    cwd=cwd or default_cwd(),
                    start_new_session=True,
                    **shield.user_ids(),
                )
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            child = shield.own(proc.pid)
        oom_first(proc.pid)
        os.close(c_in_r)
        os.close(c_out_w)
        assert proc.stdout is not None and proc.stderr is not None
        out_r, err_r = os.dup(proc.stdout.fileno()), os.dup(proc.stderr.fileno())
        proc.stdout.close()
        proc.stderr.close()
        proc.returncode = 0  # so the Popen never reaps (a reused) pid itself: self.child does
        return cls(child, c_in_w, c_out_r, out_r, err_r)

    def close(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for fd in (self.ctl_w, self.ctl_r, self.out_r, self.err_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self.child.wait()


class Context:
    """A named code context; runs one execution at a time."""

    def __init__(self, cid: str, language: str, cwd: str | None, kernel: Kernel) -> None:
        self.id = cid
        self.language = language
        self.cwd = cwd or default_cwd()
        self.kernel = kernel
        self.lock = threading.Lock()
        self.running: int | None = None
        self.restarted = False

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}


class Contexts:
    """All code contexts of this sandbox."""

    def __init__(self, channel: Channel, default_kernel: Kernel | None) -> None:
        self.ch = channel
        self.items: dict[str, Context] = {}
        self.defaults: dict[str, Context] = {}  # js/ts: the "default" context of each
        self.mu = threading.Lock()
        if default_kernel is not None:
            self.items["default"] = Context("default", "python", None, default_kernel)

    def get(self, cid: str) -> Context | None:
        with self.mu:
            return self.items.get(cid)

    def create(self, language: str, cwd: str | None) -> Context:
        cid = os.urandom(6).hex()
        ctx = Context(cid, language, cwd, Kernel.spawn(cwd, language))
        with self.mu:
            self.items[cid] = ctx
        return ctx

    def ensure_default(self) -> Context:
        with self.mu:
            ctx = self.items.get("default")
        if ctx is None:
            ctx = Context("default", "python", None, Kernel.spawn(None))
            with self.mu:
                self.items["default"] = ctx
        return ctx

    def default_for(self, language: str) -> Context:
        """The unnamed context of a non-Python language (not listed, made on first use)."""
        with self.mu:
            ctx = self.defaults.get(language)
        if ctx is None:
            ctx = Context("default", language, None, Kernel.spawn(None, language))
            with self.mu:
                self.defaults[language] = ctx
        return ctx

    def restart(self, ctx: Context) -> None:
        old = ctx.kernel
        ctx.kernel = Kernel.spawn(ctx.cwd, ctx.language)
        old.close()

    def remove(self, cid: str) -> bool:
        with self.mu:
            ctx = self.items.pop(cid, None)
        if ctx is None:
            return False
        ctx.kernel.close()
        return True

    def interrupt(self, rid: int) -> bool:
        """Interrupt the execution ``rid`` wherever it runs; kill and restart if it won't stop.

        SIGINT goes to the kernel's process group, again every INTERRUPT_REPEAT seconds while
        the cell runs. The kernel is killed (and restarted) after INTERRUPT_GRACE once it has
        had INTERRUPT_CPU of CPU since the interrupt (it had its chance and did not stop), or
        at INTERRUPT_HARD regardless: a kernel slow only because the host is loaded keeps
        its state.
        """
        with self.mu:
            every = [*self.items.values(), *self.defaults.values()]
            ctx = next((c for c in every if c.running == rid), None)
        if ctx is None:
            return False
        kernel = ctx.kernel
        try:
            os.killpg(kernel.pid, signal.SIGINT)
        except (ProcessLookupError, PermissionError):
            pass

        def escalate() -> None:
            start = time.monotonic()
            cpu0 = _cpu_seconds(kernel.pid)
            repeat = start + INTERRUPT_REPEAT
            while True:
                time.sleep(0.02)
                if ctx.running != rid:
                    return
                now = time.monotonic()
                if now - start >= INTERRUPT_HARD:
                    break
                if (
                    now - start >= INTERRUPT_GRACE
                    and _cpu_seconds(kernel.pid) - cpu0 >= INTERRUPT_CPU
                ):
                    break
                if now >= repeat:
                    repeat = now + INTERRUPT_REPEAT
                    try:
                        os.killpg(kernel.pid, signal.SIGINT)
                    except (ProcessLookupError, PermissionError):
                        pass
            if ctx.running == rid and ctx.kernel is kernel:
                ctx.restarted = True
                try:
                    os.killpg(kernel.pid, signal.SIGKILL)  # the pump sees EOF and restarts
                except (ProcessLookupError, PermissionError):
                    pass

        threading.Thread(target=escalate, daemon=True).start()
        return True

    def execute(self, rid: int, ctx: Context, code: str, envs: dict[str, str]) -> None:
        """Run one cell (python) and stream its output; blocks until done."""
        with ctx.lock:
            ctx.running = rid
            ctx.restarted = False
            restarted = True
            try:
                restarted = self._execute(rid, ctx, code, envs)
            finally:
                # Free the context before DONE goes out: the host may send the next cell at once.
                ctx.running = None
                self.ch.done(rid, restarted=restarted)

    def _execute(self, rid: int, ctx: Context, code: str, envs: dict[str, str]) -> bool:
        """Run the cell; return whether the context had to be restarted."""
        k = ctx.kernel
        try:
            _write_all(
                k.ctl_w,
                encode(
                    Frame(
                        MsgType.EXEC,
                        rid,
                        {"context": ctx.id, "language": "python", "code": code, "envs": envs},
                    )
                ),
            )
        except OSError:
            return self._died(rid, ctx, "the code context had died; it was restarted")
        decoder = Decoder()
        fds = [k.ctl_r, k.out_r, k.err_r]
        while True:
            ready, _, _ = select.select(fds, [], [])
            for fd in (k.out_r, k.err_r):  # output first: it was written before DONE
                if fd in ready and not self._pump(rid, fd, k):
                    fds.remove(fd)  # EOF: the kernel is going away; ctl_r will tell
            if k.ctl_r in ready:
                data = os.read(k.ctl_r, 1 << 20)
                if not data:
                    self._drain(rid, k)
                    return self._died(
                        rid,
                        ctx,
                        "the code context died (killed or out of memory); it was restarted",
                    )
                for frame in decoder.feed(data):
                    if frame.type is MsgType.DONE:
                        self._drain(rid, k)
                        return False
                    self.ch.send(frame.type, rid, **frame.fields)

    def _pump(self, rid: int, fd: int, k: Kernel) -> bool:
        data = os.read(fd, 1 << 16)
        if data:
            self.ch.send_stream(MsgType.STDOUT if fd == k.out_r else MsgType.STDERR, rid, data)
        return bool(data)

    def _drain(self, rid: int, k: Kernel) -> None:
        for fd in (k.out_r, k.err_r):
            while select.select([fd], [], [], 0)[0]:
                if not self._pump(rid, fd, k):
                    break

    def _died(self, rid: int, ctx: Context, why: str) -> bool:
        interrupted = ctx.restarted
        self.restart(ctx)
        if interrupted:
            self.ch.send(
                MsgType.ERROR,
                rid,
                name="TimeoutError",
                value="execution interrupted and its context restarted",
                traceback="",
            )
        else:
            self.ch.send(MsgType.ERROR, rid, name="ContextDied", value=why, traceback="")
        return True


def _cpu_seconds(pid: int) -> float:
    """CPU time ``pid`` has used (user + system); 0 when it cannot be read (gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


RunShell = Callable[[int, str, dict[str, str], str], None]
