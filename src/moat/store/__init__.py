"""moat.store: what the host keeps about sandboxes (DESIGN §4): today the audit trail.

Trust domain: host engine (privileged). The store writes under moat's state directory
(SQLite + files, mode 0600) and holds no secret value (invariant 3). Text it is handed may
come from a sandbox (a refused request's method and host, an error's name): it is scrubbed
by that sandbox's guard, escaped and bounded before it is written, and guarded again on its
way back to a caller (:mod:`moat.engine.auditview`). Tenants and keys, paused sandboxes,
snapshots and templates join this package as the server grows.

- :mod:`~moat.store.audit`: :class:`AuditLog`, the audit trail (egress decisions,
  executions, guard findings, lifecycle)
- :mod:`~moat.store.writer`: its background writer (batches, aggregation, retention)
- :mod:`~moat.store.settings`: retention and rate knobs (``MOAT_AUDIT_*``)
- :mod:`~moat.store.text`: escaping and bounding of stored text
- :mod:`~moat.store.keys`: the server's API keys (hashed) and their tenants
"""

from __future__ import annotations

from moat.store.audit import AuditLog, shared_audit_log
from moat.store.settings import AuditSettings

__all__ = ["AuditLog", "AuditSettings", "shared_audit_log"]
