"""``moat audit --cluster``: every node's audit rows, merged, each naming its node.

Each node keeps its audit trail in its own state directory, written by its own engine, as a
single host does (no audit row crosses the network on the sandbox's path, and a node's trail
survives the server). Reading merges on demand: one short Ray task pinned to each live moat
node reads that node's store (the same read ``moat audit`` does on one host), and the rows
come back tagged with the node; they are guarded again where they are shown (invariant 4).
"""

from __future__ import annotations

from typing import Any

from moat.cluster import raycfg
from moat.cluster.resources import NODE

__all__ = ["cluster_audit"]


def _node_rows(filters: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """On a node: its host name and its audit rows (none if it has no store yet)."""
    import socket

    from moat.paths import audit_db
    from moat.store import AuditLog

    path = audit_db()
    if not path.exists():  # reading must not create an empty log
        return socket.gethostname(), []
    with AuditLog(path) as log:
        return socket.gethostname(), log.query(**filters)


def cluster_audit(
    address: str,
    *,
    sandbox_id: str | None = None,
    denied_only: bool = False,
    kind: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """The newest ``limit`` rows over every live moat node of the cluster, newest first;
    each row's ``node`` is ``<host>/<Ray node id, 12 hex digits>``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        ray.init(address=address, namespace=raycfg.NAMESPACE, log_to_driver=False,
                 configure_logging=False)  # fmt: skip
    task = ray.remote(_node_rows)
    filters = {"sandbox_id": sandbox_id, "denied_only": denied_only, "kind": kind,
               "limit": limit}  # fmt: skip
    listed = ray.nodes()  # type: ignore[no-untyped-call]
    nodes = [n["NodeID"] for n in listed if n.get("Alive") and (n.get("Resources") or {}).get(NODE)]
    refs = {
        nid: task.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False)
        ).remote(filters)
        for nid in nodes
    }
    rows: list[dict[str, Any]] = []
    for nid, ref in refs.items():
        host, part = ray.get(ref, timeout=60)
        rows += [{**row, "node": f"{host}/{nid[:12]}"} for row in part]
    rows.sort(key=lambda r: float(r.get("ts", 0)), reverse=True)
    return rows[:limit]
