"""A compatibility library for gVisor sandboxes: coreutils' ``statx`` calls (see the C file).

Trust domain: host engine. The library is built once from ``statx_compat.c`` with the host's C
compiler into the state directory (``make install`` does it; the first gVisor sandbox does it
otherwise) and copied into each sandbox's root skeleton, where ``/etc/ld.so.preload`` names it.
It runs inside the sandbox with the sandbox's own rights: a convenience, not a security layer.
Without a compiler the sandbox still starts, and ``moat doctor`` says that ``ls`` will fail.

    python -m moat.runtime.gvisor.setup     # build it now
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from moat import paths

log = logging.getLogger("moat.runtime.gvisor")

SOURCE = Path(__file__).with_name("statx_compat.c")
#: Where the library is inside the sandbox (a root-owned, read-only file of the skeleton).
SANDBOX_PATH = "/.moat/statx_compat.so"

_lock = threading.Lock()
_warned = False


def library_path() -> Path:
    """Where the built library for this source lives (its name follows the source)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    # Not under state/gvisor: every entry there is a sandbox's working directory to the sweep.
    return paths.state_dir() / "gvisor-compat" / f"statx_compat-{digest}.so"


def build() -> Path | None:
    """The library, built if needed; None (with one warning) when no C compiler works."""
    global _warned
    target = library_path()
    if target.exists():
        return target
    with _lock:
        if target.exists():
            return target
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            if not _warned:
                log.warning("no C compiler: gVisor sandboxes start without %s", SOURCE.name)
                _warned = True
            return None
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
        os.close(fd)
        try:
            subprocess.run(
                [cc, "-shared", "-fPIC", "-O2", "-o", tmp, str(SOURCE)],
                check=True,
                capture_output=True,
                timeout=60,
            )
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)  # atomic: a concurrent engine sees all or nothing
        except (OSError, subprocess.SubprocessError) as exc:
            if not _warned:
                log.warning("could not build %s: %s", SOURCE.name, exc)
                _warned = True
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target


def problem() -> str | None:
    """What ``moat doctor`` reports: None when the library is (or can be) built."""
    return None if build() is not None else "no C compiler: coreutils ls/stat fail (statx)"
