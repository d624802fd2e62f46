"""Which isolation tier a sandbox gets: trust level -> tier, never a silent downgrade."""

from __future__ import annotations

import functools

from moat.errors import InvalidArgumentError, IsolationUnavailableError
from moat.runtime.base import Runtime

TIERS = ("container", "gvisor", "microvm")
#: When in doubt, deeper (DESIGN): the default trust level is "untrusted" -> microvm.
TRUST_TO_TIER = {"trusted": "container", "semi-trusted": "gvisor", "untrusted": "microvm"}


def choose_tier(isolation: str | None, trust: str) -> str:
    """The tier for a sandbox: ``isolation`` if given, else the one ``trust`` maps to."""
    if isolation is not None:
        if isolation not in TIERS:
            raise InvalidArgumentError(f"isolation must be one of {', '.join(TIERS)}")
        return isolation
    if trust not in TRUST_TO_TIER:
        raise InvalidArgumentError(f"trust must be one of {', '.join(TRUST_TO_TIER)}")
    return TRUST_TO_TIER[trust]


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
