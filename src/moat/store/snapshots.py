"""Snapshots on disk: one directory each under ``<state dir>/snapshots/`` (issue 11).

Trust domain: host engine (privileged). The layout, atomic commit (one rename), deletion
(rename, then remove) and start-up scan are the paused store's (``moat.store.paused``), keyed
by snapshot id (``snap-<hex>``) instead of sandbox id. A snapshot is never claimed: every
restore reads its checkpoint in place and leaves it unchanged.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from moat import paths
from moat.store.paused import PausedStore

__all__ = ["SnapshotStore", "new_snapshot_id"]


def new_snapshot_id() -> str:
    """A fresh snapshot id: ``snap-`` and 16 hex digits."""
    return "snap-" + secrets.token_hex(8)


class SnapshotStore(PausedStore):
    """The snapshots of one state directory."""

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = paths.state_dir() / "snapshots"
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self._root
