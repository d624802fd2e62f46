"""Checking a ``Mount``'s host path on the privileged side, the same way on every tier.

Trust domain: host engine (root). The caller names a host path; the engine resolves it as root
(so a path under a parent the sandbox's uid cannot traverse, such as ``/root/project``, is
fine), opens what it resolves to without following a link that appeared since, and judges the
object it holds. Errors are typed and name no host path but the one the caller passed
(invariant 8).

One rule for the tiers that keep host owners (:func:`check_owners`): gVisor's gofer and the
microVM's mount image show a mounted entry with its host uid/gid, and inside both the sandbox's
user *is* uid/gid 1000, so host uid/gid 1000's owner or group bits would apply to it. The
container tier maps its user to a random host uid (host uid 1000 appears as ``nobody``), so
there only the "other" bits ever apply. A sandbox must get no more of a mount than any other
host user does (invariant 1: nothing of the host unless named, and naming a directory shares
what the host shares with others), so such an entry is refused.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from moat.errors import InvalidArgumentError, PolicyError
from moat.runtime.spec import SANDBOX_GID, SANDBOX_UID, Mount

__all__ = ["Source", "beyond_others", "check_owners", "owner_error", "resolve"]


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


def beyond_others(st: os.stat_result, writable: bool) -> bool:
    """Whether a tier that keeps host owners gives the sandbox's user (uid/gid
    :data:`SANDBOX_UID`/:data:`SANDBOX_GID`) more of this entry than any other host user gets:
    read or search (and, on a writable mount, write) in its owner or group bits, not in
    "other"."""
    bits = 0o7 if writable else 0o5
    others = st.st_mode & 0o7
    owner, group = (st.st_mode >> 6) & 0o7, (st.st_mode >> 3) & 0o7
    return (st.st_uid == SANDBOX_UID and owner & ~others & bits != 0) or (
        st.st_gid == SANDBOX_GID and group & ~others & bits != 0
    )


def owner_error(m: Mount, rel: str, tier: str) -> PolicyError:
    """The error for an entry :func:`beyond_others` refuses (names no host path but the
    caller's own)."""
    where = m.host_path if rel == "." else f"{rel!r} in {m.host_path}"
    return PolicyError(
        f"mount entry {where} is owned by host uid or gid {SANDBOX_UID}, which is the sandbox's"
        f" user on the {tier} tier, and gives that owner more than other users"
        f" ({'read, write or search' if not m.read_only else 'read or search'}): the sandbox"
        " would get it. Make it accessible to others alike, or use the container tier"
    )


def check_owners(m: Mount, tier: str) -> Source:
    """:func:`resolve` ``m``, then refuse it if any entry of its tree, the root included,
    is :func:`beyond_others` (links are not followed: a link's own mode opens nothing).

    Walks the whole tree (blocking: call it off the event loop). A later change on the host
    is not seen: the check holds at start.
    """
    source = resolve(m, SANDBOX_GID)
    writable = not m.read_only
    if beyond_others(os.stat(source.path), writable):
        raise owner_error(m, ".", tier)
    if source.is_dir:
        for dirpath, dirnames, filenames in os.walk(source.path):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if beyond_others(st, writable):
                    raise owner_error(m, os.path.relpath(path, source.path), tier)
    return source
