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

from moat.guard.budget import Budget
from moat.guard.encodings import byte_forms, text_forms
from moat.guard.literals import LiteralSet
from moat.guard.rules import Rule, RuleSet

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

    def find(self, text: str, budget: Budget | None = None) -> list[Hit]:
        """Every (possibly overlapping) match of every form, in original offsets."""
        if self._precise is None or not self.maybe(text):
            return []
        if budget is not None:
            budget.check()
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
