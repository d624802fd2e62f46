"""Pseudo-terminals for commands: allocated here, inside the sandbox, never passed in.

The agent opens the pair from the sandbox's own devpts (``os.openpty``: bubblewrap's
``--dev``, gVisor's sentry and the guest kernel each give the sandbox a private instance);
no terminal device of the host ever reaches a sandbox (invariant 1). The command gets the
slave as stdin, stdout, stderr and controlling terminal in a session of its own, as the
sandbox user with the user's limits (``shield.user_limits``; invariant 9); the agent keeps
the master. Job control puts a shell's jobs in process groups of their own, so a PTY is
killed by session, not by process group (:func:`kill_session`).

gVisor's line discipline (release 20221219) does not raise signals: Ctrl-C reaches the
program as a byte. Where a probe finds that (:func:`kernel_signals`), the agent does it: a
signal character typed while the terminal has ISIG set is taken out of the input and its
signal sent to the foreground job (:func:`signal_chars`, :func:`foreground_guess`).

Trust domain: sandbox (runs inside, stdlib only).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import struct
import termios
import time

from moat.agent import shield

#: Input queued for a PTY whose line discipline is full (a program not reading): past it
#: the write is refused ("busy"), never buffered without bound.
MAX_PENDING = 1 << 20


def open_pair(cols: int, rows: int) -> tuple[int, int]:
    """A new (master, slave) pair of this size; the master non-blocking, neither inherited."""
    master, slave = os.openpty()
    set_size(master, cols, rows)
    os.set_blocking(master, False)
    return master, slave


def set_size(fd: int, cols: int, rows: int) -> None:
    """Set the terminal's size; the kernel sends SIGWINCH to its foreground process group."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def child_setup() -> None:
    """``preexec_fn`` of a PTY command (after setsid, before exec): the user's uid and limits,
    and the slave (already on fd 0) as the new session's controlling terminal."""
    shield.user_limits()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def root_child_setup() -> None:
    """``preexec_fn`` of a root PTY command: root's ids (moat.agent.shield.root_limits), then
    the controlling terminal."""
    shield.root_limits()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def write_some(fd: int, data: bytes) -> int:
    """Write what the master takes now, without blocking; the count written."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno == errno.EIO:  # the other side is gone: nothing will read it
            return len(data)
        raise


def read_some(fd: int) -> bytes | None:
    """What the master has: None if nothing yet, b"" once every slave fd is closed (Linux
    reports EIO)."""
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.EIO:
            return b""
        raise


_kernel_signals: bool | None = None


def kernel_signals() -> bool:
    """Whether this kernel's line discipline turns Ctrl-C into SIGINT (Linux does; gVisor
    20221219 passes the byte on). Probed once: ^C then a newline into a fresh pair, and
    whether the slave reads the ^C."""
    global _kernel_signals
    if _kernel_signals is None:
        master, slave = os.openpty()
        try:
            os.write(master, b"\x03\n")
            got = b""
            deadline = time.monotonic() + 1.0
            while b"\n" not in got and time.monotonic() < deadline:
                if select.select([slave], [], [], 0.1)[0]:
                    got += os.read(slave, 64)
            _kernel_signals = b"\x03" not in got
        finally:
            os.close(master)
            os.close(slave)
    return _kernel_signals


_SIGNAL_CHARS = (
    (termios.VINTR, signal.SIGINT),
    (termios.VQUIT, signal.SIGQUIT),
    (termios.VSUSP, signal.SIGTSTP),
)


def signal_chars(slave: int) -> dict[int, int]:
    """The terminal's signal characters (byte -> signal) while ISIG is set, else none."""
    try:
        attrs = termios.tcgetattr(slave)
    except termios.error:
        return {}
    if not attrs[3] & termios.ISIG:
        return {}
    out: dict[int, int] = {}
    for index, sig in _SIGNAL_CHARS:
        char = attrs[6][index]
        code = char[0] if isinstance(char, bytes) and char else None
        if code:  # 0: disabled (_POSIX_VDISABLE)
            out.setdefault(code, sig)
    return out


def foreground_guess(sid: int) -> int:
    """The process group a typed signal is for, where the kernel won't tell (gVisor has no
    TIOCGPGRP from outside the session): the newest job of the session, else its leader."""
    best = (-1, sid)
    for _pid, fields in _session(sid):
        pgrp, start = int(fields[2]), int(fields[19]) if len(fields) > 19 else 0
        if pgrp != sid and start > best[0]:
            best = (start, pgrp)
    return best[1]


def _session(sid: int) -> list[tuple[int, list[bytes]]]:
    """Live (not zombie) processes of session ``sid`` and their /proc stat fields after the
    command name (this sandbox's own /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[-1].split()
        if len(fields) > 3 and fields[3] == str(sid).encode() and fields[0] != b"Z":
            out.append((int(name), fields))
    return out


def _session_members(sid: int) -> list[int]:
    return [pid for pid, _ in _session(sid)]


def kill_session(sid: int, sig: int) -> bool:
    """Signal every process of session ``sid`` (a shell's jobs have process groups of their
    own). With SIGKILL, repeat for a bounded time until the session is empty (a fork racing
    the signal). False if the session had no process."""
    found = False
    deadline = time.monotonic() + 2.0
    while True:
        members = _session_members(sid)
        for pid in members:
            try:
                os.kill(pid, sig)
                found = True
            except (ProcessLookupError, PermissionError):
                pass
        if sig != 9 or not members or time.monotonic() > deadline:
            return found
        time.sleep(0.01)
