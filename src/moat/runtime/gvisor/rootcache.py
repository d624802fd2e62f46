"""A template's gVisor root skeleton, built once per template and shared (issue 12).

Trust domain: host engine. On a template's root, the skeleton (:func:`rootfs.write_skeleton`)
holds a copy of the template's ``/etc`` (about 600 entries on the default template: 0.2-0.3 s
per sandbox when written per sandbox, measured) plus moat's synthetic files and the mount
points of the template's binds. None of it depends on the sandbox: it is built here once, into
the template's own directory (``<state>/templates/<id>/gvisor-roots/<key>``), atomically (a
temporary directory renamed into place; a sandbox that loses the race uses the winner's), and
every sandbox's bundle names it as its root through a symlink (the bundle's path stays
per-sandbox, so checkpoints compare and find their compat library as before).

The key hashes everything the skeleton is made from: the template root's identity, the host
name, the compat library's bytes, the operations that lay the template out and this module's
format. The skeleton is read-only to every sandbox (the OCI root is ``readonly``, the gofer
serves it read-only) and owned by root with no write bit for anyone else, so sandboxes that
share it share nothing writable. A sandbox with caller mounts needs mount points of its own
and builds its skeleton per sandbox, as before. The directory goes with its template
(``Store.remove``/``gc``); :func:`sweep` removes what a crashed build left.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Final

from moat.paths import state_dir
from moat.runtime.gvisor.rootfs import write_skeleton
from moat.runtime.rootlayout import Op

__all__ = ["ROOTS", "ensure", "sweep"]

#: The folder of a template's directory that holds its shared skeletons.
ROOTS: Final = "gvisor-roots"
#: Bumped whenever write_skeleton's output changes for the same inputs.
_FORMAT: Final = 1


def _key(source: str, hostname: str, preload: Path | None, ops: tuple[Op, ...]) -> str:
    st = os.lstat(source)
    lib = hashlib.sha256(preload.read_bytes()).hexdigest() if preload is not None else ""
    parts = [
        _FORMAT,
        [st.st_dev, st.st_ino, st.st_mtime_ns],
        hostname,
        lib,
        [[op.op, op.path, op.kind, op.target] for op in ops],
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def ensure(source: str, hostname: str, preload: Path | None, ops: tuple[Op, ...]) -> Path:
    """The shared skeleton of the template root ``source`` laid out by ``ops``; built now
    if missing. Blocking (run it in a thread)."""
    folder = Path(source).parent / ROOTS
    final = folder / _key(source, hostname, preload, ops)
    if final.is_dir():
        return final
    folder.mkdir(mode=0o755, exist_ok=True)
    tmp = folder / f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o700)
    try:
        write_skeleton(tmp / "root", hostname, preload=preload, template=ops, source=source)
        try:
            os.rename(tmp / "root", final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def sweep() -> int:
    """Remove the temporary skeletons of builds whose process is gone; return the count."""
    count = 0
    for tmp in (state_dir() / "templates").glob(f"*/{ROOTS}/.tmp-*"):
        pid = tmp.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            count += 1
    return count
