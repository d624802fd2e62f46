"""Read-only host mounts for the microVM: a per-start ext4 image of each directory.

Trust domain: host engine (root). The guest kernel has no 9p and virtiofs would need a host
daemon per sandbox, so a ``Mount`` is *copied* at start: :func:`build` resolves the directory
as root (0700 parents are fine: :func:`moat.runtime.mounts.resolve`), writes an ext4 image of
it with ``mke2fs -d`` (as the /usr image is built, see usrimage.py), opens it read-only and
unlinks it at once. QEMU gets the open fd (``-add-fd``) and attaches it as a read-only
virtio-blk disk with ``serial=moat-mN``; stage 2 of the guest's boot mounts it read-only,
nosuid, nodev at the mount's sandbox path before any user code runs (moat/guest/boot.py).

Consequences, documented in docs/: the sandbox sees the directory as it was at start (a
snapshot, not a live view); only read-only directory mounts are supported (a writable mount
or a single file is a :class:`PolicyError`); the bytes copied per start are capped by the
sandbox's ``disk_mb`` (a :class:`PolicyError` beyond); and a sandbox with mounts cold-boots
instead of restoring the template snapshot (the snapshot's device set has no extra disks).

Invariant 5: the image is unlinked before QEMU even starts, so it dies with QEMU's fd; a crash
between writing and unlinking leaves a ``.tmp-<pid>-*`` file that :func:`sweep` removes once
that pid is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
from pathlib import Path
from typing import Final

from moat.errors import PolicyError, SandboxError
from moat.runtime.microvm import artifacts
from moat.runtime.mounts import beyond_others, owner_error, resolve
from moat.runtime.spec import SANDBOX_GID, Mount

__all__ = ["SERIAL_PREFIX", "build", "sweep"]

log = logging.getLogger("moat.runtime.microvm")

#: Disk serial of mount N in the guest (``/sys/block/vdX/serial``): ``moat-m<N>``.
SERIAL_PREFIX: Final = "moat-m"
_BLOCK: Final = 4096
#: ext4 metadata on top of the data (inode tables, directories, bitmaps): generous.
_SLACK_BYTES: Final = 4 << 20
_MKE2FS_TIMEOUT_S: Final = 300


def _dir() -> Path:
    path = artifacts.root() / "mounts"
    path.mkdir(exist_ok=True, mode=0o700)
    return path


def _measure(m: Mount, root: str) -> tuple[int, int]:
    """(bytes the data takes in blocks, inodes) of the tree at ``root``; links not followed.

    PolicyError for an entry the image would open to the sandbox beyond its host mode:
    mke2fs -d keeps host owners and the guest's user is uid/gid 1000 (the rule all tiers that
    keep owners share: :func:`moat.runtime.mounts.beyond_others`). The image's root is
    root-owned (``root_owner=0:0``), so it is not checked here."""
    total, inodes = _BLOCK, 1
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            inodes += 1
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if beyond_others(st, writable=False):
                raise owner_error(m, os.path.relpath(os.path.join(dirpath, name), root), "microvm")
            total += -(-st.st_size // _BLOCK) * _BLOCK if st.st_size else 0
        total += _BLOCK * len(dirnames)
    return total, inodes


def build(mounts: tuple[Mount, ...], cap_mb: int) -> list[int]:
    """Open, unlinked, read-only images of ``mounts`` (in order); the caller closes the fds.

    Raises PolicyError for a mount this tier cannot give (writable, a file, over the cap),
    InvalidArgumentError for a missing or unreadable source (as on every tier).
    """
    sources = []
    for m in mounts:
        if not m.read_only:
            raise PolicyError(
                "the microvm tier supports read-only mounts only (copied in at start); use"
                " the container or gvisor tier for a writable one"
            )
        source = resolve(m, SANDBOX_GID)
        if not source.is_dir:
            raise PolicyError("the microvm tier mounts directories only, not single files")
        sources.append(source)
    sizes = [_measure(m, s.path) for m, s in zip(mounts, sources, strict=True)]
    if sum(b for b, _ in sizes) > cap_mb << 20:
        raise PolicyError(
            f"mounts on the microvm tier are copied in at start: at most {cap_mb} MiB in all"
            " (the sandbox's disk_mb)"
        )
    fds: list[int] = []
    try:
        for source, (data, inodes) in zip(sources, sizes, strict=True):
            fds.append(_image(source.path, data, inodes))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _image(root: str, data: int, inodes: int) -> int:
    path = _dir() / f".tmp-{os.getpid()}-{secrets.token_hex(8)}.img"
    size_kib = (data + inodes * 512 + _SLACK_BYTES + data // 10) // 1024
    argv = [
        "mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "moat-mount",
        "-m", "0", "-b", str(_BLOCK), "-N", str(inodes + 64), "-E", "root_owner=0:0",
        "-d", root, str(path), f"{size_kib}k",
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            timeout=_MKE2FS_TIMEOUT_S,
            check=False,
            env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"},
        )
        if proc.returncode != 0:
            # the details name host paths: the log gets them, the caller does not (inv. 8)
            log.warning("mke2fs failed: %s", proc.stderr.decode(errors="replace")[-500:])
            raise SandboxError("a mount could not be copied into the microVM")
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except subprocess.TimeoutExpired as exc:
        raise SandboxError("copying a mount into the microVM took too long") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sweep() -> int:
    """Remove images a crashed engine left between writing and unlinking them."""
    count = 0
    for tmp in _dir().glob(".tmp-*"):
        pid = tmp.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                count += 1
    return count
