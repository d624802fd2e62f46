"""Canary tokens: unique, realistic-looking fake credentials to plant where an agent reads.

Trust domain: host engine. A canary is registered with the guard like a secret; its
appearance in output or in an egress request is an alert (``Finding.canary``). Each looks
like the real format so that rule-based scanners (and attackers) take it for one: an AWS key
id is ``AKIA`` + 16 base32 characters; a GitHub token is ``ghp_`` + 30 random base62
characters + a 6-character base62 CRC32 checksum, as GitHub's own tokens carry.
"""

from __future__ import annotations

import re
import secrets
import string
import zlib
from typing import Literal

from moat.errors import InvalidArgumentError

CanaryKind = Literal["aws", "github", "generic"]
KINDS: tuple[str, ...] = ("aws", "github", "generic")
#: The label a canary shows in a redaction marker: the same a real token's rule would
#: show, so the marker doesn't tell a reader which credentials are traps.
SHOWN_LABEL = {"aws": "aws", "github": "github_token", "generic": "secret"}

_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
_BASE32 = string.ascii_uppercase + "234567"


def _base62(number: int, width: int) -> str:
    out = ""
    while number:
        number, digit = divmod(number, 62)
        out = _BASE62[digit] + out
    return out.rjust(width, "0")


def make_canary(kind: str) -> str:
    """A fresh canary value of ``kind`` (cryptographically random, never repeated)."""
    if kind == "aws":
        return "AKIA" + "".join(secrets.choice(_BASE32) for _ in range(16))
    if kind == "github":
        body = "".join(secrets.choice(_BASE62) for _ in range(30))
        return "ghp_" + body + _base62(zlib.crc32(body.encode()), 6)
    if kind == "generic":
        return "sk_" + "".join(secrets.choice(_BASE62) for _ in range(40))
    raise InvalidArgumentError('canary kind must be "aws", "github" or "generic"')


#: What canaries look like, case folded (a host name is stored lower-cased), for readers
#: that have no guard of the sandbox that wrote them (``moat audit``): kind -> pattern.
#: The AWS and GitHub prefixes are distinctive enough to match anywhere; ``sk_`` only as a
#: whole token ("task_" holds it).
SHAPES = re.compile(
    r"(?P<aws>AKIA[A-Z2-7]{16})|(?P<github>ghp_[A-Za-z0-9]{36})"
    r"|(?<![A-Za-z0-9_])(?P<generic>sk_[A-Za-z0-9]{40})(?![A-Za-z0-9_])",
    re.IGNORECASE,
)


def shape_spans(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, kind)`` of every canary-shaped token in ``text``."""
    return [(m.start(), m.end(), m.lastgroup or "generic") for m in SHAPES.finditer(text)]
