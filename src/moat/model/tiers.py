"""Isolation tiers and trust levels: the names, defined once, and the pure mapping between them."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from moat.errors import InvalidArgumentError

#: Isolation tiers, shallowest first.
TIERS: tuple[str, ...] = ("container", "gvisor", "microvm")
#: Trust levels a caller may name.
TRUST_LEVELS: tuple[str, ...] = ("trusted", "semi-trusted", "untrusted")
#: When in doubt, deeper (DESIGN): the default trust level is "untrusted" -> microvm.
DEFAULT_TRUST = "untrusted"
TRUST_TO_TIER: Mapping[str, str] = MappingProxyType(
    {"trusted": "container", "semi-trusted": "gvisor", "untrusted": "microvm"}
)
#: Guard modes (moat.guard.GuardPolicy.mode).
GUARD_MODES: tuple[str, ...] = ("redact", "block", "off")
#: Languages run_code and contexts accept.
LANGUAGES: tuple[str, ...] = ("python", "bash", "js", "ts")


def choose_tier(isolation: str | None, trust: str) -> str:
    """The tier for a sandbox: ``isolation`` if given, else the one ``trust`` maps to."""
    if isolation is not None:
        if isolation not in TIERS:
            raise InvalidArgumentError(f"isolation must be one of {', '.join(TIERS)}")
        return isolation
    if trust not in TRUST_TO_TIER:
        raise InvalidArgumentError(f"trust must be one of {', '.join(TRUST_TO_TIER)}")
    return TRUST_TO_TIER[trust]
