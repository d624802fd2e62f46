"""User metadata of a file: ``user.e2b.<key>`` extended attributes (E2B-WIRE.md §2b).

One rule for every side: the server checks what a caller uploads (``X-Metadata-*``), the
agent keeps only what passes when it reads a file's attributes back, and the host checks
the agent's replies against it again (invariant 6: the agent may be the attacker's).
Keys and values are printable ASCII; a key is at most 246 bytes (the kernel's 255-byte
attribute name less the prefix); the whole set at most 4 KiB, counted as E2B counts it
(prefix + key + value per entry). Pure, stdlib only.
"""

from __future__ import annotations

# The agent starts in every sandbox: typing costs ~8 ms of imports, so it is only
# imported for the type checker (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: The attribute namespace; the key is what follows it.
PREFIX = "user.e2b."
MAX_KEY = 255 - len(PREFIX)
MAX_TOTAL = 4096


def _printable(s: str) -> bool:
    return s.isascii() and all(" " <= c <= "~" for c in s)


def problem(metadata: Any) -> str | None:
    """Why ``metadata`` is not a valid set (a short reason, no input echoed), or None."""
    if not isinstance(metadata, dict):
        return "metadata must be a map of strings"
    total = 0
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            return "metadata keys and values must be strings"
        if not key:
            return "a metadata key is empty"
        if len(key) > MAX_KEY:
            return f"a metadata key is longer than {MAX_KEY} bytes"
        if not _printable(key) or not _printable(value):
            return "metadata keys and values must be printable ASCII"
        total += len(PREFIX) + len(key) + len(value)
        if total > MAX_TOTAL:
            return f"the metadata is larger than {MAX_TOTAL} bytes in all"
    return None
