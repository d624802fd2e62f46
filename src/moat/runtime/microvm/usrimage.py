"""Build the guest's read-only /usr: an ext4 image of the host's /usr, minus bulky extras.

Trust domain: host engine, one-time setup. Debian's cloud kernel has no 9p, and virtiofs
would need a privileged host daemon per sandbox and cannot be migrated (no snapshots), so the
template's root is shared as a read-only disk image instead (QEMU ``readonly=on`` and a
read-only, nosuid mount in the guest). The image is a copy taken at setup time: rerun setup
after installing packages on the host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from moat.errors import IsolationUnavailableError

#: Parts of /usr that sandboxed code never needs and that would double the image size.
EXCLUDE = (
    "include",
    "src",
    "share/doc",
    "share/man",
    "share/info",
    "share/locale",
    "share/package-lists",
    "lib/debug",
    "lib/jvm",
    "lib/google-cloud-sdk",
    "lib/x86_64-linux-gnu/dri",
)


def _link_tree(src: Path, dst: Path) -> tuple[int, int]:
    """Mirror src into dst with hard links (copies across file systems); return (bytes, inodes)."""
    total, inodes = 0, 0
    excluded = {src / e for e in EXCLUDE}
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        dirnames[:] = [n for n in dirnames if here / n not in excluded]
        target = dst / here.relative_to(src)
        target.mkdir(exist_ok=True)
        st = here.lstat()
        os.chmod(target, st.st_mode & 0o7777)
        os.chown(target, st.st_uid, st.st_gid)
        inodes += 1
        for name in filenames + [n for n in dirnames if (here / n).is_symlink()]:
            s = here / name
            d = target / name
            inodes += 1
            if s.is_symlink():
                os.symlink(os.readlink(s), d)
                continue
            if not s.is_file():
                continue  # sockets, fifos, devices: never in the guest
            total += s.stat().st_size
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)
    return total, inodes


def build(usr: Path, image: Path, scratch: Path) -> None:
    """Create ``image`` (raw ext4, no journal) holding ``usr`` minus EXCLUDE."""
    tree = scratch / "usr"
    tree.mkdir(parents=True)
    try:
        total, inodes = _link_tree(usr, tree)
        # ext4 metadata and block rounding: 15% plus 256 MiB headroom is ample for /usr trees.
        size_mb = int(total * 1.15) // (1 << 20) + 256
        argv = [
            "mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "moat-usr",
            "-N", str(int(inodes * 1.2) + 1024), "-E", "root_owner=0:0",
            "-d", str(tree), str(image), f"{size_mb}M",
        ]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, timeout=3600, check=False)
        if proc.returncode != 0:
            raise IsolationUnavailableError(
                "microvm setup: mke2fs failed: " + proc.stderr.decode(errors="replace")[-300:]
            )
        image.chmod(0o644)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
