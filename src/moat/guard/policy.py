"""The guard's policy and its findings: plain, frozen, validated values.

Trust domain: host engine. A ``GuardPolicy`` comes from the caller (trusted, but still
validated at this boundary); a ``Finding`` describes sandbox output and is safe to log: it
carries a label, a channel and a position, never the sensitive value itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moat.errors import InvalidArgumentError

Mode = Literal["redact", "block", "off"]

#: Name of the detector that matches registered values (and canaries) and their encodings.
EXACT = "exact"

#: Caps on what a caller may put in a policy (DESIGN invariant 6 spirit: bounded inputs).
MAX_ALLOW = 1000
MAX_ALLOW_LEN = 4096


@dataclass(frozen=True)
class Finding:
    """One sighting of sensitive data in output. Never holds the value.

    ``label``: the registered label, or the rule name for a pattern match.
    ``channel``: where it was seen ("stdout", "stderr", "result", "file", "egress", ...).
    ``detector``: ``"exact:<form>"`` (e.g. ``exact:base64``) or ``"rule:<name>"``.
    ``canary``: True when the value was made by ``Guard.canary`` (an alert, not a mistake).
    ``start``/``end``: character (or byte) offsets in the scanned text; for streams, offsets
    from the start of the stream's raw output.
    """

    label: str
    channel: str
    detector: str
    canary: bool
    start: int
    end: int


def _default_detectors() -> tuple[str, ...]:
    # Imported lazily: the rules module imports detect-secrets.
    from moat.guard.rules import DEFAULT_RULES

    return (EXACT, *DEFAULT_RULES)


@dataclass(frozen=True)
class GuardPolicy:
    """What the guard does with sensitive data found on the reply channel.

    ``mode``: ``"redact"`` (default) replaces each finding with ``[REDACTED:<label>]``;
    ``"block"`` raises ``LeakBlockedError`` and releases nothing; ``"off"`` passes output
    through untouched (named so the audit trail can record that the guard was off).
    ``detectors``: ``"exact"`` (registered values, canaries and their encodings) and rule
    names from ``moat.guard.rules.ALL_RULES``. Default: ``"exact"`` plus the default rules.
    ``allow``: exact strings that rule detectors may not report (e.g. a documented example
    key printed by a tool). It never unmasks a registered value or a canary.
    """

    mode: Mode = "redact"
    detectors: tuple[str, ...] = field(default_factory=_default_detectors)
    allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from moat.guard.rules import ALL_RULES

        if self.mode not in ("redact", "block", "off"):
            raise InvalidArgumentError('GuardPolicy.mode must be "redact", "block" or "off"')
        detectors = self.detectors
        if isinstance(detectors, str) or not isinstance(detectors, (tuple, list, frozenset, set)):
            raise InvalidArgumentError("GuardPolicy.detectors must be a sequence of names")
        names = tuple(detectors)
        for name in names:
            if not isinstance(name, str) or (name != EXACT and name not in ALL_RULES):
                raise InvalidArgumentError("GuardPolicy.detectors has an unknown detector name")
        allow = self.allow
        if isinstance(allow, str) or not isinstance(allow, (tuple, list, frozenset, set)):
            raise InvalidArgumentError("GuardPolicy.allow must be a sequence of strings")
        allowed = tuple(allow)
        if len(allowed) > MAX_ALLOW:
            raise InvalidArgumentError(f"GuardPolicy.allow may hold at most {MAX_ALLOW} entries")
        for item in allowed:
            if not isinstance(item, str) or not 0 < len(item) <= MAX_ALLOW_LEN:
                raise InvalidArgumentError(
                    f"GuardPolicy.allow entries must be strings of 1 to {MAX_ALLOW_LEN} characters"
                )
        # Normalise to tuples so the dataclass stays hashable and immutable.
        object.__setattr__(self, "detectors", tuple(dict.fromkeys(names)))
        object.__setattr__(self, "allow", allowed)
