"""Raw bytes of a file that a live SQLite store in this process may have open.

Never ``path.read_bytes()`` such a file here: closing that descriptor drops every POSIX lock
this process holds on it, SQLite's included; another process then deletes the store's
``-wal`` and ``-shm`` under this one and the file ends up malformed (moat.store.health,
docs/audit.md). Another process's descriptors don't touch this one's locks.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def raw_bytes(path: Path) -> bytes:
    """``path``'s bytes as they are on disk, read by ``cat`` in its own process."""
    proc = subprocess.run(["cat", "--", str(path)], capture_output=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise FileNotFoundError(path)
    return proc.stdout
