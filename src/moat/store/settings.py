"""The audit store's bounds, from the environment (documented in docs/audit.md).

Trust domain: host engine; the values come from the operator. A malformed value is an
error at start, never a silent default (invariant 7).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from moat.errors import InvalidArgumentError


def _env_number(name: str, default: float, *, low: float, high: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgumentError(f"{name} must be a number") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgumentError(f"{name} must be between {low:g} and {high:g}")
    return value


@dataclass(frozen=True)
class AuditSettings:
    """``retention_days``/``max_mb``: rows older, or the oldest rows beyond this size, are
    pruned by the writer (0 turns that bound off). ``rows_per_second``/``burst``: new rows
    per sandbox (a token bucket; the excess is counted in one ``audit_dropped`` row per
    kind and call). ``window_s``: a finding row aggregates one label's sightings for one
    call, or this long when no call ends."""

    retention_days: float = 30.0
    max_mb: float = 256.0
    rows_per_second: float = 100.0
    burst: int = 1000
    window_s: float = 60.0

    @classmethod
    def from_env(cls) -> AuditSettings:
        """``MOAT_AUDIT_RETENTION_DAYS``, ``MOAT_AUDIT_MAX_MB``, ``MOAT_AUDIT_ROWS_PER_SECOND``,
        ``MOAT_AUDIT_BURST`` over the defaults."""
        d = cls()
        return cls(
            retention_days=_env_number(
                "MOAT_AUDIT_RETENTION_DAYS", d.retention_days, low=0, high=36500
            ),
            max_mb=_env_number("MOAT_AUDIT_MAX_MB", d.max_mb, low=0, high=1 << 20),
            rows_per_second=_env_number(
                "MOAT_AUDIT_ROWS_PER_SECOND", d.rows_per_second, low=0.1, high=1e6
            ),
            burst=int(_env_number("MOAT_AUDIT_BURST", d.burst, low=1, high=1e7)),
        )
