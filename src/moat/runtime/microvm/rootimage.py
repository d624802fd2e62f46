"""A template's root as a read-only ext4 disk image for the microVM (issue 12).

Trust domain: host engine. Built lazily on a template's first microVM sandbox, with
``mke2fs -d`` straight from the template's (checked) root, into the template's own directory
(``<state>/templates/<id>/microvm-root.img``): one image per template id, built once even when
sandboxes start concurrently (a lock file), atomically (a temporary file renamed into place).
Its SHA-256, written beside it, keys the template's booted snapshot (snapshot.key). The guest
mounts it read-only, nosuid, nodev (moat/guest/init.py) and QEMU opens it ``readonly=on``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from moat.errors import IsolationUnavailableError, PolicyError
from moat.paths import state_dir

__all__ = ["IMAGE", "SNAPSHOTS", "ensure", "sweep"]

IMAGE = "microvm-root.img"
_DIGEST = IMAGE + ".sha256"
#: A template's own booted snapshots (snapshot.ensure's ``folder``), beside its image.
SNAPSHOTS = "microvm-snapshots"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _measure(root: Path) -> tuple[int, int]:
    """Bytes of regular files and the number of inodes under ``root`` (no symlink followed)."""
    total, inodes = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        inodes += (
            1
            + len(filenames)
            + sum(1 for n in dirnames if os.path.islink(os.path.join(dirpath, n)))
        )
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_size
    return total, inodes


#: The largest template root the microVM tier turns into a disk image (apparent bytes).
MAX_IMAGE_BYTES = 16 << 30


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def ensure(rootfs: Path) -> tuple[Path, str]:
    """The image of the template root ``rootfs`` and its digest, built now if missing.

    Blocking (run it in a thread): a first build of a 170 MB root takes a few seconds.
    """
    tdir = rootfs.parent
    image, digest = tdir / IMAGE, tdir / _DIGEST
    if image.is_file() and digest.is_file():
        return image, digest.read_text().strip()
    with _locked(tdir / f".{IMAGE}.lock"):
        if image.is_file() and digest.is_file():
            return image, digest.read_text().strip()
        tmp = tdir / f".{IMAGE}.tmp-{os.getpid()}"
        try:
            total, inodes = _measure(rootfs)
            if total > MAX_IMAGE_BYTES:  # apparent sizes: sparse files count whole here
                raise PolicyError(
                    f"microvm: the template's root is over {MAX_IMAGE_BYTES >> 30} GiB "
                    "(apparent size), too large for its disk image"
                )
            # ext4 metadata and block rounding: 15% plus 64 MiB headroom
            size_mb = int(total * 1.15) // (1 << 20) + 64
            argv = [
                "mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "moat-root",
                "-N", str(int(inodes * 1.2) + 1024), "-E", "root_owner=0:0",
                "-d", str(rootfs), str(tmp), f"{size_mb}M",
            ]  # fmt: skip
            proc = subprocess.run(argv, capture_output=True, timeout=3600, check=False)
            if proc.returncode != 0:
                # no host path in the message (invariant 8); the details go to the log
                raise IsolationUnavailableError("microvm: the template's disk image failed")
            tmp.chmod(0o644)  # QEMU runs as an unprivileged uid and opens it read-only
            sha = _sha256(tmp)
            digest.write_text(sha + "\n")
            os.replace(tmp, image)
        finally:
            tmp.unlink(missing_ok=True)
    return image, sha


def sweep() -> int:
    """Remove the temporary images and snapshots a crashed host process left in templates'
    directories (invariant 5); return the count."""
    count = 0
    base = state_dir() / "templates"
    leftovers = [*base.glob(f"*/.{IMAGE}.tmp-*"), *base.glob(f"*/{SNAPSHOTS}/.tmp-*")]
    for tmp in leftovers:
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                count += 1
    return count
