"""What the clustered server keeps per node and per placed sandbox, and two small helpers
shared by its front door (``moat.cluster.door``) and its pause/resume (``moat.cluster.pausing``).

Trust domain: host engine (the server's).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from moat.cluster.paused import Held
from moat.errors import InvalidArgumentError

log = logging.getLogger("moat.cluster")

__all__ = ["_Node", "_Placed", "_remove_pg", "_tenant"]


@dataclass
class _Node:
    node_id: str
    handle: Any
    tiers: list[str]
    ready: asyncio.Task[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    watcher: asyncio.Task[None] | None = None
    paused: bool = False  # advertises the shared paused store (resources.PAUSED)


@dataclass
class _Placed:
    tenant: str
    node_id: str
    pg: Any
    token: int | None = None
    #: what a resume elsewhere needs and is never written down (invariant 3: memory only)
    held: Held = field(default_factory=Held)


def _remove_pg(pg: Any) -> None:
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(pg)
    except Exception:  # already gone with the cluster
        log.debug("placement group removal failed", exc_info=True)


def _tenant(tenant: Any) -> None:
    if not isinstance(tenant, str) or not 0 < len(tenant) <= 128:
        raise InvalidArgumentError("tenant must be a non-empty str")
