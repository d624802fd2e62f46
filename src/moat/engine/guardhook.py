"""Builds the guard of one sandbox (invariant 4) and connects its findings to the audit trail."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from moat.engine.auditview import attach_scrubber
from moat.guard import Finding, Guard, GuardPolicy

log = logging.getLogger("moat.guard")


def make_guard(
    sandbox_id: str,
    policy: GuardPolicy,
    sensitive: Mapping[str, str],
    audit: Any,
) -> Guard:
    """The guard for one sandbox: every secret it was given plus the caller's sensitive values.

    Findings (labels and channels, never values) go to the audit trail, which aggregates
    them per call; a canary is logged once per label and channel (a flood of sightings is
    one line, and its count is in the audit row). The store scrubs this sandbox's own text
    in audit rows with this guard (see moat.engine.auditview).
    """
    logged: set[tuple[str, str]] = set()

    def on_finding(f: Finding) -> None:
        try:
            audit.record_finding(sandbox_id, f.label, f.channel, canary=f.canary)
        except Exception:
            log.exception("audit write failed")
        if f.canary and (f.label, f.channel) not in logged and len(logged) < 1000:
            logged.add((f.label, f.channel))
            log.warning("sandbox %s: canary %s seen on %s", sandbox_id, f.label, f.channel)

    if policy.mode == "off":
        # Named as such and audited: whoever reads the trail sees the guard was off.
        log.warning("sandbox %s: the reply-channel guard is OFF", sandbox_id)
        audit.record_finding(sandbox_id, "guard:off", "policy", canary=False)
    guard = Guard(policy, [(v, label) for v, label in sensitive.items()], on_finding=on_finding)
    attach_scrubber(audit, sandbox_id, guard)
    return guard
