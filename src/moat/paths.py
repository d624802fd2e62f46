"""Where moat keeps its state on the host (kernels, agent copies, audit DB, scratch)."""

from __future__ import annotations

import os
from pathlib import Path


def audit_db() -> Path:
    """The audit store: ``$MOAT_AUDIT_DB``, else ``<state dir>/audit.db``."""
    env = os.environ.get("MOAT_AUDIT_DB")
    return Path(env) if env else state_dir() / "audit.db"


def state_dir() -> Path:
    """moat's state directory: ``$MOAT_STATE_DIR``, else /var/lib/moat for root, else XDG.

    Every ancestor must be traversable by the unprivileged sandbox uid, because bubblewrap
    binds from here after dropping privileges; so the default for root is not under /root.
    """
    env = os.environ.get("MOAT_STATE_DIR")
    if env:
        path = Path(env)
    elif os.geteuid() == 0:
        path = Path("/var/lib/moat")
    else:
        xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        path = Path(xdg) / "moat"
    path.mkdir(parents=True, exist_ok=True, mode=0o755)
    return path
