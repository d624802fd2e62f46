"""A user namespace whose id maps host root writes: the build sandbox's, and the container
tier's root-capable sandboxes' (docs/users.md).

Trust domain: host engine (privileged). Unprivileged bubblewrap can map only its own uid, so
a namespace with several ids (root inside, the sandbox user) needs host root to write its
``uid_map``/``gid_map``. A :class:`Holder` is a small process (``cat`` on a pipe from us) that
creates the namespace and owns it while the maps are written and bubblewrap joins it
(:func:`enter`, or ``nsenter``); it exits when its stdin closes and is killed and reaped by
:meth:`Holder.close`, so it dies with the sandbox or with moat (invariant 5). The build sandbox
also puts it in the step's cgroup; the container driver does not (a cgroup v1 move costs an RCU
grace period, ~5 ms here).

A holder outside any cgroup (the container driver's) is ``unshare --user cat``, started with
no ``preexec_fn``: subprocess then uses vfork, not a fork of the whole engine (~4 ms CPU less
per root-capable sandbox in a 50 MB engine, more in a server); one byte echoed back through
``cat`` proves the namespace exists before the maps are written. A holder that joins a cgroup
first (the build's) keeps the forked child.

Nested user namespaces stay impossible without bwrap's ``--disable-userns`` (which would nest
a one-uid namespace of its own): ``user.max_user_namespaces`` is set to 0 *in the new
namespace* before anything but the holder's ``cat`` runs there (by the forked holder, or by
:func:`enter` before it returns, i.e. before bubblewrap is exec'd); only a process with
``CAP_SYS_RESOURCE`` over the namespace may change it back, and nothing inside holds it
(invariant 9). The seccomp filter's ``unshare``/``clone`` rules stay the first line.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import subprocess
from collections.abc import Sequence
from typing import Final

from moat.errors import IsolationUnavailableError

__all__ = ["Holder", "IdMap", "enter"]

_CLONE_NEWUSER: Final = 0x10000000
_MAX_USERNS: Final = "/proc/sys/user/max_user_namespaces"
#: util-linux (Essential in Debian): unshare(CLONE_NEWUSER), then exec cat
_UNSHARE: Final = "/usr/bin/unshare"
_CAT: Final = "/bin/cat"
#: how long a fresh holder may take to echo its first byte
_READY_S: Final = 10.0

_libc = ctypes.CDLL(None, use_errno=True)
_unshare = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_unshare.restype = ctypes.c_int
_setns = _libc.setns
_setns.argtypes = [ctypes.c_int, ctypes.c_int]
_setns.restype = ctypes.c_int

#: One ``uid_map``/``gid_map`` line: (id inside, host id, count).
IdMap = tuple[int, int, int]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _render(lines: Sequence[IdMap]) -> str:
    return "".join(f"{inside} {host} {count}\n" for inside, host, count in lines)


class Holder:
    """A process owning a fresh user namespace with the given id maps (see module doc).

    Blocking (a fork and an exec); raises IsolationUnavailableError, leaving nothing behind,
    when the namespace can't be made. :attr:`fd` is an open descriptor of the namespace.
    """

    def __init__(
        self, procs_files: Sequence[str], uids: Sequence[IdMap], gids: Sequence[IdMap]
    ) -> None:
        procs = list(procs_files)
        if not procs:
            self._start_light(uids, gids)
            return

        def preexec() -> None:  # os and libc calls only (between fork and exec)
            pid = str(os.getpid()).encode()
            for path in procs:  # into the sandbox's cgroup (if given): killed with it
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)
            _check(_unshare(_CLONE_NEWUSER), "unshare")
            # Still holding every capability over the new namespace (its creator):
            # no user namespace may be made inside it (module doc).
            fd = os.open(_MAX_USERNS, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

        try:
            self.popen = subprocess.Popen(
                ["/bin/cat"],  # a fixed argv: it only waits for EOF
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=preexec,
                env={},
                cwd="/",
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise IsolationUnavailableError("the sandbox's user namespace failed") from exc
        self.fd = -1
        try:
            self._map(uids, gids)  # Popen returned: the child has exec'd, the namespace exists
        except OSError as exc:
            self.close()
            raise IsolationUnavailableError("the sandbox's ids could not be mapped") from exc

    def _map(self, uids: Sequence[IdMap], gids: Sequence[IdMap]) -> None:
        """Write the holder's id maps and keep its namespace open (``self.fd``)."""
        pid = self.popen.pid
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(_render(uids))
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(_render(gids))
        self.fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)

    def _start_light(self, uids: Sequence[IdMap], gids: Sequence[IdMap]) -> None:
        """The holder without a fork of the engine (module doc); same outcome and errors."""
        try:
            self.popen = subprocess.Popen(
                [_UNSHARE, "--user", _CAT],  # a fixed argv: cat echoes one byte, then waits
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env={},
                cwd="/",
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise IsolationUnavailableError("the sandbox's user namespace failed") from exc
        self.fd = -1
        try:
            assert self.popen.stdin is not None and self.popen.stdout is not None
            os.write(self.popen.stdin.fileno(), b"u")
            ready, _, _ = select.select([self.popen.stdout], [], [], _READY_S)
            if not ready or os.read(self.popen.stdout.fileno(), 1) != b"u":
                raise OSError("the user namespace's holder did not start")
            self._map(uids, gids)  # cat runs: unshare made the namespace before exec'ing it
        except OSError as exc:
            self.close()
            raise IsolationUnavailableError("the sandbox's ids could not be mapped") from exc
        finally:
            if self.popen.stdout is not None:
                self.popen.stdout.close()  # nothing more comes: cat never reads again

    @property
    def path(self) -> str:
        """The namespace as a path (``nsenter --user=PATH``)."""
        return f"/proc/{self.popen.pid}/ns/user"

    def close(self) -> None:
        """End the holder and reap it (idempotent)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        self.popen.wait()


def enter(ns_fd: int) -> None:
    """In a forked child, as host root: join the namespace of ``ns_fd`` as its uid and gid 0
    (every capability over that namespace, none over the host's: invariant 9). Then exec.

    Only libc and os calls (runs between fork and exec). Raises OSError on failure.
    """
    _check(_setns(ns_fd, _CLONE_NEWUSER), "setns")
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    # Every capability over the namespace still: no user namespace may be made inside it
    # (module doc; a light holder did not write it, a forked one did: the same value again).
    fd = os.open(_MAX_USERNS, os.O_WRONLY)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)
