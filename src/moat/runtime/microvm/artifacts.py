"""Where the microVM tier keeps its one-time setup output, and how to check it is complete.

Trust domain: host engine. Layout under ``moat.paths.state_dir()/microvm/``::

    artifacts/            replaced atomically by setup (build in .build-*, then rename)
      vmlinux             uncompressed guest kernel (ELF)
      initrd-base.cpio    busybox, init, stage 2, modules, /etc
      usr.img             read-only ext4 copy of the host's /usr
      manifest.json       written last: its presence means the set is complete
    initrd/<hash>.cpio    base + agent archive, per agent version (cache)
    snapshots/<key>.bin   base VM migration streams (cache)
    run/<sandbox_id>.json one record per running VM, for sweep()
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from moat.paths import state_dir

SETUP_COMMAND = "python -m moat.runtime.microvm.setup"
MANIFEST_VERSION = 1


def root() -> Path:
    path = state_dir() / "microvm"
    path.mkdir(parents=True, exist_ok=True, mode=0o755)
    return path


@dataclass(frozen=True)
class Artifacts:
    """A complete setup: the paths of its files and a digest identifying them."""

    vmlinux: Path
    initrd_base: Path
    usr_image: Path
    kernel_release: str
    digest: str


def load() -> Artifacts | None:
    """The current artifacts, or None if setup has not completed."""
    base = root() / "artifacts"
    try:
        manifest = json.loads((base / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return None
    vmlinux, initrd, usr = base / "vmlinux", base / "initrd-base.cpio", base / "usr.img"
    if not all(p.is_file() for p in (vmlinux, initrd, usr)):
        return None
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return Artifacts(vmlinux, initrd, usr, str(manifest.get("kernel_release")), digest)
