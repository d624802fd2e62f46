"""The guard: one per sandbox, on every channel from the sandbox to the caller (invariant 4).

Trust domain: host engine. Everything fed in is hostile sandbox output; everything returned
is safe to release to the caller (and so to a model's context). Findings go to
``on_finding`` (the audit trail) and never carry the sensitive value.

Streams (see docs/guard.md for the reasoning):

* each stream holds back a fixed number of raw characters, ``Guard.window``, sized to the
  longest registered pattern with whitespace gaps (and to the longest rule match); a value
  split at any offset is still whole in the buffer when it is decided on. ``feed`` releases
  in batches: once the buffer holds ``2 * window`` characters, all but the last ``window``
  (block mode scans every chunk, so that a leak raises at once). The amount released by
  ``feed`` depends only on the lengths fed, never on whether the held tail looks like the
  beginning of a secret; only a *complete* match across the cut changes it (the match is
  released whole, as its marker): prefixes don't change what comes out;
* ``flush`` at the end of a call releases the rest, redacted: output is never held longer
  than one call. Flush every stream of a call after the call's last chunk;
* streams of one guard share an interleaving log of the last ``window`` characters in
  arrival order; a value split across stdout and stderr (interleaved) is found there and
  redacted in both streams, since each part is still in its own stream's held tail.
"""

from __future__ import annotations

import bisect
import collections
import secrets
import threading
import weakref
from collections.abc import Callable, Iterable

import ahocorasick_rs

from moat.errors import InvalidArgumentError, LeakBlockedError
from moat.guard import binary, png
from moat.guard.budget import Budget, GuardBudgetError
from moat.guard.canary import KINDS, SHOWN_LABEL, make_canary
from moat.guard.gcquiet import quiet_gc
from moat.guard.policy import EXACT, Finding, GuardPolicy
from moat.guard.rules import RULE_WINDOW, RuleSet, rule_set
from moat.guard.scanner import (
    SEPARATOR,
    Entry,
    ExactIndex,
    Hit,
    Interval,
    merge,
    render,
    rule_hits,
)

FindingCallback = Callable[[Finding], None]
SensitiveItem = tuple[str, str] | str

#: Bounds on registered values (validated at the boundary).
MIN_VALUE_LEN = 4
MAX_VALUE_LEN = 8192
MAX_VALUES = 10_000
MAX_LABEL_LEN = 64
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:@/-")
#: A rule match ending this close to the end of a stream's buffer may still grow.
RULE_MARGIN = 16
#: Raw characters of already released output kept as lookbehind context: for rules, and
#: for the line of ``hexdump -C`` output (79 characters) that a cut may split.
CONTEXT = 128
#: A stream never holds more than this waiting for a rule match to settle (the longest
#: rule, a private-key block, is capped at 16 KiB).
MAX_HOLD = 64 * 1024


def _check_channel(channel: object) -> str:
    if not isinstance(channel, str) or not 0 < len(channel) <= MAX_LABEL_LEN:
        raise InvalidArgumentError("guard channel must be a short non-empty string")
    return channel


def _check_label(label: object) -> str:
    if (
        not isinstance(label, str)
        or not 0 < len(label) <= MAX_LABEL_LEN
        or not set(label) <= _LABEL_CHARS
    ):
        raise InvalidArgumentError(
            "a sensitive value's label must be 1-64 characters of letters, digits and _.:@/-"
        )
    return label


def _check_value(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError("a sensitive value must be a string")
    if not MIN_VALUE_LEN <= len(value) <= MAX_VALUE_LEN:
        raise InvalidArgumentError(
            f"a sensitive value must be {MIN_VALUE_LEN} to {MAX_VALUE_LEN} characters long"
        )
    if SEPARATOR in value or not value.strip():
        raise InvalidArgumentError("a sensitive value may not be blank or hold U+FFFF")
    return value


class _Indexes:
    """The matchers for the current set of values; the binary one is built on first use."""

    def __init__(self, entries: list[Entry], rules: RuleSet) -> None:
        self._entries = tuple(entries)
        self.text = _shared_index(self._entries, binary=False)
        self.rules = rules
        # Streams are text: the window covers the text forms and the rules.
        self.window = max(self.text.window, RULE_WINDOW) + RULE_MARGIN
        self._binary: ExactIndex | None = None

    @property
    def binary(self) -> ExactIndex:
        if self._binary is None:
            self._binary = _shared_index(self._entries, binary=True)
        return self._binary


#: Indexes are immutable, so guards with the same values share them: an agent framework
#: typically creates every sandbox with the same secrets, and 1,000 values cost ~0.25 s and
#: ~25 MB per index. Shared while any guard holds one; the last few built are kept as well.
_INDEX_MIN_SHARED = 16
_index_lock = threading.Lock()
_index_live: weakref.WeakValueDictionary[tuple[tuple[Entry, ...], bool], ExactIndex] = (
    weakref.WeakValueDictionary()
)
_index_recent: collections.deque[ExactIndex] = collections.deque(maxlen=2)


def _shared_index(entries: tuple[Entry, ...], *, binary: bool) -> ExactIndex:
    if len(entries) < _INDEX_MIN_SHARED:
        return ExactIndex(entries, binary=binary)  # cheap to build; not worth a cache slot
    key = (entries, binary)
    with _index_lock:
        index = _index_live.get(key)
    if index is None:
        index = ExactIndex(entries, binary=binary)  # outside the lock: it may take seconds
        with _index_lock:
            index = _index_live.setdefault(key, index)
            _index_recent.append(index)
    return index


class Guard:
    """Scans and redacts (or blocks) everything a sandbox hands back.

    ``sensitive``: values to protect, as ``(value, label)`` pairs (or bare values, labelled
    ``"sensitive"``). ``on_finding``: called once per finding, before any output containing
    it is released or an error is raised; it receives no value. Thread-safe.
    """

    def __init__(
        self,
        policy: GuardPolicy | None = None,
        sensitive: Iterable[SensitiveItem] = (),
        on_finding: FindingCallback | None = None,
        *,
        budget_s: float | None = None,
    ) -> None:
        if policy is None:
            policy = GuardPolicy()
        if not isinstance(policy, GuardPolicy):
            raise InvalidArgumentError("policy must be a GuardPolicy")
        if on_finding is not None and not callable(on_finding):
            raise InvalidArgumentError("on_finding must be callable")
        self._policy = policy
        self._on_finding = on_finding
        if budget_s is not None and (not isinstance(budget_s, (int, float)) or budget_s <= 0):
            raise InvalidArgumentError("budget_s must be a positive number of seconds")
        self._budget_s = budget_s
        self._lock = threading.RLock()
        self._entries: list[Entry] = []
        self._values: set[tuple[str, str]] = set()
        self._indexes: _Indexes | None = None
        self._folded: tuple[ahocorasick_rs.AhoCorasick, tuple[Entry, ...]] | None = None
        rule_names = frozenset(d for d in policy.detectors if d != EXACT)
        self._rules = rule_set(rule_names)
        self._exact = EXACT in policy.detectors
        self._allow = frozenset(policy.allow)
        # The interleaving log: (stream, absolute offset in it, text), oldest first.
        self._log: collections.deque[tuple[GuardStream, int, str]] = collections.deque()
        self._log_chars = 0  # total length of the texts in the log
        if isinstance(sensitive, (str, bytes)):
            raise InvalidArgumentError("sensitive must be a list of (value, label) pairs")
        for item in sensitive:
            if isinstance(item, str):
                self.register(item, "sensitive")
            elif isinstance(item, tuple) and len(item) == 2:
                self.register(item[0], item[1])
            else:
                raise InvalidArgumentError("sensitive must be a list of (value, label) pairs")

    # -- configuration -------------------------------------------------------------------

    @property
    def policy(self) -> GuardPolicy:
        """The policy this guard enforces."""
        return self._policy

    @property
    def mode(self) -> str:
        """``"redact"``, ``"block"`` or ``"off"``."""
        return self._policy.mode

    def register(self, value: str, label: str) -> None:
        """Protect ``value`` from now on; sightings are reported and shown as ``label``.

        Output already released is not rescanned.
        """
        self._add(Entry(_check_value(value), _check_label(label), label, False))

    def canary(self, kind: str = "generic") -> str:
        """Make, register and return a canary credential of ``kind`` ("aws", "github",
        "generic"). A sighting is a ``Finding`` with ``canary=True`` labelled
        ``canary:<kind>:<id>``; the redaction marker shows the ordinary rule label."""
        if kind not in KINDS:
            raise InvalidArgumentError('canary kind must be "aws", "github" or "generic"')
        value = make_canary(kind)
        audit = f"canary:{kind}:{secrets.token_hex(4)}"
        self._add(Entry(value, SHOWN_LABEL[kind], audit, True))
        return value

    def _add(self, entry: Entry) -> None:
        with self._lock:
            key = (entry.value, entry.audit_label)
            if key in self._values:
                return
            if len(self._entries) >= MAX_VALUES:
                raise InvalidArgumentError(f"at most {MAX_VALUES} sensitive values per guard")
            if entry.value in entry.label:
                raise InvalidArgumentError("a label may not contain its value")
            self._values.add(key)
            self._entries.append(entry)
            self._indexes = None
            self._folded = None

    def _idx(self) -> _Indexes:
        with self._lock:
            if self._indexes is None:
                entries = self._entries if self._exact else [e for e in self._entries if e.canary]
                self._indexes = _Indexes(list(entries), self._rules)
            return self._indexes

    @property
    def prepared(self) -> bool:
        """Whether the matchers for the current values are built (then ``prepare`` is free)."""
        if self.mode == "off":
            return True  # nothing is scanned: nothing to build
        idx = self._indexes
        return idx is not None and idx._binary is not None

    def prepare(self) -> None:
        """Build the matchers for the current values now; they are otherwise built on first
        use. With thousands of values this takes seconds: call it off the event loop."""
        _ = self._idx().binary

    @property
    def window(self) -> int:
        """Raw characters each stream holds back until more output or the end of the call."""
        return self._idx().window

    # -- reporting -----------------------------------------------------------------------

    def _report(self, hits: Iterable[Hit], channel: str, offset: int = 0) -> list[Finding]:
        seen: set[tuple[str, str, int, int]] = set()
        out: list[Finding] = []
        for h in sorted(hits, key=lambda h: (h.start, h.end, h.detector)):
            key = (h.audit_label, h.detector, h.start, h.end)
            if key in seen:
                continue
            seen.add(key)
            finding = Finding(
                h.audit_label, channel, h.detector, h.canary, h.start + offset, h.end + offset
            )
            out.append(finding)
            if self._on_finding is not None:
                self._on_finding(finding)
        return out

    def _block(self, hits: Iterable[Hit], channel: str) -> LeakBlockedError:
        return LeakBlockedError(sorted({h.label for h in hits}), channel)

    # -- whole values --------------------------------------------------------------------

    def _budget(self, size: int, budget_s: float | None) -> Budget:
        if budget_s is not None and (not isinstance(budget_s, (int, float)) or budget_s <= 0):
            raise InvalidArgumentError("budget_s must be a positive number of seconds")
        return Budget.for_size(size, budget_s if budget_s is not None else self._budget_s)

    def _text_hits(self, text: str, budget: Budget | None = None) -> list[Hit]:
        idx = self._idx()
        hits = idx.text.find(text, budget)
        return hits + rule_hits(idx.rules, text, 0, self._allow, budget)

    def scan_text(
        self, text: str, channel: str = "reply", *, budget_s: float | None = None
    ) -> list[Finding]:
        """Findings in ``text`` (reported to ``on_finding``); never raises for a finding
        (only ``GuardBudgetError`` when the scan runs past its CPU budget)."""
        if not isinstance(text, str):
            raise InvalidArgumentError("the guard scans text (str)")
        channel = _check_channel(channel)
        budget = self._budget(len(text), budget_s)
        with quiet_gc(len(text)):
            return self._report(self._text_hits(text, budget), channel)

    def redact_text(self, text: str, channel: str, *, budget_s: float | None = None) -> str:
        """``text`` made safe: findings replaced by ``[REDACTED:<label>]``.

        For whole values: results, error name/value/traceback, file contents read as text,
        names of listed files. Raises ``LeakBlockedError`` in block mode, and
        ``GuardBudgetError`` (a ``moat.errors.TimeoutError``) when the scan uses more CPU
        than ``budget_s`` (default: the guard's, else 2 s + 0.1 s per MB): nothing is
        released then. Thread-safe: call it from a worker thread (``asyncio.to_thread``).
        """
        if not isinstance(text, str):
            raise InvalidArgumentError("the guard redacts text (str)")
        channel = _check_channel(channel)
        if self.mode == "off":
            return text
        with quiet_gc(len(text)):
            hits = self._text_hits(text, self._budget(len(text), budget_s))
            if not hits:
                return text
            self._report(hits, channel)
            if self.mode == "block":
                raise self._block(hits, channel)
            return render(text, merge(hits))

    def _folded_hits(self, text: str) -> list[Hit]:
        """Raw values matched with ASCII case folded: a host name is stored lower-cased, and
        a lower-cased value (an AWS key id, a base62 token) is still nearly the value."""
        with self._lock:
            if self._folded is None:
                entries = tuple(
                    e for e in self._entries if (self._exact or e.canary) and e.value.isascii()
                )
                patterns = [e.value.lower() for e in entries] or ["\uffff"]  # never matches
                self._folded = (ahocorasick_rs.AhoCorasick(patterns), entries)
            ac, entries = self._folded
        if not entries:
            return []
        folded = (
            text.lower()
            if text.isascii()
            else "".join(c.lower() if c.isascii() else c for c in text)
        )
        return [
            Hit(s, e, entries[i].label, entries[i].audit_label, "exact:folded", entries[i].canary)
            for i, s, e in ac.find_matches_as_indexes(folded, overlapping=True)
        ]

    def scrub_text(self, text: str, channel: str, *, report: bool = True) -> str:
        """``text`` redacted whatever the mode, for the host's own records that reach the
        caller (the audit trail): registered values never appear there (invariant 3), and
        a canary is flagged wherever it shows up. Values are also matched with ASCII case
        folded. Findings are reported as usual (``report=False``: not at all, for text the
        caller wrote itself, such as the code it sent); never raises for one."""
        if not isinstance(text, str):
            raise InvalidArgumentError("the guard scrubs text (str)")
        channel = _check_channel(channel)
        hits = self._text_hits(text)
        seen = {(h.start, h.end, h.audit_label) for h in hits}
        hits += [h for h in self._folded_hits(text) if (h.start, h.end, h.audit_label) not in seen]
        if not hits:
            return text
        if report:
            self._report(hits, channel)
        return render(text, merge(hits))

    def _bytes_hits(self, view: str, budget: Budget | None = None) -> list[Hit]:
        idx = self._idx()
        hits = idx.binary.find(view, budget)
        return hits + rule_hits(idx.rules, view, 0, self._allow, budget)

    def redact_bytes(self, data: bytes, channel: str, *, budget_s: float | None = None) -> bytes:
        """``data`` with raw and encoded values (UTF-8, UTF-16/32, base64, hex ...) replaced
        by the ASCII marker; offsets in findings are byte offsets. Budget and threads: as
        ``redact_text``."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError("the guard redacts bytes")
        channel = _check_channel(channel)
        raw = bytes(data)
        if self.mode == "off":
            return raw
        view = raw.decode("latin-1")  # one character per byte: offsets are byte offsets
        with quiet_gc(len(raw)):
            hits = self._bytes_hits(view, self._budget(len(raw), budget_s))
            if not hits:
                return raw
            self._report(hits, channel)
            if self.mode == "block":
                raise self._block(hits, channel)
            return render(view, merge(hits)).encode("latin-1")

    def guard_png(self, data: bytes, channel: str) -> bytes:
        """A PNG result: pixels pass through, text metadata (tEXt/zTXt/iTXt) is scanned.

        In redact mode a text chunk with a finding is dropped (the image stays valid); in
        block mode ``LeakBlockedError`` is raised. Malformed PNGs raise
        ``InvalidArgumentError`` (fail closed: not passed through unscanned).
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError("guard_png takes bytes")
        channel = _check_channel(channel)
        raw = bytes(data)
        if self.mode == "off":
            return raw
        drop: list[png.Chunk] = []
        all_hits: list[Hit] = []
        for chunk in png.chunks(raw):
            text = png.chunk_text(raw, chunk)
            if text is None:
                continue
            hits = self._bytes_hits(text)
            if hits:
                drop.append(chunk)
                # Offsets are reported as the chunk's span in the file.
                all_hits += [
                    Hit(chunk.start, chunk.end, h.label, h.audit_label, h.detector, h.canary)
                    for h in hits
                ]
        if not drop:
            return raw
        self._report(all_hits, channel)
        if self.mode == "block":
            raise self._block(all_hits, channel)
        parts, prev = [], 0
        for chunk in drop:
            parts.append(raw[prev : chunk.start])
            prev = chunk.end
        parts.append(raw[prev:])
        return b"".join(parts)

    def scan_binary_result(
        self, mime: str, data: bytes, channel: str = "result", *, budget_s: float | None = None
    ) -> tuple[bytes | None, list[Finding]]:
        """A binary result (``mime``: a result key, "png", or a MIME type, "image/png"):
        the bytes to release, or None to drop it, and the findings.

        The bytes must be what ``mime`` says (signature and structure) and are scanned raw
        for values in every byte form and for rules, and so are their text parts: PNG
        tEXt/zTXt/iTXt chunks, JPEG COM/APPn segments (EXIF, XMP), PDF strings and inflated
        streams (``moat.guard.binary``). Redact mode: offending PNG chunks and JPEG
        segments are cut (so are PNG chunks of unregistered types and bytes after the end
        marker, found or not); a finding anywhere else, a mismatched or malformed file, one
        that can't be inflated within caps, or an unknown ``mime`` drops the result
        (None), with a finding ``format:<kind>`` for the last four. Block mode: a finding
        raises ``LeakBlockedError``. "off": ``(data, [])``. Thread-safe; runs in time
        linear in ``data`` under the CPU budget (``GuardBudgetError``).
        """
        if not isinstance(data, (bytes, bytearray, memoryview)) or not isinstance(mime, str):
            raise InvalidArgumentError("scan_binary_result takes a MIME type and bytes")
        channel = _check_channel(channel)
        raw = bytes(data)
        if self.mode == "off":
            return raw, []
        budget = self._budget(len(raw), budget_s)
        with quiet_gc(len(raw)):
            return self._scan_binary(mime, raw, channel, budget)

    def _scan_binary(
        self, mime: str, raw: bytes, channel: str, budget: Budget
    ) -> tuple[bytes | None, list[Finding]]:
        kind = binary.kind_of(mime)

        def unverified(what: str) -> tuple[bytes | None, list[Finding]]:
            hit = Hit(0, len(raw), what, what, f"format:{kind or 'unknown'}", False)
            return None, self._report([hit], channel)

        if kind is None:
            return unverified("unknown-format")
        if not binary.magic_ok(kind, raw):
            return unverified("format-mismatch")
        try:
            parts, cut = binary.parts(kind, raw)
        except binary.Unverifiable:
            return unverified("unverifiable")
        budget.check()
        view = raw.decode("latin-1")
        hits = self._bytes_hits(view, budget)
        spans = [(p.start, p.end) for p in parts if p.removable] + cut
        hits += self._part_hits(parts, budget)
        if not hits:
            return _cut(raw, cut), []
        findings = self._report(hits, channel)
        if self.mode == "block":
            raise self._block(hits, channel)
        drop = set(cut)
        for h in hits:
            inside = [s for s in spans if s[0] <= h.start and h.end <= s[1]]
            if not inside:
                return None, findings  # not in a part that can be cut: drop it all
            drop.update(inside)
        return _cut(raw, sorted(drop)), findings

    def _part_hits(self, parts: list[binary.Part], budget: Budget) -> list[Hit]:
        """Hits in the parts' decoded data, each over the file span of the part(s) it is in.

        One scan of the parts joined by a newline, not one per part: a file of 90,000 tiny
        segments cost a second of per-call overhead. The newline keeps each part's edges
        what they were alone (word and line anchors); a hit across it (a value that holds a
        newline, a block split over parts) covers every part it touches."""
        if not parts:
            return []
        starts: list[int] = []
        at = 0
        for part in parts:
            starts.append(at)
            at += len(part.data) + 1
        joined = "\n".join(part.data.decode("latin-1") for part in parts)
        hits: list[Hit] = []
        for h in self._bytes_hits(joined, budget):
            first = bisect.bisect_right(starts, h.start) - 1
            last = max(first + 1, bisect.bisect_left(starts, h.end))
            for part in parts[first:last]:
                hits.append(Hit(part.start, part.end, h.label, h.audit_label, h.detector, h.canary))
        return hits

    def check_egress(self, data: str | bytes) -> list[Finding]:
        """Findings of registered values and canaries in an outgoing request (the egress
        gateway calls this on each request it sees, before substituting secrets).

        Reported with channel ``"egress"``; in block mode raises ``LeakBlockedError`` so the
        gateway refuses the request. Pattern rules are not applied (requests carry
        credentials legitimately); the check runs whatever the mode, except "off".
        """
        if isinstance(data, str):
            raw = data.encode("utf-8", "surrogatepass")
        elif isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
        else:
            raise InvalidArgumentError("check_egress takes str or bytes")
        if self.mode == "off":
            return []
        hits = self._idx().binary.find(raw.decode("latin-1"))
        findings = self._report(hits, "egress")
        if hits and self.mode == "block":
            raise self._block(hits, "egress")
        return findings

    # -- streams -------------------------------------------------------------------------

    def stream(self, channel: str = "stdout") -> GuardStream:
        """A new stream for one output stream (stdout, stderr, ...) of one call."""
        return GuardStream(self, _check_channel(channel))

    def _interleave(self, stream: GuardStream, abs_start: int, chunk: str) -> None:
        """Record ``chunk`` in arrival order; find values split across streams."""
        idx = self._idx()
        window = idx.window
        log = self._log
        # Only output of another stream in the log can complete a value across streams.
        if any(s is not stream for s, _, _ in log):
            segs = [*log, (stream, abs_start, chunk[:window])]
            combined = "".join(t for _, _, t in segs)
            hits = idx.text.find(combined)
            if hits:
                offsets = []
                pos = 0
                for _, _, t in segs:
                    offsets.append(pos)
                    pos += len(t)
                for h in hits:
                    parts = [
                        (s, a, off, t)
                        for (s, a, t), off in zip(segs, offsets, strict=True)
                        if off < h.end and off + len(t) > h.start
                    ]
                    if len({id(p[0]) for p in parts}) < 2:
                        continue  # inside one stream: that stream's own scan handles it
                    # A stream's parts of one match are contiguous in that stream's own
                    # output (its feeds follow each other): one span, one marker, per stream.
                    spans: dict[int, tuple[GuardStream, int, int]] = {}
                    for s, a, off, t in parts:
                        lo = a + max(h.start, off) - off
                        hi = a + min(h.end, off + len(t)) - off
                        prev = spans.get(id(s))
                        if prev is not None:
                            lo, hi = min(lo, prev[1]), max(hi, prev[2])
                        spans[id(s)] = (s, lo, hi)
                    for s, lo, hi in spans.values():
                        s._force(
                            Hit(
                                lo,
                                hi,
                                h.label,
                                h.audit_label,
                                h.detector + "/interleaved",
                                h.canary,
                            )
                        )
        if len(chunk) >= window:
            # The chunk alone fills the log: only its last ``window`` characters stay.
            log.clear()
            log.append((stream, abs_start + len(chunk) - window, chunk[-window:]))
            self._log_chars = window
            return
        log.append((stream, abs_start, chunk))
        total = self._log_chars + len(chunk)
        while log and total - len(log[0][2]) >= window:
            total -= len(log.popleft()[2])
        if log and total > window:
            s, a, t = log[0]
            cut = total - window
            log[0] = (s, a + cut, t[cut:])
            total = window
        self._log_chars = total

    def _forget(self, stream: GuardStream) -> None:
        self._log = collections.deque(seg for seg in self._log if seg[0] is not stream)
        self._log_chars = sum(len(t) for _, _, t in self._log)


def _cut(data: bytes, spans: Iterable[tuple[int, int]]) -> bytes:
    """``data`` without the (sorted, possibly overlapping) ``spans``."""
    out, prev = [], 0
    for start, end in sorted(spans):
        if start > prev:
            out.append(data[prev:start])
        prev = max(prev, end)
    out.append(data[prev:])
    return b"".join(out)


class GuardStream:
    """The guard on one output stream: ``feed`` chunks, ``flush`` at the end of the call.

    ``feed`` returns what is safe to release now; ``flush`` returns the held-back rest.
    In block mode both raise ``LeakBlockedError`` on a finding, and every later call raises
    again: nothing of a blocked stream is ever released. Use from one call at a time.
    """

    def __init__(self, guard: Guard, channel: str) -> None:
        self._guard = guard
        self.channel = channel
        self._buf = ""
        self._base = 0  # absolute offset of _buf[0] in the stream's raw output
        self._ctx = ""  # raw released text kept as lookbehind context for rules
        self._tail = ""  # raw text of a match released past the fixed cut (see _cut)
        self._forced: dict[tuple[int, int, str, str], Hit] = {}  # absolute offsets
        self._blocked: list[str] | None = None
        self._over_budget = False  # a scan ran past its CPU budget: nothing more is released
        self._held = 0  # buffer length at the last scan that held it back (a growing match)
        self._closed = False

    @property
    def closed(self) -> bool:
        """True after ``flush``."""
        return self._closed

    def _force(self, hit: Hit) -> None:
        """A match the interleaving log found (absolute offsets); redact it here too."""
        if self._closed or hit.end <= self._base:
            # Already released: should not happen (see the module docstring); report it.
            self._guard._report([hit], self.channel)
            return
        self._forced.setdefault((hit.start, hit.end, hit.audit_label, hit.detector), hit)

    def feed(self, chunk: str) -> str:
        """Add ``chunk``; return the text safe to release now (possibly empty)."""
        if not isinstance(chunk, str):
            raise InvalidArgumentError("guard streams take text (str) chunks")
        with self._guard._lock:
            self._check_open()
            if self._guard.mode == "off":
                return chunk
            if not chunk:
                return ""
            self._guard._interleave(self, self._base + len(self._buf), chunk)
            self._buf += chunk
            # Release in batches: only once the buffer holds twice the window, then all but
            # the window. A program printing one short line per write would otherwise cost a
            # rescan of the whole window per line. Still a function of the lengths fed only.
            # Block mode scans every chunk, so a leak interrupts the call at once.
            window = self._guard._idx().window
            if self._guard.mode != "block" and (
                len(self._buf) < 2 * window or len(self._buf) < self._held + window
            ):
                return ""
            out = self._release(final=False)
            # A rule match still growing holds the buffer (up to MAX_HOLD): rescan it once
            # it has grown by another window, not on every chunk (linear in what is fed).
            self._held = len(self._buf) if len(self._buf) >= 2 * window else 0
            return out

    def flush(self) -> str:
        """End of the stream: release the held-back tail, redacted."""
        with self._guard._lock:
            self._check_open()
            try:
                if self._guard.mode == "off":
                    return ""
                return self._release(final=True)
            finally:
                self._closed = True
                self._guard._forget(self)

    @property
    def pending(self) -> int:
        """How many characters are held back, waiting for more output or the end."""
        return len(self._buf)

    def release_idle(self) -> str:
        """The stream went quiet: release what is held back, redacted, and keep the stream open.

        Streaming callers want output while a call still runs; the holdback window would keep
        short output (a progress line) until the call ends. The released raw text stays as
        lookbehind, so the rest of a value that straddles this point is still redacted when it
        arrives; only the part printed before the pause has left (documented trade-off).
        """
        with self._guard._lock:
            self._check_open()
            if self._guard.mode == "off" or not self._buf:
                return ""
            raw = self._tail + self._buf
            out = self._release(final=True)
            self._tail = raw[-self._guard._idx().window :]
            return out

    def into(self, callback: Callable[[str], None]) -> GuardedCallback:
        """Wrap a caller's streaming callback: it only ever receives released text."""
        return GuardedCallback(self, callback)

    def _check_open(self) -> None:
        if self._over_budget:
            raise GuardBudgetError("the guard's scan ran past its CPU budget; output withheld")
        if self._blocked is not None:
            raise LeakBlockedError(self._blocked, self.channel)
        if self._closed:
            raise InvalidArgumentError("this guard stream was already flushed")

    def _release(self, *, final: bool) -> str:
        try:
            with quiet_gc(len(self._buf)):
                return self._release_scanned(final=final)
        except GuardBudgetError:
            # Fail closed: the held output is dropped and the stream releases nothing more.
            self._over_budget = True
            self._buf = ""
            raise

    def _release_scanned(self, *, final: bool) -> str:
        guard = self._guard
        idx = guard._idx()
        buf, base, ctx, tail = self._buf, self._base, self._ctx, self._tail
        budget = Budget.for_size(len(tail) + len(buf), guard._budget_s)
        hits: list[Hit] = []
        # Exact matches: over the raw text released last (the raw text of a marker released
        # early, ``tail``, or the lookbehind ``ctx``: both end where the buffer starts) plus
        # the buffer, so a match overlapping a released one, or a hexdump line split by the
        # cut, is still caught.
        prefix = tail if len(tail) >= len(ctx) else ctx
        for h in idx.text.find(prefix + buf, budget):
            if h.end > len(prefix):
                start = max(h.start - len(prefix), 0)
                hits.append(
                    Hit(start, h.end - len(prefix), h.label, h.audit_label, h.detector, h.canary)
                )
        for h in rule_hits(idx.rules, ctx + buf, len(ctx), guard._allow, budget):
            hits.append(
                Hit(h.start - len(ctx), h.end - len(ctx), h.label, h.audit_label, h.detector, False)
            )
        for h in self._forced.values():
            start = max(h.start - base, 0)
            hits.append(Hit(start, h.end - base, h.label, h.audit_label, h.detector, h.canary))
        if hits and guard.mode == "block":
            guard._report(hits, self.channel, base)
            err = guard._block(hits, self.channel)
            self._blocked = err.labels
            self._buf = ""
            raise err
        intervals = merge(hits)
        if final:
            cut, early = len(buf), len(buf)
        else:
            cut, early = self._cut(buf, hits, intervals, idx.window)
        if cut <= 0:
            return ""
        released = [h for h in hits if h.start < cut]
        guard._report(released, self.channel, base)
        out = render(buf[:cut], [iv for iv in intervals if iv.start < cut])
        self._ctx = (ctx + buf[:cut])[-CONTEXT:]
        self._tail = buf[early:cut]
        self._buf = buf[cut:]
        self._base = base + cut
        self._forced = {k: h for k, h in self._forced.items() if h.end > self._base}
        return out

    @staticmethod
    def _cut(buf: str, hits: list[Hit], intervals: list[Interval], window: int) -> tuple[int, int]:
        """Where to cut the buffer, and where the cut would have been without a marker.

        The cut is ``window`` characters before the end (a fixed amount: it doesn't depend
        on what the held text looks like). A complete match across the cut is released
        whole, as its marker (the cut moves to its end; the raw text between is kept as
        ``tail`` so a later overlapping match is found). A rule match that may still grow
        (it reaches the end of the buffer) is held from its start, up to MAX_HOLD.
        """
        cut = len(buf) - window
        growing = [
            h for h in hits if h.detector.startswith("rule:") and h.end > len(buf) - RULE_MARGIN
        ]
        for h in growing:
            cut = min(cut, h.start)
        if len(buf) - max(cut, 0) > MAX_HOLD:
            # A match that keeps growing (an endless token): settle it rather than hold
            # output forever; everything matched so far is redacted.
            cut, growing = len(buf) - window, []
        early = cut
        for iv in intervals:
            if iv.start < cut < iv.end:
                if any(iv.start <= h.start < iv.end for h in growing):
                    cut = early = iv.start
                else:
                    cut = iv.end
                break
        return cut, min(early, cut)


class GuardedCallback:
    """A streaming callback behind a guard stream (``on_stdout=...`` of the SDK).

    Call it with raw chunks; the wrapped callback receives only redacted text, and never
    a raw chunk. ``close()`` at the end of the call delivers the held-back tail.
    """

    def __init__(self, stream: GuardStream, callback: Callable[[str], None]) -> None:
        if not callable(callback):
            raise InvalidArgumentError("callback must be callable")
        self._stream = stream
        self._callback = callback

    def __call__(self, chunk: str) -> None:
        safe = self._stream.feed(chunk)
        if safe:
            self._callback(safe)

    def close(self) -> None:
        """End of the call: deliver the rest."""
        tail = self._stream.flush()
        if tail:
            self._callback(tail)
