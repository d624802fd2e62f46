"""Find sensitive data in one piece of text: exact values (all forms) and pattern rules.

Trust domain: host engine; the text is hostile sandbox output. Pure: no I/O, no state
besides the immutable indexes built from the registered values.

Exact matching works in two steps so that clean output (nearly all of it) costs one pass of
native code: a *fast filter* removes every whitespace character and runs a multi-literal
byte search (``moat.guard.literals``: hyperscan, else Aho-Corasick) over the result; only
when that finds a candidate does the *precise pass* rebuild the text with runs of up to
``MAX_GAP`` whitespace characters removed (longer runs become a separator), find matches
there and map them back to the original offsets. The filter can't miss: every precise match
is also a match of the fully squeezed pattern in the fully squeezed text.

Normalisation (issue 17 §5): matching is ASCII case-insensitive, and the text is searched
in up to four *readings*, each only where it can differ from the text: as is; folded
(NFKC look-alikes of ASCII to ASCII, zero-width characters and soft hyphens to spaces:
one character for one, offsets unchanged); with ANSI escape sequences as gaps; decoded
(``%XX``, ``\\xXX``, ``\\uXXXX``, ``\\UXXXXXXXX``, ``&#N;``, ``&#xN;``, ``&name;``, any mix,
with a map back to the text). ``hexdump -C`` lines are decoded to bytes and searched as a
file read is. A reading never replaces the text: a decoder that swallows characters
can't hide a value that is there as is. Every reading is one pass (linear).
"""

from __future__ import annotations

import re
import string
import unicodedata
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from html.entities import html5

import ahocorasick_rs

from moat.guard.budget import Budget
from moat.guard.encodings import byte_forms, text_forms
from moat.guard.literals import LiteralSet
from moat.guard.rules import Rule, RuleSet

#: Whitespace runs of at most this many characters are ignored when matching values
#: ("s e c r e t", one character per line with CRLF, base64 wrapped at 76 columns).
MAX_GAP = 8
#: A gap that holds ANSI escape sequences may be this long (raw characters), colour codes
#: included ("\x1b[0m\x1b[38;5;196m" is 15), with at most MAX_GAP whitespace characters.
MAX_NOISE_GAP = 16
#: Values shorter than this only match where they appear without inserted whitespace
#: (a 6-character password would otherwise match across ordinary words).
MIN_OBFUSCATED = 8
_WS = "\t\n\x0b\x0c\r "
#: Characters of each pattern the fast filter looks for.
FILTER_PREFIX = 16
_WS_BYTES = _WS.encode()
_WS_RUN = re.compile(f"[{re.escape(_WS)}]+")
#: ANSI escape sequences (bounded, so matching them is linear): CSI (colours, cursor), OSC
#: (titles, hyperlinks) and the two-character ones.
_ANSI = (
    r"\x1b\[[0-?]{0,32}[ -/]{0,8}[@-~]"
    r"|\x1b\][^\x07\x1b]{0,256}(?:\x07|\x1b\\)"
    r"|\x1b[@-Z\\-_]"
)
_ANSI_RE = re.compile(_ANSI)
_NOISY_RUN = re.compile(f"(?:[{re.escape(_WS)}]|{_ANSI})+")
#: Invisible characters put between a value's characters: zero-width space, non-joiner,
#: joiner, word joiner, BOM; soft hyphen. Read as whitespace (so gaps of them are ignored).
INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
#: Stands for a run longer than MAX_GAP in the precise pass; a noncharacter that values
#: may not contain, so no pattern can match across it unless it holds one itself.
SEPARATOR = "\uffff"
#: ASCII case folding (length-preserving, unlike ``str.lower``): matching ignores case.
_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
#: Where NFKC maps a character onto one ASCII character: Latin-1 and general punctuation
#: (no-break and other spaces), letterlike symbols, super/subscripts, enclosed and
#: circled alphanumerics, fullwidth forms, mathematical alphanumerics.
_FOLD_RANGES = ((0xA0, 0x2500), (0xFB00, 0xFFF0), (0x1D400, 0x1D800), (0x1F100, 0x1F200))
#: A line of ``hexdump -C``: offset, up to 16 hex pairs, the ASCII column (anywhere on a
#: line: output may put anything before the first one).
_HEXDUMP_LINE = re.compile(
    r"[0-9a-fA-F]{8}  ((?:[0-9a-fA-F]{2} {1,2}){1,16}) {0,50}\|[^\n]{0,16}\|\r?$", re.M
)
_HEX_PAIR = re.compile(r"[0-9a-fA-F]{2}")
#: One escaped character: ``%XX``, ``\xXX``, ``\uXXXX``, ``\UXXXXXXXX``, ``&#N;``,
#: ``&#xN;``, ``&name;``. The decoded reading replaces each with its character.
_ESCAPE = re.compile(
    r"%[0-9a-fA-F]{2}|\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})"
    r"|&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});"
)
_ESCAPE_CHARS = ("%", "\\", "&")

#: Maps a reading's offsets back to the text's: per segment (reading start, text start,
#: text end, one character standing for the whole segment).
OffsetMap = tuple[list[int], list[int], list[int], list[bool]]


def _unescape(token: str) -> str | None:
    """The character ``token`` (an ``_ESCAPE`` match) stands for, or None."""
    if token[0] == "%":
        return chr(int(token[1:], 16))
    if token[0] == "\\":
        cp = int(token[2:], 16)
    elif token[1] == "#":
        cp = int(token[3:-1], 16) if token[2] in "xX" else int(token[2:-1])
    else:
        char = html5.get(token[1:])
        return char if char is not None and len(char) == 1 else None
    return chr(cp) if cp <= 0x10FFFF else None


def decoded(text: str) -> tuple[str, OffsetMap] | None:
    """``text`` with every escaped character decoded (any mix of escapes), and the map back;
    None where nothing is escaped."""
    parts: list[str] = []
    v_starts: list[int] = []
    t_starts: list[int] = []
    t_ends: list[int] = []
    whole: list[bool] = []
    v = prev = 0
    for m in _ESCAPE.finditer(text):
        char = _unescape(m.group())
        if char is None:
            continue
        s, e = m.span()
        if s > prev:
            parts.append(text[prev:s])
            v_starts.append(v)
            t_starts.append(prev)
            t_ends.append(s)
            whole.append(False)
            v += s - prev
        parts.append(char)
        v_starts.append(v)
        t_starts.append(s)
        t_ends.append(e)
        whole.append(True)
        v += 1
        prev = e
    if not whole:
        return None
    if prev < len(text):
        parts.append(text[prev:])
        v_starts.append(v)
        t_starts.append(prev)
        t_ends.append(len(text))
        whole.append(False)
    return "".join(parts), (v_starts, t_starts, t_ends, whole)


def _back(omap: OffsetMap | None, q: int, *, end: bool) -> int:
    """Reading offset ``q`` in the text: the first character of its segment's span (or,
    with ``end``, one past the last)."""
    if omap is None:
        return q + 1 if end else q
    v_starts, t_starts, t_ends, whole = omap
    i = bisect_right(v_starts, q) - 1
    if whole[i]:
        return t_ends[i] if end else t_starts[i]
    pos = t_starts[i] + (q - v_starts[i])
    return pos + 1 if end else pos


@cache
def fold_table() -> dict[int, str]:
    """``str.translate`` table, one character for one: NFKC look-alikes of ASCII characters
    (fullwidth U+FF21, mathematical U+1D400, circled U+24B6 for ``A``) to them, invisible
    characters to a
    space. Offsets don't move, so matches map back one to one."""
    table = {ord(c): " " for c in INVISIBLE}
    for lo, hi in _FOLD_RANGES:
        for cp in range(lo, hi):
            ch = chr(cp)
            norm = unicodedata.normalize("NFKC", ch)
            if len(norm) == 1 and norm != ch and norm.isascii():
                table[cp] = norm
    return table


def lower(text: str) -> str:
    """``text`` with ASCII letters in lower case; nothing else changes (not even length)."""
    return text.translate(_LOWER)


@dataclass(frozen=True, slots=True)
class Hit:
    """A match: offsets into the scanned text, the label to show, and audit data."""

    start: int
    end: int
    label: str  # shown in the redaction marker
    audit_label: str  # reported in the Finding
    detector: str
    canary: bool


@dataclass(frozen=True, slots=True)
class Entry:
    """A registered value: what to look for and how to name a sighting."""

    value: str
    label: str
    audit_label: str
    canary: bool


def squeeze(text: str) -> str:
    """``text`` with runs of at most MAX_GAP whitespace removed and longer ones collapsed."""
    return _squeeze_with_map(text)[0]


def _squeeze_with_map(
    text: str, run: re.Pattern[str] = _WS_RUN
) -> tuple[str, list[int], list[int]]:
    """The precise squeeze, plus segment starts (squeezed, original) to map offsets back.

    With ``run=_NOISY_RUN``, ANSI escape sequences count as gap too (up to MAX_NOISE_GAP
    raw characters per gap, of which at most MAX_GAP whitespace)."""
    parts: list[str] = []
    sq_starts: list[int] = []
    orig_starts: list[int] = []
    sq = 0
    prev = 0
    for m in run.finditer(text):
        s, e = m.span()
        if s > prev:
            parts.append(text[prev:s])
            sq_starts.append(sq)
            orig_starts.append(prev)
            sq += s - prev
        long = e - s > MAX_GAP
        if long and run is not _WS_RUN and e - s <= MAX_NOISE_GAP:
            long = len(_ANSI_RE.sub("", m.group())) > MAX_GAP
        if long:
            parts.append(SEPARATOR)
            sq_starts.append(sq)
            orig_starts.append(s)
            sq += 1
        prev = e
    if prev < len(text):
        parts.append(text[prev:])
        sq_starts.append(sq)
        orig_starts.append(prev)
    return "".join(parts), sq_starts, orig_starts


def _pattern_key(form: str) -> str:
    return lower(squeeze(form).strip(SEPARATOR))


def _views(text: str) -> list[tuple[str, re.Pattern[str], OffsetMap | None]]:
    """The readings of ``text`` searched for values, with the gap pattern to squeeze each by
    and the map of its offsets back (None: the same offsets): the text itself; folded (NFKC
    look-alikes, invisible characters) where it has non-ASCII characters; with ANSI escape
    sequences as gaps where it has any; decoded, where characters are escaped. Escape
    sequences are never only removed: an ANSI sequence may swallow a value's characters
    ("\x1b[1234A"), so the plain reading stays."""
    views: list[tuple[str, re.Pattern[str], OffsetMap | None]] = [(text, _WS_RUN, None)]
    plain = text
    if not text.isascii():
        folded = text.translate(fold_table())
        if folded != text:
            views.append((folded, _WS_RUN, None))
            text = folded
    if "\x1b" in text:
        views.append((text, _NOISY_RUN, None))
    if any(c in plain for c in _ESCAPE_CHARS):
        dec = decoded(text)
        if dec is not None:
            views.append((dec[0], _WS_RUN, dec[1]))
    return views


class ExactIndex:
    """Multi-pattern index over every form of every registered value.

    ``binary=True`` indexes byte forms (UTF-8, UTF-16, UTF-32 ...) for data scanned as a
    latin-1 view of bytes (one character per byte, offsets are byte offsets). Matching is
    ASCII case-insensitive (patterns and text folded to lower case).
    """

    def __init__(self, entries: Sequence[Entry], *, binary: bool = False) -> None:
        self._meta: list[list[tuple[Entry, str, str]]] = []  # per key: (entry, form name, form)
        keys: dict[str, int] = {}
        for entry in entries:
            forms: dict[str, str]
            if binary:
                forms = {k: v.decode("latin-1") for k, v in byte_forms(entry.value).items()}
            else:
                forms = text_forms(entry.value)
            for name, form in forms.items():
                key = _pattern_key(form)
                if not key:
                    continue
                idx = keys.setdefault(key, len(keys))
                if idx == len(self._meta):
                    self._meta.append([])
                if all(e is not entry for e, _, _ in self._meta[idx]):
                    self._meta[idx].append((entry, name, form))
        self._keys = list(keys)
        #: Longest squeezed pattern; streams hold back enough raw text to contain it.
        self.longest = max((len(k) for k in self._keys), default=0)
        self._fast: LiteralSet | None = None
        self._precise: ahocorasick_rs.AhoCorasick | None = None
        if self._keys:
            # The filter only needs each pattern's first FILTER_PREFIX characters (a match
            # of the whole contains them): a smaller database, built faster.
            fast_keys = list(
                dict.fromkeys(
                    k.replace(SEPARATOR, "")[:FILTER_PREFIX].encode("utf-8", "surrogatepass")
                    for k in self._keys
                )
            )
            self._fast = LiteralSet(fast_keys)
            self._precise = ahocorasick_rs.AhoCorasick(self._keys)

    @property
    def window(self) -> int:
        """Raw characters a match can span: the longest pattern with a gap after each
        character (MAX_NOISE_GAP: whitespace, invisible characters, ANSI sequences)."""
        return self.longest * (MAX_NOISE_GAP + 1)

    def maybe(self, text: str) -> bool:
        """The fast filter: False means no registered value is in ``text`` in any form."""
        if self._fast is None:
            return False
        if text.isascii() and "\x1b" not in text:
            # Encode, then delete: whitespace is ASCII, so this equals deleting first;
            # bytes.translate is ~2x faster. bytes.lower folds ASCII only, like ``lower``.
            squeezed = text.encode("ascii").translate(None, _WS_BYTES).lower()
            if self._fast.any(squeezed):
                return True
            if not any(c in text for c in _ESCAPE_CHARS):
                return False
        for view, run, _ in _views(text):
            if run is _NOISY_RUN:
                view = _ANSI_RE.sub("", view)
            data = view.encode("utf-8", "surrogatepass").translate(None, _WS_BYTES).lower()
            if self._fast.any(data):
                return True
        return False

    def find(self, text: str, budget: Budget | None = None, *, decode: bool = True) -> list[Hit]:
        """Every (possibly overlapping) match of every form, in original offsets.

        ``decode``: also decode ``hexdump -C`` output in ``text`` and search the bytes."""
        hits: list[Hit] = []
        if decode and "  |" in text:
            hits += self._hexdump_hits(text)
        if self._precise is None or not self.maybe(text):
            return hits
        if budget is not None:
            budget.check()
        seen: set[tuple[int, int, str, str]] = set()
        for view, run, omap in _views(text):
            for h in self._find_in(view, run, omap):
                key = (h.start, h.end, h.audit_label, h.detector)
                if key not in seen:
                    seen.add(key)
                    hits.append(h)
        return hits

    def _find_in(self, text: str, run: re.Pattern[str], omap: OffsetMap | None) -> list[Hit]:
        assert self._precise is not None
        squeezed, sq_starts, orig_starts = _squeeze_with_map(text, run)

        def to_orig(q: int) -> int:
            i = bisect_right(sq_starts, q) - 1
            return orig_starts[i] + (q - sq_starts[i])

        hits: list[Hit] = []
        for idx, qs, qe in self._precise.find_matches_as_indexes(lower(squeezed), overlapping=True):
            start, end = to_orig(qs), to_orig(qe - 1) + 1
            key = self._keys[idx]
            spread = end - start != len(key)
            first, last = _back(omap, start, end=False), _back(omap, end - 1, end=True)
            suffix = "" if omap is None else "/decoded"
            for entry, name, form in self._meta[idx]:
                if spread and len(key) < MIN_OBFUSCATED and lower(text[start:end]) != lower(form):
                    continue
                hits.append(
                    Hit(
                        first,
                        last,
                        entry.label,
                        entry.audit_label,
                        f"exact:{name}{suffix}",
                        entry.canary,
                    )
                )
        return hits

    def _hexdump_hits(self, text: str) -> list[Hit]:
        """Values in ``hexdump -C`` output: the dumped bytes of each run of consecutive
        lines are searched (as latin-1, like file reads); a match redacts its lines whole."""
        hits: list[Hit] = []
        runs: list[list[re.Match[str]]] = []
        for m in _HEXDUMP_LINE.finditer(text):
            if runs and text[runs[-1][-1].end() : m.start()] in ("\n", "\r\n"):
                runs[-1].append(m)
            else:
                runs.append([m])
        for lines in runs:
            data = bytearray()
            line_of: list[int] = []
            for i, m in enumerate(lines):
                pairs = _HEX_PAIR.findall(m.group(1))
                data += bytes.fromhex("".join(pairs))
                line_of += [i] * len(pairs)
            for h in self.find(data.decode("latin-1"), decode=False):
                first, last = lines[line_of[h.start]], lines[line_of[h.end - 1]]
                hits.append(
                    Hit(
                        first.start(),
                        last.end(),
                        h.label,
                        h.audit_label,
                        h.detector + "/hexdump",
                        h.canary,
                    )
                )
        return hits


#: UTF-8 continuation bytes: deleting them leaves one byte per character.
_CONTINUATION = bytes(range(0x80, 0xC0))


def _char_offsets(data: bytes, offsets: Iterable[int]) -> dict[int, int]:
    """Byte offsets into UTF-8 ``data`` as character offsets, in one pass over ``data``."""
    out: dict[int, int] = {}
    prev_b = prev_c = 0
    for b in sorted(set(offsets)):
        prev_c += len(data[prev_b:b].translate(None, _CONTINUATION))
        prev_b = b
        out[b] = prev_c
    return out


#: Gates or anchors more frequent than one per this many bytes: search the whole text
#: (one RE2 pass) rather than sort and merge their windows in Python.
_DENSE = 64


def _regions(windows: Iterable[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Overlapping or touching windows merged, clipped to ``size``: each byte of the text is
    searched once per rule, however densely its gates or anchors occur (linear time)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(windows):
        hi = min(hi, size)
        if out and lo <= out[-1][1]:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        elif lo < hi:
            out.append((lo, hi))
    return out


def rule_hits(
    rules: RuleSet,
    text: str,
    pos: int = 0,
    allow: frozenset[str] = frozenset(),
    budget: Budget | None = None,
) -> list[Hit]:
    """Matches of the pattern rules in ``text[pos:]`` (``text[:pos]`` is lookbehind context).

    Offsets are relative to ``text``. Matches whose text is in ``allow`` are dropped. Linear
    time (issue 17 §3): each rule's regex (RE2) searches each byte at most once, within the
    merged windows around its gates or anchors, or over the whole text.
    """
    data = text.encode("utf-8", "surrogatepass")
    ascii_text = len(data) == len(text)
    bpos = pos if ascii_text else len(text[:pos].encode("utf-8", "surrogatepass"))
    found: list[tuple[int, int, Rule]] = []
    for rule, offsets, anchors in rules.candidates(data):
        if offsets is not None and len(offsets) * _DENSE < len(data):
            # Every match starts at a gate literal and is at most gate_window long.
            regions = _regions(((o, o + rule.gate_window) for o in offsets if o >= bpos), len(data))
        elif rule.anchor is not None and (anchors is None or len(anchors) * _DENSE < len(data)):
            if anchors is None:
                anchors = [a.span() for a in rule.anchor.finditer(data, bpos)]
            regions = _regions(
                ((max(bpos, s - rule.before), e + rule.after) for s, e in anchors if s >= bpos),
                len(data),
            )
        elif rule.region is not None:
            # One byte past each region: the rule's lookahead sees the next character.
            regions = _regions(
                ((m.span()[0], m.span()[1] + 1) for m in rule.region.finditer(data, bpos)),
                len(data),
            )
        else:
            # No windows, or windows so dense that they would cover the text anyway.
            regions = [(bpos, len(data))]
        seen: set[tuple[int, int]] = set()
        extended = -1  # end of the last match's extension
        for lo, hi in regions:
            for m in rule.pattern.finditer(data, lo, hi):
                start, end = m.span(rule.group) if rule.group <= rule.groups else m.span()
                if start < 0:
                    start, end = m.span()
                if rule.extend is not None and end == m.end():
                    if start < extended:
                        # Inside the last extension: the match and its extension are made of
                        # the extension's characters, so both end where it ended. Skipping
                        # keeps the extension linear ("eyJ" repeated: quadratic otherwise).
                        continue
                    ext = rule.extend.match(data, end)
                    if ext is not None:
                        end = ext.end()
                    extended = end
                if end <= start or (start, end) in seen:
                    continue
                seen.add((start, end))
                found.append((start, end, rule))
        if budget is not None:
            budget.check()
    if not found:
        return []
    if not ascii_text:
        chars = _char_offsets(data, [o for s, e, _ in found for o in (s, e)])
        found = [(chars[s], chars[e], r) for s, e, r in found]
    if allow:
        found = [(s, e, r) for s, e, r in found if text[s:e] not in allow]
    return [Hit(s, e, r.name, r.name, r.detector, False) for s, e, r in found]


@dataclass(frozen=True, slots=True)
class Interval:
    """Overlapping hits merged: one marker covers them all."""

    start: int
    end: int
    labels: tuple[str, ...]


def merge(hits: Iterable[Hit]) -> list[Interval]:
    """Union of overlapping hits (touching ones stay apart), sorted by start."""
    out: list[Interval] = []
    cur_s = cur_e = -1
    labels: set[str] = set()
    for h in sorted(hits, key=lambda h: (h.start, h.end)):
        if cur_s >= 0 and h.start < cur_e:
            cur_e = max(cur_e, h.end)
            labels.add(h.label)
            continue
        if cur_s >= 0:
            out.append(Interval(cur_s, cur_e, tuple(sorted(labels))))
        cur_s, cur_e, labels = h.start, h.end, {h.label}
    if cur_s >= 0:
        out.append(Interval(cur_s, cur_e, tuple(sorted(labels))))
    return out


def marker(labels: Sequence[str]) -> str:
    """The text that replaces a redacted span."""
    return f"[REDACTED:{','.join(labels)}]"


def render(text: str, intervals: Sequence[Interval], offset: int = 0) -> str:
    """``text`` with every interval (offsets relative to ``offset``) replaced by a marker."""
    parts: list[str] = []
    prev = 0
    for iv in intervals:
        s, e = iv.start - offset, iv.end - offset
        parts.append(text[prev:s])
        parts.append(marker(iv.labels))
        prev = e
    parts.append(text[prev:])
    return "".join(parts)
