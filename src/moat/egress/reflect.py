"""Every spelling of a secret value a response may carry, and a streaming scrubber for them.

Trust domain: host engine, pure (no I/O). Responses of a bound host are untrusted: an API
that echoes the request back (an error page quoting the key, a debug endpoint, a JSON echo)
puts the substituted value inside the sandbox unless every form of it is caught before the
bytes leave the gateway (DESIGN invariant 3).

A value is matched in two ways, both compiled into one regular expression per broker:

- **per character**, case-insensitively, each character in any of its spellings, mixed
  freely: itself; JSON/JS escapes (``\\/``, ``\\"``, ``\\uXXXX``, ``\\xXX``, a backslash
  before punctuation); percent-encoding (``%XX``, double ``%25XX``, ``+`` for a space);
  HTML character references (decimal ``&#N;``, hex ``&#xN;``, up to 6 leading zeros, with
  or without ``;``, and every HTML5 named reference of the character). This covers JSON
  escaping, full and partial URL-encoding, HTML entities and upper/lower-casing at once;
- **exact forms** of :func:`moat.guard.encodings.byte_forms` not already covered: base64
  and base64url fragments at the three byte alignments (so a value inside a longer blob is
  found, with or without padding; line breaks between characters allowed, MIME-style),
  hex, reversed, UTF-16/32.

Matches are replaced by ``*`` of the same length (a Content-Length stays right); the
scrubber holds back ``longest possible match - 1`` bytes between chunks so a form split
across chunks is still caught. Clean chunks (nearly all) cost one hyperscan pass for the
first :data:`PREFIX` units of every form where hyperscan runs (the guard's matcher back
end); only a chunk it flags goes through Python's ``re`` for the exact spans. Without
hyperscan, ``re`` scans every chunk (~40 MB/s here: slower, same result).
"""

from __future__ import annotations

import html.entities
import re
import threading
from collections.abc import Iterable, Sequence

from moat.guard.encodings import byte_forms
from moat.guard.literals import backend

try:
    import hyperscan
except ImportError:  # pragma: no cover - depends on the platform's wheel
    hyperscan = None  # type: ignore[assignment]

__all__ = ["Reflections", "Scrubber"]

#: Leading zeros accepted in a numeric HTML character reference (bounded: the hold-back
#: window is the longest possible match).
_MAX_ZEROS = 6
_LINE_BREAK = rb"(?:\r?\n)?"
#: Units (characters of a value, bytes of an exact form) of each form's head that the
#: hyperscan prefilter looks for: the shortest value, so its whole spelling is checked.
PREFIX = 8


def _lit(data: bytes) -> bytes:
    """``data`` as a regex matching itself, for ``re`` and hyperscan alike: every byte but
    letters and digits as ``\\xHH`` (hyperscan expressions are C strings: no raw NUL)."""
    return b"".join(bytes((c,)) if bytes((c,)).isalnum() else b"\\x%02x" % c for c in data)


def _named_refs() -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name, text in html.entities.html5.items():
        if len(text) == 1 and 0x20 <= ord(text) < 0x7F:
            out.setdefault(ord(text), []).append(name)
    return out


_NAMED = _named_refs()


def _char(code: int) -> tuple[bytes, int]:
    """A regex for every spelling of the ASCII character ``code``, and its longest match."""
    c = bytes([code])
    hx = b"%02x" % code
    alts: list[tuple[bytes, int]] = [
        (_lit(c), 1),
        (rb"\\u00" + hx, 6),  # JSON / JS
        (rb"\\x" + hx, 4),  # JS, Python, C
        (b"%" + hx, 3),  # percent-encoding
        (b"%25" + hx, 5),  # ... twice
        (rb"&\x230{0,%d}%d;?" % (_MAX_ZEROS, code), 2 + _MAX_ZEROS + len(str(code)) + 1),
        (rb"&\x23x0{0,%d}%s;?" % (_MAX_ZEROS, hx), 3 + _MAX_ZEROS + 2 + 1),
    ]
    if not c.isalnum():
        alts.append((rb"\\" + _lit(c), 2))  # \/ \" \\ and friends
    if c == b" ":
        alts.append((rb"\+", 1))
    for name in _NAMED.get(code, []):
        alts.append((b"&" + _lit(name.encode()), 1 + len(name)))
    return b"(?:" + b"|".join(a for a, _ in alts) + b")", max(n for _, n in alts)


_CHARS = {code: _char(code) for code in range(0x20, 0x7F)}


def _value_patterns(value: bytes) -> list[tuple[bytes, int, bytes]]:
    """For every form of one value: its regex, its longest match, and a regex of the form's
    first :data:`PREFIX` units (every match of the form starts with a match of it)."""

    def spell(v: bytes) -> bytes:
        return b"(?i:" + b"".join(_CHARS[b][0] for b in v) + b")"

    def wrapped(form: bytes) -> bytes:
        return b"(?i:" + _LINE_BREAK.join(_lit(bytes([b])) for b in form) + b")"

    def exact(form: bytes) -> bytes:
        # ASCII case folded, as the guard matches (guard/encodings.py): an upper-cased hex
        # dump or a lower-cased base32 of the value is still the value.
        return b"(?i:" + _lit(form) + b")"

    # Dropping forms the spelling covers only saves time; for long values compiling the
    # spelling twice would cost more (~0.5 ms per character).
    spelled = re.compile(spell(value)) if len(value) <= 256 else None
    out = [(spell(value), sum(_CHARS[b][1] for b in value), spell(value[:PREFIX]))]
    for name, form in byte_forms(value.decode("ascii")).items():
        if spelled is not None and spelled.fullmatch(form):
            continue  # JSON, URL, HTML and case forms: already spelled out per character
        if name.startswith("base64"):
            out.append((wrapped(form), len(form) * 3, wrapped(form[:PREFIX])))
        else:
            out.append((exact(form), len(form), exact(form[:PREFIX])))
    return out


class _Prefilter:
    """Hyperscan block-mode database of the same expressions: does any match occur?"""

    def __init__(self, expressions: Sequence[bytes]) -> None:
        n = len(expressions)
        self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        self._db.compile(expressions=list(expressions), ids=list(range(n)), elements=n,
                         flags=[0] * n)  # fmt: skip
        self._local = threading.local()  # scratch space is per thread

    def any(self, data: bytes) -> bool:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self._db)

        def stop(*_: object) -> bool:
            return True  # a true return ends the scan

        try:
            self._db.scan(data, match_event_handler=stop, scratch=scratch)
        except hyperscan.ScanTerminated:
            return True
        return False


def _prefilter(expressions: Sequence[bytes]) -> _Prefilter | None:
    """A hyperscan prefilter, or None where hyperscan can't run or can't build it (then
    ``re`` scans everything: slower, never less exact)."""
    if not expressions or hyperscan is None or backend() != "hyperscan":
        return None
    try:
        return _Prefilter(expressions)
    except hyperscan.error:
        return None


class Reflections:
    """The compiled matcher of every form of a set of secret values (printable ASCII)."""

    def __init__(self, values: Iterable[bytes]) -> None:
        pats: list[tuple[bytes, int, bytes]] = []
        for v in sorted({v for v in values if v}):
            if not all(0x20 <= b < 0x7F for b in v):
                raise ValueError("secret values are printable ASCII")
            pats += _value_patterns(v)
        pats.sort(key=lambda p: -p[1])  # longest forms first at a shared start
        self.longest = max((n for _, n, _ in pats), default=0)
        self._re = re.compile(b"|".join(p for p, _, _ in pats)) if pats else None
        # The prefilter looks for the forms' heads only: whole spellings of long values make
        # hyperscan's compile time explode (tens of seconds at 64 characters).
        self._pre = _prefilter(sorted({h for _, _, h in pats}))

    @property
    def prefiltered(self) -> bool:
        """Whether clean data is skipped by a hyperscan pass."""
        return self._pre is not None

    def sub(self, data: bytes) -> tuple[bytes, int]:
        """``data`` with every match replaced by ``*`` of its length, and the match count."""
        if self._re is None or (self._pre is not None and not self._pre.any(data)):
            return data, 0
        hits = 0

        def star(m: re.Match[bytes]) -> bytes:
            nonlocal hits
            hits += 1
            return b"*" * (m.end() - m.start())

        return self._re.sub(star, data), hits


class Scrubber:
    """Streaming replacement of every form of secret values in response bytes.

    Matches become ``*`` of the same length, so a Content-Length stays right and the body
    can stream; ``longest possible match - 1`` bytes are held back between chunks so a form
    split across two chunks is still caught.
    """

    def __init__(self, values: Iterable[bytes] | Reflections) -> None:
        self._ref = values if isinstance(values, Reflections) else Reflections(values)
        self._keep = max(self._ref.longest - 1, 0)
        self._tail = b""
        self.hits = 0

    def feed(self, data: bytes) -> bytes:
        """Scrub a chunk; returns the bytes that are safe to pass on now."""
        buf, n = self._ref.sub(self._tail + data)
        self.hits += n
        cut = max(0, len(buf) - self._keep)
        self._tail = buf[cut:]
        return buf[:cut]

    def flush(self) -> bytes:
        """The held-back bytes at the end of a body."""
        out, n = self._ref.sub(self._tail)
        self.hits += n
        self._tail = b""
        return out
