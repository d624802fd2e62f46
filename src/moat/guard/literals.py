"""Find many byte literals in one pass: the guard's filters (registered values, rule gates).

Trust domain: host engine; the scanned data is hostile sandbox output. Pure: immutable once
built, no I/O.

Two back ends with the same results. Hyperscan (Intel's multi-pattern engine, SIMD literal
matchers) scans 8,000 value prefixes at ~2 GB/s where a byte Aho-Corasick DFA manages
~120 MB/s (``bench/bench_guard.py``), and it is what makes the guard's 100 MB/s target with
1,000 values reachable. ``ahocorasick_rs`` is the fallback where the hyperscan wheel can't be
loaded (no wheel for the platform, a CPU without SSSE3): slower, never less exact.
``MOAT_GUARD_MATCHER=ahocorasick`` forces the fallback (tests run both).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence

import ahocorasick_rs

from moat.errors import PolicyError

try:
    import hyperscan
except ImportError:  # pragma: no cover - depends on the platform's wheel
    hyperscan = None  # type: ignore[assignment]

#: Bytes written as themselves in a hyperscan expression; every other byte is ``\xHH``
#: (NUL included: expressions are C strings, so a raw NUL would end the pattern early).
_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


@functools.cache
def _hyperscan_works() -> bool:
    """Whether hyperscan loads *and* runs here (it needs SSSE3; a wheel may import on a CPU
    it can't compile for): a one-literal database, built and scanned once per process."""
    if hyperscan is None:
        return False
    try:
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=[b"moat"], ids=[0], elements=1, flags=[0])
        seen: list[int] = []
        db.scan(b"a moat", match_event_handler=lambda i, *_: seen.append(i))
    except hyperscan.error:
        return False
    return seen == [0]


def backend() -> str:
    """The back end new literal sets use: ``"hyperscan"`` or ``"ahocorasick"``."""
    if os.environ.get("MOAT_GUARD_MATCHER") == "ahocorasick" or not _hyperscan_works():
        return "ahocorasick"
    return "hyperscan"


def _expression(literal: bytes) -> bytes:
    return b"".join(bytes((c,)) if c in _PLAIN else b"\\x%02x" % c for c in literal)


class LiteralSet:
    """A fixed set of non-empty byte literals, plus (hyperscan only) fixed-width regexes.

    ``any(data)`` tells whether one occurs; ``find(data)`` gives every occurrence, overlapping
    ones included, as ``(index, start offset)``: literals are numbered first, then
    ``patterns``. A pattern is ``(expression, width)``: a hyperscan expression whose every
    match is ``width`` bytes long (its start is its end minus the width).
    """

    def __init__(
        self,
        literals: Sequence[bytes],
        *,
        use: str | None = None,
        patterns: Sequence[tuple[bytes, int]] = (),
    ) -> None:
        self.literals = list(literals)
        if not self.literals and not patterns:
            raise ValueError("a literal set needs at least one literal")
        if any(not lit for lit in self.literals) or any(w <= 0 for _, w in patterns):
            raise ValueError("literals and patterns must be non-empty")
        self.backend = use or backend()
        self._lengths = [len(lit) for lit in self.literals] + [w for _, w in patterns]
        if self.backend == "hyperscan":
            if hyperscan is None:
                raise ValueError("hyperscan is not available")
            exprs = [_expression(lit) for lit in self.literals] + [e for e, _ in patterns]
            n = len(exprs)
            # One database for both calls: ``any`` ends the scan at the first match.
            self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
            try:
                self._db.compile(expressions=exprs, ids=list(range(n)), elements=n, flags=[0] * n)
            except hyperscan.error as exc:
                # Fail closed, typed: a guard without its matcher must not run.
                raise PolicyError("the guard's matcher could not be built") from exc
            # Scratch space is per thread: a guard may be used from several threads.
            self._local = threading.local()
        elif self.backend == "ahocorasick":
            if patterns:
                raise ValueError("regular expressions need the hyperscan matcher")
            self._ac = ahocorasick_rs.BytesAhoCorasick(
                self.literals, implementation=ahocorasick_rs.Implementation.DFA
            )
        else:
            raise ValueError(f"unknown literal matcher {self.backend!r}")

    def _scratch(self) -> hyperscan.Scratch:
        scratch: hyperscan.Scratch | None = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self._db)
        return scratch

    def any(self, data: bytes) -> bool:
        """True when at least one literal occurs in ``data``."""
        if self.backend == "ahocorasick":
            return bool(self._ac.find_matches_as_indexes(data))
        scratch = self._scratch()

        def stop(*_: object) -> bool:
            return True  # a true return ends the scan

        try:
            self._db.scan(data, match_event_handler=stop, scratch=scratch)
        except hyperscan.ScanTerminated:
            return True
        return False

    def find(self, data: bytes) -> list[tuple[int, int]]:
        """Every occurrence as ``(literal index, start)``, in no particular order."""
        if self.backend == "ahocorasick":
            return [(i, s) for i, s, _ in self._ac.find_matches_as_indexes(data, overlapping=True)]
        scratch = self._scratch()
        out: list[tuple[int, int]] = []
        lengths = self._lengths

        def hit(i: int, _start: int, end: int, _flags: int, _ctx: object) -> None:
            out.append((i, end - lengths[i]))

        self._db.scan(data, match_event_handler=hit, scratch=scratch)
        return out
