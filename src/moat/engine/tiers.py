"""Which isolation tier a sandbox gets: trust level -> tier, never a silent downgrade."""

from __future__ import annotations

import functools

from moat.errors import InvalidArgumentError, IsolationUnavailableError
from moat.model.tiers import TIERS, TRUST_TO_TIER, choose_tier
from moat.runtime.base import Runtime

__all__ = ["TIERS", "TRUST_TO_TIER", "choose_tier", "require", "runtime_for"]


@functools.cache
def runtime_for(tier: str) -> Runtime:
    """The driver of ``tier`` (one instance per process)."""
    if tier == "container":
        from moat.runtime.container import ContainerRuntime

        return ContainerRuntime()
    if tier == "gvisor":
        from moat.runtime.gvisor import GvisorRuntime

        return GvisorRuntime()
    if tier == "microvm":
        from moat.runtime.microvm import MicroVMRuntime

        return MicroVMRuntime()
    raise InvalidArgumentError(f"unknown tier {tier!r}")


def require(tier: str) -> Runtime:
    """The runtime of ``tier`` if it can run here; IsolationUnavailableError (with why) if not."""
    runtime = runtime_for(tier)
    reason = runtime.probe()
    if reason is not None:
        raise IsolationUnavailableError(
            f"isolation tier {tier!r} is unavailable on this host: {reason}"
        )
    return runtime
