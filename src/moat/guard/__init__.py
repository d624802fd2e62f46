"""moat's guard on the reply channel: scan and redact everything a sandbox hands back.

Trust domain: host engine. Input is hostile sandbox output (or a model's reply); output is
what may be shown to the caller and a model (DESIGN invariants 3, 4 and 8). Findings carry
labels and offsets, never values. See docs/guard.md.

::

    g = Guard(GuardPolicy(mode="redact"), sensitive=[(token, "GITHUB_TOKEN")], on_finding=audit)
    s = g.stream("stdout"); safe = s.feed(chunk); ...; tail = s.flush()
    g.redact_text(result_text, "result"); g.redact_bytes(file_bytes, "file")
    g.check_egress(request_bytes)           # the egress gateway: canaries and values
    moat.guard.redact(final_answer, sensitive=[(token, "GITHUB_TOKEN")])
"""

from __future__ import annotations

from collections.abc import Iterable

from moat.guard.budget import GuardBudgetError
from moat.guard.guard import Guard, GuardStream, SensitiveItem
from moat.guard.policy import Finding, GuardPolicy
from moat.guard.rules import ALL_RULES, DEFAULT_RULES

__all__ = [
    "ALL_RULES",
    "DEFAULT_RULES",
    "Finding",
    "Guard",
    "GuardBudgetError",
    "GuardPolicy",
    "GuardStream",
    "redact",
    "scan",
]


def scan(
    text: str, sensitive: Iterable[SensitiveItem] = (), *, policy: GuardPolicy | None = None
) -> list[Finding]:
    """Findings in ``text`` (e.g. an agent's final answer), outside any sandbox.

    ``sensitive``: ``(value, label)`` pairs or bare values. Channel of findings: "reply".
    """
    return Guard(policy, sensitive).scan_text(text, "reply")


def redact(
    text: str, sensitive: Iterable[SensitiveItem] = (), *, policy: GuardPolicy | None = None
) -> str:
    """``text`` with every finding replaced by ``[REDACTED:<label>]`` ("redact" mode only:
    a block policy raises ``LeakBlockedError``, an "off" policy returns ``text``)."""
    return Guard(policy, sensitive).redact_text(text, "reply")
