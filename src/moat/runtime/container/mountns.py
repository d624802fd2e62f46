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

moat's own trees (the agent's code, the synthetic /etc files) are not bound from the host's
filesystem: a bind's entry in ``/proc/self/mountinfo`` names its source's path from the root
of the source's filesystem (``/var/lib/moat/agent/<hash>``), so the sandbox would learn the
state directory and, through it, how the host is laid out (issue 17 §4). Instead
:meth:`Staged.enter` writes them, from a snapshot the engine read once (:func:`snapshot`,
~230 KiB), into the staging tmpfs; bwrap binds them from there and the sandbox sees only
``/agent`` and ``/etc/...`` on a tmpfs named ``moat``. The copy is charged to the sandbox's
memory cgroup (the child is already in it).

The staging mounts live only in the child's mount namespace: the host's mount table never
changes and they vanish with the sandbox (invariant 5). Inside bwrap's user namespace they are
locked mounts, so the sandbox cannot unmount them to look beneath.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from moat.errors import IsolationUnavailableError
from moat.paths import state_dir
from moat.runtime.container.toplayer import TopOp, plan_top
from moat.runtime.mounts import resolve
from moat.runtime.spec import Mount

__all__ = ["Entry", "Staged", "open_sources", "snapshot", "stage_dir"]

_CLONE_NEWNS: Final = 0x00020000
_MS_RDONLY: Final = 1
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
class Entry:
    """One directory (``data`` None) or regular file of a moat-owned tree, relative path."""

    rel: str
    data: bytes | None
    mode: int
    mtime_ns: int  # kept: a copied .py must still match its byte-compiled .pyc


@functools.cache
def snapshot(root: str) -> tuple[Entry, ...]:
    """The directories and regular files under ``root``, parents first (read once per engine).

    Only for moat's own write-once trees (agent copy, synthetic /etc): anything else found
    there (a symlink, a device) is a broken install: :class:`IsolationUnavailableError`.
    """
    entries: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames)]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                entries.append(Entry(rel, None, mode, st.st_mtime_ns))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    entries.append(Entry(rel, f.read(), mode, st.st_mtime_ns))
            else:
                # no host path in the message (invariant 8); fail closed (invariant 7)
                raise IsolationUnavailableError("moat's sandbox files are damaged on this host")
    return tuple(entries)


def _tmpfs_size(trees: tuple[tuple[str, tuple[Entry, ...]], ...], extra: int = 0) -> int:
    """A cap for the staging tmpfs: the trees' pages, one per inode, ``extra`` pages (the
    root's top layer: a copy of a few files) and 64 KiB to spare."""
    pages = sum(1 + len(e.data or b"") // 4096 for _, entries in trees for e in entries)
    return (pages + len(trees) + extra + 16) * 4096


@dataclass(frozen=True)
class Staged:
    """Resolved sources of a sandbox's mounts, in ``spec.mounts`` order, and moat's trees."""

    paths: tuple[str, ...]
    is_dir: tuple[bool, ...]
    ids: tuple[tuple[int, int], ...]  # (st_dev, st_ino) of what was opened
    stage: str
    #: (name, snapshot): written to ``stage/name`` in the child (names are not digits)
    trees: tuple[tuple[str, tuple[Entry, ...]], ...] = ()
    #: a template's root (issue 12), shown at ``stage/root`` through a read-only overlay
    #: (see :meth:`enter`); "" for none
    root: str = ""
    #: moat's layer over ``root`` (toplayer.plan_top): the overlay is then the sandbox's whole
    #: ``/``; empty: the root alone (bwrap binds its entries one by one)
    top: tuple[TopOp, ...] = ()

    def root_dir(self) -> str:
        """Where bwrap finds the template's root (a path valid in the child only)."""
        return f"{self.stage}/root"

    def sources(self) -> tuple[str, ...]:
        """What bwrap binds from, one per mount (paths valid in the child only)."""
        return tuple(f"{self.stage}/{i}" for i in range(len(self.paths)))

    def tree(self, name: str) -> str:
        """Where bwrap finds moat's tree ``name`` (a path valid in the child only)."""
        return f"{self.stage}/{name}"

    def boot_id(self) -> str:
        """Where bwrap finds the sandbox's own boot id (:func:`with_boot_id`), or ""."""
        has = any(name == _IDENT for name, _ in self.trees)
        return f"{self.stage}/{_IDENT}/boot_id" if has else ""

    def enter(self) -> None:
        """In the forked child, as root, before privileges drop: stage every source.

        Only os-level and libc calls (no locks: runs between fork and exec). Raises OSError,
        which fails the spawn: never a sandbox without the data it was promised.
        """
        if not self.paths and not self.trees and not self.root:
            return
        _check(_unshare(_CLONE_NEWNS))
        _check(_mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None))
        stage = self.stage.encode()
        flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        top = self.top if self.root else ()
        opts = f"mode=0755,size={_tmpfs_size(self.trees, len(top))}".encode()
        # named "moat": the source field of every bind from it inside (issue 17 §4)
        _check(_mount(b"moat", stage, b"tmpfs", flags, opts))
        in_top = {op.src for op in top if op.op == "tree"}  # written in the layer only
        for name, entries in self.trees:
            if name not in in_top:
                _write_tree(f"{self.stage}/{name}", entries)
        if self.root:
            _mount_root(self.root, self.stage, top, dict(self.trees))
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


def _mount_root(
    root: str,
    stage: str,
    top: tuple[TopOp, ...] = (),
    trees: dict[str, tuple[Entry, ...]] | None = None,
) -> None:
    """Show the template's ``root`` at ``stage/root`` as a read-only overlay (in the child).

    A bind would name the root's host path in the sandbox's ``/proc/self/mountinfo``
    (``<state>/templates/<id>/rootfs``, issue 17 §4); an overlay is a file system of its own,
    whose binds name paths from its own root, and whose options name its layers as given:
    ``/proc/self/fd/N`` of this child, nothing of the host. Overlay needs two layers without
    an upper one: moat's ``top`` layer (written here from ``trees``, see toplayer.py) over the
    root, or the root over an empty directory. Redirects and metacopy are off: the template's
    xattrs steer nothing (only the top layer's own opaque marks and whiteouts count there:
    it is the highest layer, so the template's cannot reach above it).
    """
    upper, merged = f"{stage}/.top" if top else root, f"{stage}/root"
    lower = root if top else f"{stage}/.empty"
    os.mkdir(upper if top else lower, 0o755)
    os.chmod(upper if top else lower, 0o755)  # noqa: S103 - whatever the umask: `/` inside
    if top:
        _write_top(upper, top, trees or {})
    os.mkdir(merged, 0o755)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    first = os.open(upper, flags)
    try:
        second = os.open(lower, flags)
        try:
            opts = (
                f"lowerdir=/proc/self/fd/{first}:/proc/self/fd/{second},"
                "redirect_dir=nofollow,metacopy=off"
            )
            mode = _MS_RDONLY | _MS_NOSUID | _MS_NODEV
            _check(_mount(b"moat", merged.encode(), b"overlay", mode, opts.encode()))
        finally:
            os.close(second)
    finally:
        os.close(first)


#: overlayfs's mark of a directory that hides those of the layers beneath it
_OPAQUE_XATTR: Final = "trusted.overlay.opaque"


def _write_top(top: str, ops: tuple[TopOp, ...], trees: dict[str, tuple[Entry, ...]]) -> None:
    """Write moat's layer over a template's root (toplayer.py), in the child: os calls only."""
    etc = {e.rel: e for e in trees.get("etc", ())}
    for op in ops:
        path = f"{top}/{op.path}"
        if op.op in ("dir", "opaque"):
            os.mkdir(path, 0o755)
            os.chmod(path, 0o755)  # noqa: S103 - the sandbox uid traverses it
            if op.op == "opaque":
                os.setxattr(path, _OPAQUE_XATTR, b"y")
        elif op.op == "tree":
            _write_tree(path, trees[op.src])
            os.setxattr(path, _OPAQUE_XATTR, b"y")
        elif op.op == "whiteout":
            # overlayfs's whiteout: a 0/0 character device; never opened (the staging tmpfs
            # is nodev, and the overlay hides the entry altogether)
            os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))
        elif op.op == "file":
            entry = etc[op.src]
            _write_file(path, entry.data or b"", entry.mode, entry.mtime_ns)
        else:  # "point": a caller's file mount lands here
            _write_file(path, b"", 0o644)


def _write_tree(top: str, entries: tuple[Entry, ...]) -> None:
    """Write a snapshot under ``top`` (in the child, on its own tmpfs): os calls only."""
    os.mkdir(top, 0o755)
    os.chmod(top, 0o755)  # noqa: S103 - whatever the umask: the sandbox uid reads it
    for e in entries:
        path = f"{top}/{e.rel}"
        if e.data is None:
            os.mkdir(path, e.mode)
            os.chmod(path, e.mode)
            continue
        _write_file(path, e.data, e.mode, e.mtime_ns)


def _write_file(path: str, data: bytes, mode: int, mtime_ns: int | None = None) -> None:
    """A new regular file (never through a link): os calls only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
        if mtime_ns is not None:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
    finally:
        os.close(fd)


def _check(rc: int) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


#: The staged tree of per-sandbox identity files (not a host directory).
_IDENT = "ident"


def with_boot_id(staged: Staged, boot_id: str) -> Staged:
    """``staged`` plus a file holding ``boot_id`` (a fresh one per sandbox start: a start after
    a filesystem-only pause is a new boot, as E2B's "reboot" says)."""
    entry = Entry("boot_id", boot_id.encode("ascii") + b"\n", 0o444, 0)
    return dataclasses.replace(
        staged,
        stage=staged.stage or str(stage_dir()),
        trees=(*staged.trees, (_IDENT, (entry,))),
    )


def open_sources(
    mounts: tuple[Mount, ...],
    gid: int,
    trees: tuple[tuple[str, str], ...] = (),
    root: str | None = None,
) -> Staged:
    """Resolve and check every mount's host path as root (see :func:`mounts.resolve`), and
    snapshot moat's ``(name, host dir)`` trees (cached: read once per engine). ``root``: a
    template's root (moat's own state dir, checked by the engine), staged as an overlay: the
    sandbox's whole ``/``, with moat's layer over it (toplayer.py)."""
    found = [resolve(m, gid) for m in mounts]
    points = tuple((m.sandbox_path, r.is_dir) for m, r in zip(mounts, found, strict=True))
    return Staged(
        tuple(r.path for r in found),
        tuple(r.is_dir for r in found),
        tuple(r.ident for r in found),
        str(stage_dir()) if mounts or trees or root else "",
        tuple((name, snapshot(path)) for name, path in trees),
        root or "",
        plan_top(points) if root else (),
    )
