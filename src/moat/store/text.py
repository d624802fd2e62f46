"""Stored text made inert and bounded (pure).

Trust domain: host engine; the input may be written by a sandbox (a method, a host name, an
error's name). Control, format (bidi overrides, zero-width) and separator characters are
escaped as ``\\xNN``/``\\uNNNN`` (a backslash as ``\\\\``, so an escape can't be forged),
and each field is capped at its own length.
"""

from __future__ import annotations

import re
import unicodedata

from moat.errors import InvalidArgumentError

#: Longest text stored in any column, and caps for the sandbox-chosen ones.
MAX_TEXT = 512
LIMITS = {"method": 64, "host": 256, "reason": 256, "error_name": 256, "label": 128}
#: At most this much of a text is scanned and escaped (the rest can't be stored anyway).
MAX_INPUT = 4096
_ESCAPE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_NEEDS_WORK = re.compile(r"[^\x20-\x5b\x5d-\x7e]")  # anything but printable ASCII minus "\"


def _escape_char(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if unicodedata.category(ch) not in _ESCAPE_CATEGORIES:
        return ch
    code = ord(ch)
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


def clip(text: str) -> str:
    """The part of a hostile text worth looking at (scanned, then escaped and capped)."""
    return text[:MAX_INPUT]


def inert(value: object, field: str = "") -> str | None:
    """``value`` as stored: escaped, then capped (``…`` marks a cut)."""
    if value is None:
        return None
    text = clip(value if isinstance(value, str) else str(value))
    if _NEEDS_WORK.search(text):
        text = "".join(_escape_char(c) for c in text)
    limit = LIMITS.get(field, MAX_TEXT)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def counter(value: object) -> int | None:
    """A non-negative integer column (bytes, milliseconds, ports)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError("audit counters must be integers")
    return max(0, min(value, 1 << 62))
