"""Commands: shell snippets in their own process groups, streamed, with stdin and kill."""

from __future__ import annotations

import collections
import os
import select
import signal
import threading
import time

from moat.agent import pty, shield
from moat.agent.channel import Channel
from moat.agent.contexts import oom_first
from moat.agent.cwd import default as default_cwd
from moat.agent.files import FileError
from moat.protocol import MsgType

# The agent starts in every sandbox: typing costs ~8 ms of imports, so it is only
# imported for the type checker (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from typing import Any


#: Most requests re-attached to one command at a time.
MAX_WATCHERS = 16


class Command:
    def __init__(
        self, proc: subprocess.Popen[bytes], child: shield.Child, cmd: str, rid: int, as_exec: bool
    ) -> None:
        self.proc = proc
        #: its exit status (never proc.wait/poll: as init the agent's reaper reaps it)
        self.child = child
        self.cmd = cmd
        self.rid = rid
        #: a bash run_code cell: report a non-zero exit as an execution error, not a status
        self.as_exec = as_exec
        self.started = time.time()
        #: requests re-attached to this command (cmd_connect): its output from then on
        self.watchers: list[int] = []
        #: held while output goes out to this command's requests and while a restore detaches
        #: them: a frame for an old host's request never follows the resume announcement
        self.send_lock = threading.Lock()
        #: a PTY command: the master side (the agent's), and input the master has not taken
        self.master: int | None = None
        self.pending = bytearray()
        self.is_pty = False
        #: the slave, kept where the agent raises the terminal's signals (pty.kernel_signals)
        self.slave: int | None = None
        #: a pipe command's input not yet written: its own thread writes it (a command that
        #: does not read must never block the agent's dispatch), None in the queue is EOF
        self.feed_cv = threading.Condition()
        self.feed_q: collections.deque[bytes | None] = collections.deque()
        self.feed_bytes = 0
        self.feed_done = False  # EOF asked for, or the pipe broke: no more input
        self.feeder: threading.Thread | None = None

    def feed(self, data: bytes, eof: bool) -> bool:
        """Queue input for the command's stdin (bounded); False once its stdin is closed."""
        with self.feed_cv:
            if self.feed_done or self.proc.stdin is None:
                return False
            if self.feed_bytes + len(data) > pty.MAX_PENDING:
                raise FileError("busy", "the command is not reading its input")
            if data:
                self.feed_q.append(data)
                self.feed_bytes += len(data)
            if eof:
                self.feed_q.append(None)
                self.feed_done = True
            if self.feeder is None:
                # its own descriptor: a close of proc.stdin elsewhere never pulls the number
                # from under a write in progress
                fd = os.dup(self.proc.stdin.fileno())
                self.feeder = threading.Thread(target=self._feed_loop, args=(fd,), daemon=True)
                self.feeder.start()
            self.feed_cv.notify()
        return True

    def _feed_loop(self, fd: int) -> None:
        try:
            while True:
                with self.feed_cv:
                    while not self.feed_q:
                        self.feed_cv.wait()
                    item = self.feed_q.popleft()
                if item is None:
                    return
                view = memoryview(item)
                while view:
                    view = view[os.write(fd, view) :]
                with self.feed_cv:
                    self.feed_bytes -= len(item)
        except OSError:  # EPIPE: the command is gone or closed its input
            with self.feed_cv:
                self.feed_done = True
                self.feed_q.clear()
                self.feed_bytes = 0
        finally:
            os.close(fd)
            if self.proc.stdin is not None:
                try:
                    self.proc.stdin.close()  # EOF for the command (with our copy closed)
                except OSError:
                    pass


class Commands:
    def __init__(self, channel: Channel) -> None:
        self.ch = channel
        self.items: dict[int, Command] = {}
        self.mu = threading.Lock()
        self.shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
        #: process groups of commands whose shell has exited: children may live on in them
        #: (a server started with `&`), and kill(pid) must still reach them
        self.groups: set[int] = set()
        #: sessions of PTY commands (live or ended): kill(pid) signals the whole session
        self.sessions: set[int] = set()

    def start(
        self,
        rid: int,
        cmd: str,
        envs: dict[str, str],
        cwd: str | None,
        stdin: bool,
        as_exec: bool = False,
        size: tuple[int, int] | None = None,
        root: bool = False,
    ) -> None:
        """Start ``cmd``; with ``size`` (cols, rows) on a new pseudo-terminal (moat.agent.pty);
        with ``root`` as root of the sandbox (moat.agent.shield.root_limits)."""
        if root and not shield.can_root():
            self.ch.fail(rid, "unsupported", "this sandbox cannot run commands as root")
            return
        env = dict(os.environ)
        env.update(envs)
        workdir = cwd or default_cwd()
        if not os.path.isdir(workdir):
            self.ch.fail(rid, "not_found", "working directory does not exist")
            return
        import subprocess  # here, not at start-up: the first command pays for it

        master = slave = None
        argv, user = shield.user_shell(self.shell, cmd, env, root)
        try:
            if size is not None:
                master, slave = pty.open_pair(*size)
                fds: tuple[Any, Any, Any] = (slave, slave, slave)
                # A terminal takes the fork path: its child makes the slave its controlling
                # terminal (TIOCSCTTY) and applies the user's uid and limits itself.
                # Its OOM score, as on the fork path of user_shell: the shell sets it.
                setup = pty.root_child_setup if root else pty.child_setup
                argv = [self.shell, "-c", f"{shield.OOM_FIRST_SH}; {cmd}"]
                user = {"preexec_fn": setup}
            else:
                fds = (
                    subprocess.PIPE if stdin else subprocess.DEVNULL,
                    subprocess.PIPE,
                    subprocess.PIPE,
                )
            with shield.spawn_lock:
                proc = subprocess.Popen(
                    argv,
                    stdin=fds[0],
                    stdout=fds[1],
                    stderr=fds[2],
                    cwd=workdir,
                    env=env,
                    start_new_session=True,
                    **user,  # the user's uid and limits (see shield.user_shell)
                )
                child = shield.own(proc.pid)
        except OSError as exc:
            _close(master, slave)
            self.ch.fail(rid, "io", f"could not start the command: {exc.strerror}")
            return
        if slave is not None and pty.kernel_signals():
            os.close(slave)  # the command holds it; EIO on the master once it is gone
            slave = None
        oom_first(proc.pid)
        command = Command(proc, child, cmd, rid, as_exec)
        command.master = master
        command.slave = slave
        command.is_pty = master is not None
        with self.mu:
            self.items[proc.pid] = command
            if master is not None and len(self.sessions) < 4096:
                self.sessions.add(proc.pid)
        if not as_exec:
            if master is not None:
                self.ch.send(MsgType.STARTED, rid, pid=proc.pid, pty=True)
            else:
                self.ch.send(MsgType.STARTED, rid, pid=proc.pid)
        try:
            threading.Thread(target=self._pump, args=(command,), daemon=True).start()
        except RuntimeError:  # no thread to watch it (pids exhausted): don't leave it running
            self.kill(proc.pid)
            proc.returncode = child.wait()
            _close(master, slave)
            with self.mu:
                self.items.pop(proc.pid, None)
            self.ch.fail(rid, "busy", "the sandbox is out of processes; the command was stopped")

    def _pump(self, c: Command) -> None:
        proc = c.proc
        if c.master is not None:
            self._pump_pty(c, c.master)
        else:
            self._pump_pipes(c)
        code = c.child.wait()
        assert code is not None
        proc.returncode = code  # so the Popen never waits for (a reused) pid itself
        self._finish(c, code)

    def _pump_pty(self, c: Command, fd: int) -> None:
        """Relay a PTY's output, and input the master could not take at once."""
        exited_at: float | None = None
        try:
            while True:
                with self.mu:
                    waiting = bool(c.pending)
                ready, writable, _ = select.select([fd], [fd] if waiting else [], [], 0.05)
                if writable:
                    with self.mu:
                        del c.pending[: pty.write_some(fd, bytes(c.pending))]
                data = pty.read_some(fd) if ready else None
                if data == b"":
                    break  # every slave fd is closed
                if data:
                    with c.send_lock:
                        for rid in _targets(c.rid, c.watchers):
                            self.ch.send_stream(MsgType.PTY, rid, data)
                if c.child.poll() is not None:
                    # Background jobs may hold the slave open: once the command has exited,
                    # drain for a moment and stop (closing the master hangs them up).
                    exited_at = exited_at or time.monotonic()
                    if not data and time.monotonic() - exited_at > 0.05:
                        break
        finally:
            with self.mu:
                c.master = None
                c.pending.clear()
                slave, c.slave = c.slave, None
            os.close(fd)
            if slave is not None:
                os.close(slave)

    def _pump_pipes(self, c: Command) -> None:
        proc = c.proc
        assert proc.stdout is not None and proc.stderr is not None
        fds = {proc.stdout.fileno(): MsgType.STDOUT, proc.stderr.fileno(): MsgType.STDERR}
        exited_at: float | None = None
        while fds:
            ready, _, _ = select.select(list(fds), [], [], 0.05)
            for fd in ready:
                data = os.read(fd, 1 << 16)
                if data:
                    with c.send_lock:
                        for rid in _targets(c.rid, c.watchers):
                            self.ch.send_stream(fds[fd], rid, data)
                else:
                    del fds[fd]
            if c.child.poll() is not None:
                # A daemonised grandchild may hold the pipes open forever: once the shell has
                # exited, give the pipes a moment to drain and then stop waiting for EOF.
                exited_at = exited_at or time.monotonic()
                if not ready and time.monotonic() - exited_at > 0.05:
                    break

    def _finish(self, c: Command, code: int) -> None:
        proc = c.proc
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        with self.mu:
            self.items.pop(proc.pid, None)
            if len(self.groups) < 4096:
                self.groups.add(proc.pid)
            watchers = tuple(c.watchers)  # none can join once it is out of items
        status = code if code >= 0 else 128 - code
        with c.send_lock:
            watchers = tuple(w for w in watchers if w in c.watchers)  # none if detached since
            if c.as_exec and status != 0 and c.rid:
                self.ch.send(
                    MsgType.ERROR,
                    c.rid,
                    name="CommandExitError",
                    value=f"exit status {status}",
                    traceback="",
                )
            for rid in _targets(c.rid, watchers):
                self.ch.done(rid, exit_code=status, restarted=False)

    def connect(self, rid: int, pid: int) -> None:
        """Re-attach request ``rid`` to running command ``pid``: STARTED, then its output
        from now on and its end (the first request keeps its stream too)."""
        with self.mu:
            c = self.items.get(pid)
            if c is not None and not c.as_exec and len(c.watchers) < MAX_WATCHERS:
                # STARTED before any output reaches rid
                if c.is_pty:
                    self.ch.send(MsgType.STARTED, rid, pid=pid, pty=True)
                else:
                    self.ch.send(MsgType.STARTED, rid, pid=pid)
                c.watchers.append(rid)
                return
        if c is None or c.as_exec:
            self.ch.fail(rid, "not_found", "no such process")
        else:
            self.ch.fail(rid, "busy", "too many connections to this process")

    def interrupt(self, rid: int) -> bool:
        with self.mu:
            pid = next((p for p, c in self.items.items() if c.rid == rid), None)
        if pid is None:
            return False
        self.kill(pid, signal.SIGINT)

        def escalate() -> None:
            time.sleep(1.0)
            self.kill(pid, signal.SIGKILL)

        threading.Thread(target=escalate, daemon=True).start()
        return True

    def stdin(self, pid: int, data: bytes, eof: bool) -> bool:
        with self.mu:
            c = self.items.get(pid)
            if c is not None and c.master is not None:
                return self._pty_input(c, c.master, data)
        if c is None or c.proc.stdin is None:
            return False
        try:
            return c.feed(data, eof)
        except (ValueError, OSError):  # its stdin already closed
            return False

    def _pty_input(self, c: Command, fd: int, data: bytes) -> bool:
        """Input for a PTY (with ``mu`` held): what the master takes now is written, the rest
        queued for the pump (never blocking the agent's dispatch). EOF is the terminal's
        own byte (0x04), not a close."""
        if len(c.pending) + len(data) > pty.MAX_PENDING:
            raise FileError("busy", "the terminal is not reading its input")
        chars = pty.signal_chars(c.slave) if c.slave is not None else {}
        start = 0
        for i, byte in enumerate(data):
            sig = chars.get(byte)
            if sig is None:
                continue
            # The kernel does not raise it (gVisor): the agent does (moat.agent.pty).
            self._write_pty(c, fd, data[start:i])
            start = i + 1
            try:
                os.killpg(pty.foreground_guess(c.proc.pid), sig)
            except (ProcessLookupError, PermissionError):
                pass
        self._write_pty(c, fd, data[start:])
        return True

    @staticmethod
    def _write_pty(c: Command, fd: int, data: bytes) -> None:
        if c.pending:
            c.pending += data
        elif data:
            c.pending += data[pty.write_some(fd, data) :]

    def resize(self, pid: int, cols: int, rows: int) -> bool:
        with self.mu:
            c = self.items.get(pid)
            if c is None or c.master is None:
                return False
            pty.set_size(c.master, cols, rows)
        return True

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> bool:
        with self.mu:
            known = pid in self.items or pid in self.groups
            session = pid in self.sessions
        if session:
            # A shell on a PTY puts its jobs in process groups of their own: the session.
            found = pty.kill_session(pid, sig)
            if not found:
                with self.mu:
                    self.sessions.discard(pid)
                    self.groups.discard(pid)
            return found
        if not known:
            return False
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            with self.mu:
                self.groups.discard(pid)
            return False
        if sig == signal.SIGKILL:
            # A fork racing the signal can leave a member behind (a fork bomb does): repeat
            # until the group is empty, for a bounded time.
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                try:
                    os.killpg(pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                time.sleep(0.01)
        return True

    def list(self) -> list[dict[str, Any]]:
        with self.mu:
            return [
                {"pid": pid, "cmd": c.cmd, "started": c.started} for pid, c in self.items.items()
            ]

    def detach(self) -> None:
        """After a restore: the old host's requests are gone. Commands keep running with no
        request attached (rid 0: their output is dropped) until a new one connects."""
        with self.mu:
            for c in self.items.values():
                with c.send_lock:  # an output frame in flight goes out before, never after
                    c.rid = 0
                    c.watchers.clear()

    def kill_all(self) -> None:
        with self.mu:
            pids = list(self.items)
        for pid in pids:
            self.kill(pid)


def _targets(rid: int, watchers: list[int] | tuple[int, ...]) -> list[int]:
    """The requests a command's output and end go to (none once detached)."""
    return [r for r in (rid, *watchers) if r]


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)
