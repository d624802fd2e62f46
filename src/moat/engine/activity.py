"""Recent calls of each sandbox, for an operator's view: code or command, guarded output.

Trust domain: host engine. The audit store keeps a code's hash, never the code (docs/audit.md);
an operator still wants to see what ran. This keeps, in memory only, the last calls of
recent sandboxes: the code or command line as the caller sent it, passed through the
sandbox's guard before it is kept (invariant 3: a registered value never sits here), and the
output the front door released (already guarded, invariant 4). Everything is bounded: calls
per sandbox, text per call, sandboxes remembered; nothing is written to disk.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["MAX_CALLS", "MAX_SANDBOXES", "MAX_SEGMENTS", "MAX_TEXT", "Activity", "Call"]

#: Calls kept per sandbox (the oldest dropped beyond).
MAX_CALLS = 20
#: Characters of code (or command) and of output kept per call.
MAX_TEXT = 8_192
#: Output pieces kept per call (alternating stdout/stderr would otherwise make one tuple
#: per character: the per-piece overhead, not the text, would fill memory).
MAX_SEGMENTS = 64
#: Sandboxes remembered (the least recently used forgotten beyond). The whole store is then
#: at most 100 x 20 x 16 Ki characters (32 Mi; up to 128 MiB of astral-plane text).
MAX_SANDBOXES = 100
_CUT = "\n[… cut: the dashboard keeps the first {n} characters]"


@dataclass
class Call:
    """One call: ``kind`` is ``code`` (with its language) or ``command``."""

    kind: str
    language: str
    source: str
    started: float = field(default_factory=time.time)
    output: list[tuple[str, str]] = field(default_factory=list)  # (stream, text)
    ended: float | None = None
    outcome: str = "running"  # running | ok | error | failed
    exit_code: int | None = None
    _chars: int = 0

    def add(self, stream: str, text: str) -> None:
        """Append guarded output, within MAX_TEXT characters."""
        room = MAX_TEXT - self._chars
        if room <= 0:
            return
        if len(text) > room:
            text = text[:room] + _CUT.format(n=MAX_TEXT)
        self._chars += len(text)
        if self.output and (self.output[-1][0] == stream or len(self.output) >= MAX_SEGMENTS):
            self.output[-1] = (stream, self.output[-1][1] + text)
        else:
            self.output.append((stream, text))

    def end(self, outcome: str, exit_code: int | None = None) -> None:
        if self.ended is None:
            self.ended = time.time()
            self.outcome = outcome
            self.exit_code = exit_code


class Activity:
    """The bounded in-memory record of recent calls, by sandbox id (thread-safe)."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._by_sandbox: collections.OrderedDict[str, collections.deque[Call]] = (
            collections.OrderedDict()
        )
        self._secrets: collections.OrderedDict[str, list[tuple[str, tuple[str, ...]]]] = (
            collections.OrderedDict()
        )

    def start(
        self, sandbox_id: str, kind: str, language: str, source: str, scrub: Callable[[str], str]
    ) -> Call:
        """Record a call; ``scrub`` is the sandbox's guard over text (applied here)."""
        cut = source[:MAX_TEXT]
        try:
            shown = scrub(cut)
        except Exception:  # noqa: BLE001 - fail closed: unscanned text is never kept
            shown = "[REDACTED:unscanned]"
        if len(source) > MAX_TEXT:
            shown += _CUT.format(n=MAX_TEXT)
        call = Call(kind, language, shown)
        with self._mu:
            calls = self._by_sandbox.get(sandbox_id)
            if calls is None:
                calls = self._by_sandbox[sandbox_id] = collections.deque(maxlen=MAX_CALLS)
                while len(self._by_sandbox) > MAX_SANDBOXES:
                    self._by_sandbox.popitem(last=False)
            else:
                self._by_sandbox.move_to_end(sandbox_id)
            calls.append(call)
        return call

    def note_secrets(self, sandbox_id: str, refs: list[tuple[str, tuple[str, ...]]]) -> None:
        """The names of a sandbox's brokered secrets and their hosts (never the values)."""
        with self._mu:
            self._secrets[sandbox_id] = list(refs)
            while len(self._secrets) > MAX_SANDBOXES:
                self._secrets.popitem(last=False)

    def secrets(self, sandbox_id: str) -> list[tuple[str, tuple[str, ...]]]:
        with self._mu:
            return list(self._secrets.get(sandbox_id, ()))

    def calls(self, sandbox_id: str) -> list[Call]:
        """The sandbox's recent calls, newest first."""
        with self._mu:
            return list(reversed(self._by_sandbox.get(sandbox_id, ())))
