"""Builds the guard a session uses (invariant 4). Until moat.guard lands: pass-through."""

from __future__ import annotations

from typing import Any


class _PassStream:
    def feed(self, chunk: str) -> str:
        return chunk

    def flush(self) -> str:
        return ""


class PassThroughGuard:
    """No redaction. Only used until moat.guard is wired in; never for GuardPolicy(mode='off')."""

    def stream(self, channel: str) -> _PassStream:
        return _PassStream()

    def redact_text(self, text: str, channel: str) -> str:
        return text

    def redact_bytes(self, data: bytes, channel: str) -> bytes:
        return data


def make_guard(**_: Any) -> PassThroughGuard:
    return PassThroughGuard()
