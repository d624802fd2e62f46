"""Checking a ``Mount``'s host path on the privileged side, the same way on every tier.

Trust domain: host engine (root). The caller names a host path; the engine resolves it as root
(so a path under a parent the sandbox's uid cannot traverse, such as ``/root/project``, is
fine), opens what it resolves to without following a link that appeared since, and judges the
object it holds. Errors are typed and name no host path but the one the caller passed
(invariant 8).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from moat.errors import InvalidArgumentError, PolicyError
from moat.runtime.spec import Mount

__all__ = ["Source", "resolve"]


@dataclass(frozen=True)
class Source:
    """A mount's host source as the engine found it."""

    path: str  # resolved: no symlink in it
    is_dir: bool  # else a regular file
    ident: tuple[int, int]  # (st_dev, st_ino), to check a later bind got the same object


def resolve(m: Mount, gid: int) -> Source:
    """Resolve ``m.host_path``; a directory or a regular file the sandbox can read.

    Missing, or neither a directory nor a regular file: :class:`InvalidArgumentError`. Not
    readable by the sandbox's unprivileged uid (only the "other" bits, or the group bits when
    the object belongs to the sandboxes' group ``gid``, let it in): :class:`PolicyError`
    saying so, rather than a sandbox that starts and then cannot read its input.
    """
    real = os.path.realpath(m.host_path)
    try:
        fd = os.open(real, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            raise InvalidArgumentError(f"mount source {m.host_path} does not exist") from None
        raise InvalidArgumentError(f"mount source {m.host_path} cannot be opened") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    is_dir = stat.S_ISDIR(st.st_mode)
    if not (is_dir or stat.S_ISREG(st.st_mode)):
        raise InvalidArgumentError(f"mount source {m.host_path} must be a directory or a file")
    need = 0o5 if is_dir else 0o4  # r-x on a directory, r-- on a file
    have = st.st_mode & 0o7
    if st.st_gid == gid:
        have |= (st.st_mode >> 3) & 0o7
    if have & need != need:
        raise PolicyError(
            f"mount source {m.host_path} is not readable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); sandboxes run as an unprivileged uid"
        )
    return Source(real, is_dir, (st.st_dev, st.st_ino))
