"""A live sandbox's resource samples (E2B's ``get_metrics``; issue 10).

Each sample is read from the host's kernel (the runtime's cgroup counters and, for the
container tier, the host's view of its tmpfs mounts), never from anything the sandbox says:
a hostile sandbox can't make itself look idle. Samples are taken every ``interval`` seconds
into a bounded ring per sandbox (an hour at the default 5 s), so memory stays flat however
long a sandbox lives.
"""

from __future__ import annotations

import collections
import datetime as dt
import math
import os
import time
from collections.abc import Callable

from moat.errors import InvalidArgumentError
from moat.model import Limits, SandboxMetrics

__all__ = ["DEFAULT_INTERVAL_S", "RING_SIZE", "MetricsRing", "interval_s"]

DEFAULT_INTERVAL_S = 5.0
#: Samples kept per sandbox: one hour at the default interval.
RING_SIZE = 720
_MIB = 1 << 20


def interval_s() -> float:
    """The sampling interval: ``MOAT_METRICS_INTERVAL_S`` (0.2-60 s), default 5 s."""
    raw = os.environ.get("MOAT_METRICS_INTERVAL_S", "")
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.2 <= value <= 60:  # NaN fails too
        raise InvalidArgumentError("MOAT_METRICS_INTERVAL_S must be a number from 0.2 to 60")
    return value


class MetricsRing:
    """Samples of one sandbox, oldest first, taken by :meth:`sample`."""

    def __init__(self, limits: Limits, stats: Callable[[], dict[str, int]]) -> None:
        self._limits = limits
        self._stats = stats
        self._cpus = max(1, math.ceil(limits.cpus))
        self._ring: collections.deque[SandboxMetrics] = collections.deque(maxlen=RING_SIZE)
        self._last: tuple[float, int] | None = None  # (monotonic s, cpu ns) of the last read

    def baseline(self, cpu_ns: int) -> None:
        """Set the CPU baseline from one counter read (what the first :meth:`sample` does,
        without reading every other counter: it runs on every create's path)."""
        self._last = (time.monotonic(), cpu_ns)

    def sample(self) -> SandboxMetrics | None:
        """Read the counters now; append and return a sample (None on the first read, which
        only sets the CPU baseline, or when the sandbox's counters are gone)."""
        stats = self._stats()
        if not stats:
            return None
        now = time.monotonic()
        cpu = stats.get("cpu_ns")
        last, self._last = self._last, (now, cpu) if cpu is not None else None
        if last is None or cpu is None:
            return None
        elapsed = now - last[0]
        # A process that exits unreaped by anyone in the sandbox takes its time with it:
        # the counter can step back, never below zero use.
        used = max(0, cpu - last[1]) / 1e9
        pct = min(100.0, 100.0 * used / (elapsed * self._cpus)) if elapsed > 0 else 0.0
        disk_total = stats.get("disk_total_bytes", self._limits.disk_mb * _MIB)
        metric = SandboxMetrics(
            timestamp=dt.datetime.now(dt.UTC),
            cpu_count=self._cpus,
            cpu_used_pct=round(pct, 2),
            mem_used=stats.get("memory_bytes", 0),
            mem_total=self._limits.memory_mb * _MIB,
            mem_cache=stats.get("memory_cache_bytes", 0),
            disk_used=stats.get("disk_used_bytes"),
            disk_total=disk_total,
        )
        self._ring.append(metric)
        return metric

    def between(
        self, start: dt.datetime | None = None, end: dt.datetime | None = None
    ) -> list[SandboxMetrics]:
        """Samples with ``start <= timestamp <= end`` (either bound open when None)."""
        return [
            m
            for m in self._ring
            if (start is None or m.timestamp >= start) and (end is None or m.timestamp <= end)
        ]
