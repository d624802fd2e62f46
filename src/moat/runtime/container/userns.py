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

Nested user namespaces stay impossible without bwrap's ``--disable-userns`` (which would nest
a one-uid namespace of its own): the holder sets ``user.max_user_namespaces`` to 0 *in the new
namespace* before anything else runs there; only a process with ``CAP_SYS_RESOURCE`` over the
namespace may change it back, and nothing inside holds it (invariant 9). The seccomp filter's
``unshare``/``clone`` rules stay the first line.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Sequence
from typing import Final

from moat.errors import IsolationUnavailableError

__all__ = ["Holder", "IdMap", "enter"]

_CLONE_NEWUSER: Final = 0x10000000
_MAX_USERNS: Final = "/proc/sys/user/max_user_namespaces"

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
            # Popen returned: the child has exec'd, so the namespace exists.
            pid = self.popen.pid
            with open(f"/proc/{pid}/uid_map", "w") as f:
                f.write(_render(uids))
            with open(f"/proc/{pid}/gid_map", "w") as f:
                f.write(_render(gids))
            self.fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.close()
            raise IsolationUnavailableError("the sandbox's ids could not be mapped") from exc

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
