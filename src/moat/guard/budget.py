"""A CPU budget per guard call: a scan that runs past it fails closed.

Trust domain: host engine. Every stage of a scan is linear in its input (RE2 rules,
hyperscan and Aho-Corasick literal passes, bounded decoders), so the budget is a backstop
against a regression or an unforeseen slow path, not the guarantee itself: a scan checks it
between stages (after each rule, each matcher pass, each binary part) and raises
``GuardBudgetError`` once the calling thread has used more CPU than allowed. Nothing of the
output is released then (invariant 4: fail closed, never pass through unscanned).
"""

from __future__ import annotations

import time

from moat.errors import TimeoutError

#: Default budget: a fixed allowance plus a floor rate of 10 MB/s (the guard runs at
#: >= 100 MB/s with 1,000 values; see bench/bench_guard.py).
BASE_SECONDS = 2.0
SECONDS_PER_MB = 0.1


class GuardBudgetError(TimeoutError):
    """A guard scan used more CPU than its budget; the output was not released."""


def _cpu() -> float:
    # CPU time of the calling thread: time spent waiting for the GIL or for a core doesn't
    # count, so a busy host doesn't fail scans, only a scan that itself works too long does.
    return time.thread_time()


class Budget:
    """``seconds`` of the calling thread's CPU time from now; ``check`` raises past it."""

    __slots__ = ("deadline",)

    def __init__(self, seconds: float) -> None:
        self.deadline = _cpu() + seconds

    @classmethod
    def for_size(cls, size: int, seconds: float | None = None) -> Budget:
        """The default budget for ``size`` bytes (or characters), or ``seconds`` if given."""
        if seconds is None:
            seconds = BASE_SECONDS + SECONDS_PER_MB * size / 1e6
        return cls(seconds)

    def check(self) -> None:
        """Raise ``GuardBudgetError`` if the budget is spent."""
        if _cpu() > self.deadline:
            raise GuardBudgetError("the guard's scan ran past its CPU budget; output withheld")
