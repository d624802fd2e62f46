"""Fetch Debian's cloud kernel with apt, unpack it, extract an uncompressed vmlinux and modules.

Trust domain: host engine, one-time setup only (``python -m moat.runtime.microvm.setup``).
Nothing here runs at sandbox start. The package comes from the host's configured apt sources
(signed by Debian), so its contents are trusted like any installed package.
"""

from __future__ import annotations

import gzip
import lzma
import re
import subprocess
from pathlib import Path

from moat.errors import IsolationUnavailableError

#: apt's meta-package; it depends on the current versioned image package.
META_PACKAGE = "linux-image-cloud-amd64"
#: Modules the guest loads, in dependency order (checked against each module's depends=).
MODULES = ("virtio_ring", "virtio", "virtio_mmio", "virtio_console", "virtio_blk")
_MODULE_DIRS = {
    "virtio_ring": "drivers/virtio",
    "virtio": "drivers/virtio",
    "virtio_mmio": "drivers/virtio",
    "virtio_console": "drivers/char",
    "virtio_blk": "drivers/block",
}
_TIMEOUT = 600


def _run(argv: list[str], cwd: Path | None = None, stdin: bytes | None = None) -> bytes:
    try:
        proc = subprocess.run(
            argv, cwd=cwd, input=stdin, capture_output=True, timeout=_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IsolationUnavailableError(f"microvm setup: {argv[0]} failed to run") from exc
    if proc.returncode != 0 and argv[0] != "lz4":
        raise IsolationUnavailableError(
            f"microvm setup: {argv[0]} exited with {proc.returncode}: "
            + proc.stderr.decode(errors="replace")[-300:]
        )
    return proc.stdout


def image_package() -> str:
    """The versioned image package apt currently offers for the cloud meta-package."""
    out = _run(["apt-cache", "depends", META_PACKAGE]).decode()
    match = re.search(r"Depends:\s*(linux-image-[0-9][\w.+-]*-cloud-amd64)\b", out)
    if not match:
        raise IsolationUnavailableError("microvm setup: apt offers no cloud kernel image")
    return match.group(1)


def download_and_unpack(package: str, workdir: Path) -> Path:
    """``apt-get download`` the package into workdir and ``dpkg -x`` it; return the tree."""
    workdir.mkdir(parents=True, exist_ok=True, mode=0o755)
    _run(["apt-get", "download", package], cwd=workdir)
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if not debs:
        raise IsolationUnavailableError("microvm setup: the kernel package did not download")
    tree = workdir / "tree"
    _run(["dpkg", "-x", str(debs[-1]), str(tree)])
    return tree


def release_of(tree: Path) -> str:
    releases = sorted(p.name for p in (tree / "lib" / "modules").iterdir())
    if len(releases) != 1:
        raise IsolationUnavailableError("microvm setup: unexpected kernel package layout")
    return releases[0]


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """Find the compressed payload inside a bzImage and decompress it to the ELF vmlinux.

    Like the kernel's scripts/extract-vmlinux: try every known magic at every offset and keep
    the first result that is an ELF file. QEMU's microvm boots the ELF directly (faster than
    having the guest decompress itself under TCG).
    """
    candidates: list[tuple[bytes, str]] = [
        (b"\x02\x21\x4c\x18", "lz4"),
        (b"\x1f\x8b\x08", "gzip"),
        (b"\xfd7zXZ\x00", "xz"),
    ]
    for magic, kind in candidates:
        start = 0
        while (pos := vmlinuz.find(magic, start)) != -1:
            start = pos + 1
            try:
                out = _decompress(kind, vmlinuz[pos:])
            except (OSError, EOFError, lzma.LZMAError):
                continue
            if out[:4] == b"\x7fELF":
                return out
    raise IsolationUnavailableError("microvm setup: could not extract vmlinux from the kernel")


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return gzip.decompress(data)
    if kind == "xz":
        return lzma.LZMADecompressor().decompress(data)
    # The kernel uses lz4's legacy frame; the lz4 tool reads it and stops at trailing bytes
    # (exiting non-zero, which _run tolerates for lz4 only: the ELF check decides).
    return _run(["lz4", "-dc"], stdin=data)


def collect_modules(tree: Path, release: str) -> dict[str, bytes]:
    """Read the guest's modules (uncompressed .ko files) and check their dependency order."""
    base = tree / "lib" / "modules" / release / "kernel"
    mods: dict[str, bytes] = {}
    for name in MODULES:
        path = base / _MODULE_DIRS[name] / f"{name}.ko"
        if not path.is_file():
            raise IsolationUnavailableError(f"microvm setup: kernel module {name} missing")
        data = path.read_bytes()
        deps = re.search(rb"depends=([\w,]*)\0", data)
        for dep in deps.group(1).decode().split(",") if deps and deps.group(1) else []:
            if dep not in mods:
                raise IsolationUnavailableError(
                    f"microvm setup: module {name} needs {dep}, which is not loaded before it"
                )
        mods[name] = data
    return mods
