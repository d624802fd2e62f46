"""Builds the guard of one sandbox (invariant 4) and connects its findings to the audit trail."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from moat.guard import Finding, Guard, GuardPolicy

log = logging.getLogger("moat.guard")


def make_guard(
    sandbox_id: str,
    policy: GuardPolicy,
    sensitive: Mapping[str, str],
    audit: Any,
) -> Guard:
    """The guard for one sandbox: every secret it was given plus the caller's sensitive values.

    Findings (labels and channels, never values) go to the audit trail.
    """

    def on_finding(f: Finding) -> None:
        try:
            audit.record_finding(sandbox_id, f.label, f.channel, canary=f.canary)
        except Exception:
            log.exception("audit write failed")
        if f.canary:
            log.warning("sandbox %s: canary %s seen on %s", sandbox_id, f.label, f.channel)

    if policy.mode == "off":
        # Named as such and audited: whoever reads the trail sees the guard was off.
        log.warning("sandbox %s: the reply-channel guard is OFF", sandbox_id)
        audit.record_finding(sandbox_id, "guard:off", "policy", canary=False)
    return Guard(policy, [(v, label) for v, label in sensitive.items()], on_finding=on_finding)
