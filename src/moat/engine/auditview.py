"""The audit trail as a caller reads it: every string guarded on the way out (invariant 4).

Trust domain: host engine. Audit rows hold text a sandbox chose (a refused request's method
and host, an error's name). The store scrubs it with the sandbox's guard when it is written;
reading guards it again, because a row may predate a value's registration or come from a
writer without a guard:

* ``sbx.audit()``: every string field passes that sandbox's guard (``scrub_text``: redacted
  whatever the guard's mode; a canary is reported as a finding, which is itself audited);
* ``moat audit`` (no live sandbox): a guard with the default rules, plus canaries' shapes
  (:data:`moat.guard.canary.SHAPES`, case folded); what it redacts is named on stderr.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from moat.guard import Guard, GuardPolicy
from moat.guard.canary import SHOWN_LABEL, shape_spans
from moat.store import AuditLog

CHANNEL = "audit"
Scrub = Callable[[str], str]
Row = dict[str, Any]


def guard_rows(rows: list[Row], scrub: Scrub) -> list[Row]:
    """``rows`` with every string value passed through ``scrub`` (keys are ours)."""
    return [{k: scrub(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows]


def attach_scrubber(audit: object, sandbox_id: str, guard: Guard) -> None:
    """Have the store scrub ``sandbox_id``'s own text with ``guard`` before writing it."""
    set_scrubber = getattr(audit, "set_scrubber", None)
    if set_scrubber is not None:
        set_scrubber(sandbox_id, guard.scrub_text)


async def sandbox_audit(
    session: Any, audit: AuditLog, *, denied_only: bool, limit: int
) -> list[Row]:
    """A live sandbox's rows, read off the event loop, guarded by its own guard."""
    rows = await asyncio.to_thread(
        audit.query, sandbox_id=session.id, denied_only=denied_only, limit=limit
    )
    guard = session.guard
    scrub_text = getattr(guard, "scrub_text", None)
    if scrub_text is None:  # not a moat Guard: fall back on the default one (fail closed)
        scrub_text = Guard(GuardPolicy()).scrub_text
    return await asyncio.to_thread(guard_rows, rows, lambda text: scrub_text(text, CHANNEL))


def guard_trail(rows: list[Row], live: Callable[[str], Guard | None]) -> list[Row]:
    """Rows of many sandboxes, each guarded by its sandbox's own guard while it lives
    (``live(sandbox_id)``), else by the offline one (default rules, canaries' shapes)."""
    offline = OfflineScrub()
    out: list[Row] = []
    for row in rows:
        guard = live(str(row.get("sandbox_id", "")))
        scrub: Scrub = offline
        if guard is not None:
            scrub = functools.partial(guard.scrub_text, channel=CHANNEL)
        out.append({k: scrub(v) if isinstance(v, str) else v for k, v in row.items()})
    return out


class OfflineScrub:
    """The guard of a reader with no live sandbox: default rules and canaries' shapes.
    ``seen`` counts what it redacted, by label (shown labels only: traps stay anonymous)."""

    def __init__(self) -> None:
        self._guard = Guard(GuardPolicy(), on_finding=self._found)
        self.seen: dict[str, int] = {}

    def _found(self, finding: Any) -> None:
        self.seen[finding.label] = self.seen.get(finding.label, 0) + 1

    def __call__(self, text: str) -> str:
        text = self._guard.scrub_text(text, CHANNEL)
        spans = shape_spans(text)
        if not spans:
            return text
        out: list[str] = []
        prev = 0
        for start, end, kind in spans:
            label = SHOWN_LABEL[kind]
            self.seen[label] = self.seen.get(label, 0) + 1
            out += [text[prev:start], f"[REDACTED:{label}]"]
            prev = end
        return "".join(out) + text[prev:]
