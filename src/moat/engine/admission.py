"""Admission of a tenant's request under its policy: tiers, guard floor, egress ceiling.

Trust domain: host engine. Pure decisions over a resolved config; the front door calls them
before it starts anything, for every face (DESIGN §3: no rule depends on the face). Each
refusal is a PolicyError naming what was refused, never a quiet change of the request
(invariant 7: a weaker guard mode is refused, not raised to the floor).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from moat.egress import NetworkPolicy
from moat.engine.tenants import TenantPolicy
from moat.errors import PolicyError
from moat.model import SandboxConfig

__all__ = ["check_config", "check_network", "retry_after"]


def check_config(policy: TenantPolicy, config: SandboxConfig) -> None:
    """Refuse a config the tenant's policy does not allow (PolicyError)."""
    if not policy.tier_allowed(config.tier):
        allowed = ", ".join(policy.allowed_tiers or ())
        raise PolicyError(
            f"isolation tier {config.tier!r} is not allowed for this tenant (allowed: {allowed})"
        )
    if not policy.guard_allowed(config.guard.mode):
        raise PolicyError(
            f"guard mode {config.guard.mode!r} is weaker than this tenant's floor "
            f"({policy.guard_floor!r})"
        )
    if policy.guard_floor not in (None, "off") and (
        config.guard.detectors is not None or config.guard.allow
    ):
        # A floor is about what the guard catches, not its mode's name: a "block" guard with
        # fewer detectors, or values let through, would pass a mode check and catch less.
        raise PolicyError("this tenant's guard floor needs the default detectors and no allow list")
    check_network(
        policy,
        NetworkPolicy(config.network.allow_out, config.network.deny_out,
                      config.network.internet_access, config.network.allow_tcp),
    )  # fmt: skip


def check_network(policy: TenantPolicy, network: NetworkPolicy) -> None:
    """Refuse an egress policy that opens more than the tenant's ceiling (PolicyError)."""
    if policy.egress is None:
        return
    why = policy.egress.refusal(network)
    if why is not None:
        raise PolicyError(why)


def retry_after(end_ats: Iterable[dt.datetime]) -> float | None:
    """Seconds until the first of the tenant's sandboxes reaches its end (frees its room
    unless extended); None when it has none."""
    now = dt.datetime.now(dt.UTC)
    soonest = min(end_ats, default=None)
    if soonest is None:
        return None
    return max((soonest - now).total_seconds(), 1.0)
