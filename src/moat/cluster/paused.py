"""Paused sandboxes across a cluster: one shared store, and the server's view of it (issue 13).

Trust domain: host engine (the server's, and each node's). A cluster pauses into one store
that the server and the nodes that may resume reach at a path of their own
(``--paused-dir``, ``$MOAT_PAUSED_DIR``: a shared directory such as NFS; on one machine, a
plain directory). Its layout is ``moat.store.paused``'s. The server creates a marker with a
random id at the store's root; each node reports the id it reads there, and the server pauses
on, or resumes onto, only a node that sees the very same store (invariant 7: a node that
can't keep the state is refused, never asked to pause into a store nobody else sees).

The server tracks the paused sandboxes (tenant, record, size) from the store itself: they
outlive their node (its loss costs nothing: the state is in the store) and the server. What
is never written down (secret and sensitive values: invariant 3) the server holds in memory
while it runs, as one host's engine does; after a restart of the server the caller gives
them again on resume.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from moat.engine.persist import KeyedLocks, Paused, load_paused
from moat.store.paused import PausedStore, owner_of

__all__ = ["ENV", "ClusterPaused", "Held", "configured_dir", "read_store_id"]

#: Where the shared paused store is (server and nodes; ``--paused-dir`` sets it).
ENV: Final = "MOAT_PAUSED_DIR"
#: The store's identity, at its root (ignored by the store's scan: a dot name).
MARKER: Final = ".moat-store-id"


def configured_dir() -> Path | None:
    """The shared paused store of this process (``$MOAT_PAUSED_DIR``), or None."""
    value = os.environ.get(ENV, "").strip()
    return Path(value) if value else None


def read_store_id(root: Path | None) -> str | None:
    """The id in the store's marker (None: no store, or not reachable from here)."""
    if root is None:
        return None
    try:
        value = (root / MARKER).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value if value.isalnum() and 0 < len(value) <= 64 else None


def _ensure_store_id(root: Path) -> str:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    found = read_store_id(root)
    if found is not None:
        return found
    part = root / f"{MARKER}.{secrets.token_hex(4)}"
    part.write_text(secrets.token_hex(16), encoding="ascii")
    try:
        os.link(part, root / MARKER)  # first writer wins; a racing one reads the winner's
    except FileExistsError:
        pass
    finally:
        part.unlink()
    value = read_store_id(root)
    if value is None:
        raise OSError("the paused store's marker can't be read back")
    return value


@dataclass
class Held:
    """What a paused sandbox needs on resume and is never written down (server memory)."""

    secrets: dict[str, str] = field(default_factory=dict)
    sensitive: Any = None
    face: dict[str, Any] = field(default_factory=dict)


class ClusterPaused:
    """The clustered server's paused sandboxes: loaded from the shared store at first use."""

    def __init__(self, root: Path) -> None:
        self.store = PausedStore(root)
        self.store_id = _ensure_store_id(root)
        self._paused: dict[str, Paused] | None = None
        self.held: dict[str, Held] = {}
        self.locks = KeyedLocks()
        #: what the first load's scan removed (half-written pauses of crashed processes)
        self.report: list[str] = []

    @property
    def is_loaded(self) -> bool:
        return self._paused is not None

    def loaded(self) -> dict[str, Paused]:
        """Every paused sandbox (disk I/O the first time: call it off the loop)."""
        if self._paused is None:
            self._paused, self.report = load_paused(self.store)
        return self._paused

    def find(self, tenant: str, sandbox_id: str) -> Paused | None:
        """The tenant's paused sandbox (invariant 11: another tenant's is unknown)."""
        entry = self.loaded().get(sandbox_id)
        return entry if entry is not None and entry.tenant == tenant else None

    def known(self, tenant: str, sandbox_id: str) -> bool:
        """Whether it is paused, from memory only (no disk: for end listeners)."""
        entry = None if self._paused is None else self._paused.get(sandbox_id)
        return entry is not None and entry.tenant == tenant

    def usage(self, tenant: str) -> int:
        """Bytes of paused state the tenant holds across the cluster."""
        return sum(p.size for p in self.loaded().values() if p.tenant == tenant)

    def add(self, entry: Paused, held: Held) -> None:
        if held.face and not entry.record.get("face"):
            entry.record["face"] = dict(held.face)  # what the face kept (auto-pause)
        self.loaded()[entry.sandbox_id] = entry
        self.held[entry.sandbox_id] = held

    def take(self, sandbox_id: str) -> Held | None:
        """Forget a paused sandbox (it resumed); what was held for it."""
        self.loaded().pop(sandbox_id, None)
        return self.held.pop(sandbox_id, None)

    def repair(self, pid: int, host: str) -> list[str]:
        """Repair the store's work left by a lost node's engine (process ``pid`` on the host
        whose token is ``host``): its unfinished resume goes back to paused, whole; its
        unfinished pause is removed (that sandbox was lost with its node). Disk I/O."""

        def abandoned(name: str) -> bool:
            return owner_of(name) == (pid, host)

        removed = self.store.scan(abandoned)
        if self._paused is not None:  # a resume put back: known again (its record is there)
            fresh, _ = load_paused(self.store, scan=False)
            for sid, entry in fresh.items():
                self._paused.setdefault(sid, entry)
        return removed

    def delete(self, sandbox_id: str) -> bool:
        """Forget a paused sandbox and delete its state (disk I/O: off the loop)."""
        self.take(sandbox_id)
        return self.store.delete(sandbox_id)
