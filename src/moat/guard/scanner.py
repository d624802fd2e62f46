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
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import ahocorasick_rs

from moat.guard.encodings import byte_forms, text_forms
from moat.guard.literals import LiteralSet
from moat.guard.rules import RuleSet

#: Whitespace runs of at most this many characters are ignored when matching values
#: ("s e c r e t", one character per line with CRLF, base64 wrapped at 76 columns).
MAX_GAP = 8
#: Values shorter than this only match where they appear without inserted whitespace
#: (a 6-character password would otherwise match across ordinary words).
MIN_OBFUSCATED = 8
_WS = "\t\n\x0b\x0c\r "
#: Characters of each pattern the fast filter looks for.
FILTER_PREFIX = 16
_WS_BYTES = _WS.encode()
_WS_RUN = re.compile(f"[{re.escape(_WS)}]+")
#: Stands for a run longer than MAX_GAP in the precise pass; a noncharacter that values
#: may not contain, so no pattern can match across it unless it holds one itself.
SEPARATOR = "\uffff"


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


def _squeeze_with_map(text: str) -> tuple[str, list[int], list[int]]:
    """The precise squeeze, plus segment starts (squeezed, original) to map offsets back."""
    parts: list[str] = []
    sq_starts: list[int] = []
    orig_starts: list[int] = []
    sq = 0
    prev = 0
    for m in _WS_RUN.finditer(text):
        s, e = m.span()
        if s > prev:
            parts.append(text[prev:s])
            sq_starts.append(sq)
            orig_starts.append(prev)
            sq += s - prev
        if e - s > MAX_GAP:
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
    return squeeze(form).strip(SEPARATOR)


class ExactIndex:
    """Multi-pattern index over every form of every registered value.

    ``binary=True`` indexes byte forms (UTF-8, UTF-16, UTF-32 ...) for data scanned as a
    latin-1 view of bytes (one character per byte, offsets are byte offsets).
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
        """Raw characters a match can span: the longest pattern with MAX_GAP between chars."""
        return self.longest * (MAX_GAP + 1)

    def maybe(self, text: str) -> bool:
        """The fast filter: False means no registered value is in ``text`` in any form."""
        if self._fast is None:
            return False
        # Encode, then delete: whitespace is ASCII, and no byte of a multi-byte UTF-8
        # sequence is ASCII, so this equals deleting first; bytes.translate is ~2x faster.
        squeezed = text.encode("utf-8", "surrogatepass").translate(None, _WS_BYTES)
        return self._fast.any(squeezed)

    def find(self, text: str) -> list[Hit]:
        """Every (possibly overlapping) match of every form, in original offsets."""
        if self._precise is None or not self.maybe(text):
            return []
        squeezed, sq_starts, orig_starts = _squeeze_with_map(text)

        def to_orig(q: int) -> int:
            i = bisect_right(sq_starts, q) - 1
            return orig_starts[i] + (q - sq_starts[i])

        hits: list[Hit] = []
        for idx, qs, qe in self._precise.find_matches_as_indexes(squeezed, overlapping=True):
            start, end = to_orig(qs), to_orig(qe - 1) + 1
            key = self._keys[idx]
            spread = end - start != len(key)
            for entry, name, form in self._meta[idx]:
                if spread and len(key) < MIN_OBFUSCATED and text[start:end] != form:
                    continue
                hits.append(
                    Hit(start, end, entry.label, entry.audit_label, f"exact:{name}", entry.canary)
                )
        return hits


def rule_hits(
    rules: RuleSet, text: str, pos: int = 0, allow: frozenset[str] = frozenset()
) -> list[Hit]:
    """Matches of the pattern rules in ``text[pos:]`` (``text[:pos]`` is lookbehind context).

    Offsets are relative to ``text``. Matches whose text is in ``allow`` are dropped.
    """
    hits: list[Hit] = []
    for rule, offsets, anchors in rules.candidates(text):
        seen: set[tuple[int, int]] = set()
        matches: list[re.Match[str]] = []
        if offsets is not None:
            # Every match starts at a gate literal and is at most gate_window long.
            for o in offsets:
                if o >= pos:
                    m = rule.pattern.match(text, o, min(len(text), o + rule.gate_window))
                    if m is not None:
                        matches.append(m)
        elif rule.anchor is not None:
            if anchors is None:
                anchors = [a.span() for a in rule.anchor.finditer(text, pos)]
            for a_start, a_end in anchors:
                if a_start < pos:
                    continue
                lo = max(pos, a_start - rule.before)
                hi = min(len(text), a_end + rule.after)
                matches.extend(rule.pattern.finditer(text, lo, hi))
        else:
            matches = list(rule.pattern.finditer(text, pos))
        for m in matches:
            start, end = m.span(rule.group) if rule.group <= (m.re.groups or 0) else m.span()
            if start < 0:
                start, end = m.span()
            if rule.extend is not None and end == m.end():
                ext = rule.extend.match(text, end)
                if ext is not None:
                    end = ext.end()
            if end <= start or (start, end) in seen or text[start:end] in allow:
                continue
            seen.add((start, end))
            hits.append(Hit(start, end, rule.name, rule.name, f"rule:{rule.name}", False))
    return hits


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
