"""A build step's writable root on a file system the kernel caps (bytes and inodes).

Trust domain: host engine (root). A template build step runs hostile code (install scripts)
with a writable root; its writes must be bounded *while it runs*, by the kernel (invariant
10), not only measured afterwards. Each step gets, inside its temp directory ``work``:

* ``work/disk.img``: a sparse ext4 image sized to the step's byte budget, with one inode per
  :data:`BYTES_PER_INODE` of it (no journal, no reserved blocks, inode tables initialised
  lazily: its unused part takes no host disk). Root-owned 0600 and never bound into the
  sandbox: the step reaches the file system only through the kernel, never its raw bytes.
* ``work/disk``: that image, loop-mounted ``nodev,nosuid`` (``mount -o loop`` sets the loop
  device to detach itself when the file system is unmounted).
* with a parent layer, ``work/merged``: an overlay with the parent read-only as its lower
  layer and its upper and work directories on ``work/disk``. The parent is never copied
  and never written; only what the step writes (new files, copied-up changes) takes room.

Full means ``ENOSPC`` inside the sandbox, for data and for inodes alike. :func:`remove`
unmounts everything under ``work`` (lazily if something still holds it) and deletes the
image on every path; :func:`sweep_under` unmounts what a crashed engine left (the caller
decides which temp directories are dead: ``moat.templates.store``). Invariant 5.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from moat.errors import IsolationUnavailableError, SandboxError
from moat.runtime.offthread import owned, settle

__all__ = ["BYTES_PER_INODE", "StepFs", "image_bytes", "mounts_under", "remove", "step_fs"]

log = logging.getLogger("moat.runtime.container.build")

IMAGE = "disk.img"
DISK = "disk"
MERGED = "merged"
#: One inode per 4 KiB of budget: a non-empty file takes a 4 KiB block anyway, so inodes run
#: out about when blocks do; empty files, links and directories are bounded by the count.
BYTES_PER_INODE = 4096
MIN_INODES = 1024
_BLOCK = 4096
_INODE_SIZE = 256
#: ext4's own blocks beside the data and the inode tables: superblocks, group descriptors,
#: bitmaps, root and lost+found (plus the 2% of clusters it keeps back, added below).
_SLACK = 1 << 20
#: below this much free room (or these many free inodes) the step filled its file system
_FULL_BYTES = 1 << 20
_FULL_INODES = 16
_TIMEOUT_S = 120
_ENV = {"PATH": "/usr/sbin:/sbin:/usr/bin:/bin", "LC_ALL": "C"}


@dataclass(frozen=True)
class StepFs:
    """A step's capped file system. ``root`` is where the step's root is: the overlay (with
    a parent) or ``disk`` itself (the caller makes its root directory inside)."""

    work: Path
    budget: int
    inodes: int
    overlay: bool

    @property
    def disk(self) -> Path:
        return self.work / DISK

    @property
    def root(self) -> Path:
        return self.work / MERGED if self.overlay else self.work / DISK

    def full(self) -> bool:
        """Whether the step ran its file system (nearly) out of room or inodes. (A budget
        under 8 MiB counts as full only below an eighth of it: the size check after the step
        still holds the root to the cap.)"""
        st = os.statvfs(self.disk)
        room = min(_FULL_BYTES, self.budget // 8)
        return st.f_bavail * st.f_frsize < room or st.f_favail < _FULL_INODES


def inodes_for(budget: int) -> int:
    return max(MIN_INODES, budget // BYTES_PER_INODE)


def image_bytes(budget: int) -> int:
    """The image's size for ``budget`` bytes of data: the most host disk a step can take."""
    raw = budget + inodes_for(budget) * _INODE_SIZE + _SLACK
    raw += raw // 50  # ext4's reserved clusters
    return -(-raw // _BLOCK) * _BLOCK


@contextlib.asynccontextmanager
async def step_fs(work: Path, budget: int, lower: Path | None) -> AsyncIterator[StepFs]:
    """Make, mount and (on every exit, cancellation included) remove a step's capped file
    system in ``work`` (an empty directory only root and the build ids enter)."""
    loop = asyncio.get_running_loop()
    fs = await owned(lambda: make(work, budget, lower), remove)
    try:
        yield fs
    finally:
        done = loop.run_in_executor(None, remove, fs)
        await settle(done)
        if (exc := done.exception()) is not None:
            log.error("a build step's file system was not removed: %s", exc)
            raise SandboxError("a build step's file system could not be removed") from None


def make(work: Path, budget: int, lower: Path | None) -> StepFs:
    """Blocking :func:`step_fs`: the image, its loop mount and (with ``lower``) the overlay.
    IsolationUnavailableError when the host can't (invariant 7: never an uncapped step)."""
    if budget <= 0:
        raise ValueError("budget must be positive")
    fs = StepFs(work, budget, inodes_for(budget), lower is not None)
    image = work / IMAGE
    try:
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, image_bytes(budget))  # sparse
        finally:
            os.close(fd)
        _run(
            "mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal,^resize_inode",
            "-L", "moat-build", "-m", "0", "-b", str(_BLOCK), "-I", str(_INODE_SIZE),
            "-N", str(fs.inodes),
            "-E", "lazy_itable_init=1,nodiscard,root_owner=0:0", str(image),
        )  # fmt: skip
        fs.disk.mkdir(mode=0o755)
        # noinit_itable: the kernel never zeroes the inode tables behind the step's back;
        # nobarrier: an fsync inside (dpkg syncs every file it unpacks) does not flush the
        # host's disk: the image is scratch, thrown away on a crash (measured: 1,500 small
        # fsynced files 4.4 s with barriers, 0.4 s without, 3.2 s on the host's ext4)
        _run("mount", "-t", "ext4", "-o", "loop,nodev,nosuid,noinit_itable,nobarrier",
             str(image), str(fs.disk))  # fmt: skip
        os.chmod(fs.disk, 0o755)  # noqa: S103 - root's; the step sees only what is below
        if lower is not None:
            _overlay(fs, lower)
    except BaseException:
        remove(fs)
        raise
    return fs


def _overlay(fs: StepFs, lower: Path) -> None:
    for p in (lower, fs.disk):
        if any(c in str(p) for c in ",:\\\n"):  # the option string's separators
            raise IsolationUnavailableError("the template layer store's path can't be mounted")
    upper, wk = fs.disk / "upper", fs.disk / "work"
    upper.mkdir(mode=0o700)
    wk.mkdir(mode=0o700)
    # the merged root takes the upper root's owner and mode: the parent's own
    st = os.lstat(lower)
    os.chown(upper, st.st_uid, st.st_gid)
    os.chmod(upper, st.st_mode & 0o7777)
    (fs.work / MERGED).mkdir(mode=0o700)
    # redirect_dir, index, metacopy off: the plain overlay every kernel has (renaming a
    # parent's directory gives EXDEV, which mv, pip and dpkg handle by copying)
    opts = (
        f"lowerdir={lower},upperdir={upper},workdir={wk},"
        "redirect_dir=off,index=off,metacopy=off,nodev,nosuid"
    )
    _run("mount", "-t", "overlay", "-o", opts, "moat-build", str(fs.work / MERGED))


def remove(fs: StepFs) -> None:
    """Unmount everything under ``fs.work`` and delete the image (idempotent)."""
    unmount_under(fs.work)
    with contextlib.suppress(FileNotFoundError):
        (fs.work / IMAGE).unlink()
    for d in (fs.work / MERGED, fs.disk):
        with contextlib.suppress(FileNotFoundError):
            d.rmdir()


def mounts_under(path: Path) -> list[Path]:
    """Mount points below ``path`` in this mount namespace, the latest mounted first."""
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) > 4:
                point = _unescape(fields[4])
                if point.startswith(prefix):
                    found.append(Path(point))
    return found[::-1]


def unmount_under(path: Path) -> int:
    """Unmount every mount below ``path`` (the overlay before the disk under it): plainly,
    else detached (``umount -l``: gone from view now, freed with its last user, and the
    loop device with it). OSError if one stays."""
    count = 0
    for point in mounts_under(path):
        if _umount(point, lazy=False) or _umount(point, lazy=True):
            count += 1
    left = mounts_under(path)
    if left:
        raise OSError(f"could not unmount {len(left)} build file system(s)")
    return count


def _umount(point: Path, lazy: bool) -> bool:
    argv = ["umount", *(["-l"] if lazy else []), "--", str(point)]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=_TIMEOUT_S, env=_ENV, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("umount failed: %s", exc)
        return False
    if proc.returncode != 0:
        log.warning("umount failed: %s", proc.stderr.decode(errors="replace")[-300:])
    return proc.returncode == 0


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (``\\040`` for a space)."""
    if "\\" not in field:
        return field
    out, i = bytearray(), 0
    raw = field.encode("utf-8", "surrogateescape")
    while i < len(raw):
        digits = raw[i + 1 : i + 4]
        if raw[i] == 0x5C and len(digits) == 3 and digits.isdigit():
            out.append(int(digits, 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def _run(*argv: str) -> None:
    """A host tool; IsolationUnavailableError if it fails (details to the log, inv. 8)."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, timeout=_TIMEOUT_S, env=_ENV, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("%s failed: %s", argv[0], exc)
        raise IsolationUnavailableError(
            "a build step's size-capped file system could not be set up"
        ) from None
    if proc.returncode != 0:
        log.warning("%s failed: %s", argv[0], proc.stderr.decode(errors="replace")[-500:])
        raise IsolationUnavailableError(
            "a build step's size-capped file system could not be set up (template builds need"
            " loop devices, ext4 and overlayfs)"
        )
