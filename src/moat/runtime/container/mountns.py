"""Host mounts for bubblewrap, staged while still root: paths under 0700 parents work.

Trust domain: host engine (privileged). bubblewrap runs as an unprivileged host uid, so it
cannot reach a directory below a parent that uid may not traverse (``/root/project`` when moat
runs as root); it resolves every source path itself (``--ro-bind-fd`` too: it canonicalises
``/proc/self/fd/N`` back into the path). So the driver:

1. :func:`open_sources` (in the engine, as root): resolves each ``Mount.host_path``, opens the
   result (no symlink followed) and records what it is: a directory or a regular file (else a
   typed error), and its identity (device, inode);
2. :meth:`Staged.enter` (in the forked child, still root, before dropping privileges): enters a
   new *private* mount namespace, mounts a small tmpfs on :func:`stage_dir` there, binds each
   resolved source onto ``stage_dir()/N`` and checks that what got bound is the object opened
   in step 1 (a path swapped in between fails the start). A bind needs a path of the child's
   own namespace: an fd opened before ``unshare`` names a mount of the old one (EINVAL);
3. bwrap then binds ``stage_dir()/N`` (reachable by any uid) to the mount's sandbox path, read-
   only unless asked, as before.

The staging mounts live only in the child's mount namespace: the host's mount table never
changes and they vanish with the sandbox (invariant 5). Inside bwrap's user namespace they are
locked mounts, so the sandbox cannot unmount them to look beneath.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from moat.paths import state_dir
from moat.runtime.mounts import resolve
from moat.runtime.spec import Mount

__all__ = ["Staged", "open_sources", "stage_dir"]

_CLONE_NEWNS: Final = 0x00020000
_MS_NOSUID: Final = 2
_MS_NODEV: Final = 4
_MS_NOEXEC: Final = 8
_MS_BIND: Final = 4096
_MS_REC: Final = 16384
_MS_PRIVATE: Final = 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)
_mount = _libc.mount
_mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_mount.restype = ctypes.c_int
_unshare = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_unshare.restype = ctypes.c_int


def stage_dir() -> Path:
    """The (always empty) host directory the child mounts its staging tmpfs on."""
    path = state_dir() / "mnt"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


@dataclass(frozen=True)
class Staged:
    """Resolved sources of a sandbox's mounts, in ``spec.mounts`` order."""

    paths: tuple[str, ...]
    is_dir: tuple[bool, ...]
    ids: tuple[tuple[int, int], ...]  # (st_dev, st_ino) of what was opened
    stage: str

    def sources(self) -> tuple[str, ...]:
        """What bwrap binds from, one per mount (paths valid in the child only)."""
        return tuple(f"{self.stage}/{i}" for i in range(len(self.paths)))

    def enter(self) -> None:
        """In the forked child, as root, before privileges drop: stage every source.

        Only os-level and libc calls (no locks: runs between fork and exec). Raises OSError,
        which fails the spawn: never a sandbox without the data it was promised.
        """
        if not self.paths:
            return
        _check(_unshare(_CLONE_NEWNS))
        _check(_mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None))
        stage = self.stage.encode()
        flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        _check(_mount(b"moat-stage", stage, b"tmpfs", flags, b"mode=0755,size=64k"))
        for i, (path, is_dir, ident) in enumerate(
            zip(self.paths, self.is_dir, self.ids, strict=True)
        ):
            target = f"{self.stage}/{i}"
            if is_dir:
                os.mkdir(target, 0o755)
            else:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            _check(_mount(path.encode(), target.encode(), None, _MS_BIND | _MS_REC, None))
            st = os.stat(target, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != ident:
                raise OSError(errno.ESTALE, "a mount source changed while starting")


def _check(rc: int) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_sources(mounts: tuple[Mount, ...], gid: int) -> Staged:
    """Resolve and check every mount's host path as root (see :func:`mounts.resolve`)."""
    found = [resolve(m, gid) for m in mounts]
    return Staged(
        tuple(r.path for r in found),
        tuple(r.is_dir for r in found),
        tuple(r.ident for r in found),
        str(stage_dir()) if mounts else "",
    )
