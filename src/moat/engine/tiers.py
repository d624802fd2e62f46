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
        try:
            from moat.runtime.gvisor import GvisorRuntime  # type: ignore[attr-defined]
        except ImportError:
            return _Missing("gvisor", "the gvisor driver is not part of this build")
        return GvisorRuntime()  # type: ignore[no-any-return]
    if tier == "microvm":
        try:
            from moat.runtime.microvm import MicrovmRuntime  # type: ignore[attr-defined]
        except ImportError:
            return _Missing("microvm", "the microvm driver is not part of this build")
        return MicrovmRuntime()  # type: ignore[no-any-return]
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


class _Missing:
    """Stands for a tier whose driver is absent; probe() always says why."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self._reason = reason

    def probe(self) -> str | None:
        return self._reason

    async def start(self, spec: object) -> object:
        raise IsolationUnavailableError(
            f"isolation tier {self.name!r} is unavailable: {self._reason}"
        )

    def sweep(self) -> int:
        return 0
