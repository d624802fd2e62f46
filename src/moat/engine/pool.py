"""A warm pool: sandboxes of the default shape, started before anyone asks for them.

What hosted services do for fast starts. A pooled sandbox has run no code; it is handed out
only for a request whose sandbox-side shape it already has (the default template it was
started on, which must still be the default's: checked at each hand-out, limits and
environment, no mounts, no secrets: placeholders live in the environment), and is then given
the caller's guard, network policy, metadata and lifetime; it belongs to nobody (no tenant)
until then, and to the one tenant that takes it after (invariant 11). Pools are per tier and
per event loop (a session belongs to the loop that started it).

Sizes come from ``MOAT_WARM_POOL``: ``"container=1"`` (the default) keeps one warm sandbox at
rest and lets the pool grow with demand up to ``DEFAULT_GROWTH``; ``"container=1:6"`` names the
bound; ``"0"`` turns pooling off. Demand is the busiest second of the last
``DEMAND_WINDOW_S`` (a sequential loop or a burst raises it); the pool refills as soon as one
is taken, with at most ``FILL_PARALLEL`` starts at once, grows only while the host has
``GROW_MIN_AVAILABLE`` bytes of memory available, and retires what demand no longer needs.
A caller that finds the pool empty while a warm start is under way waits for that start
(it is further along than a cold one would be) instead of starting another.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from moat.egress import proxy_env
from moat.engine import templating
from moat.errors import InvalidArgumentError, SandboxError
from moat.model import CA_BUNDLE_PATH, PROXY_PORT, TIERS, Limits
from moat.runtime.spec import SandboxSpec
from moat.templates.ref import TemplateRef

log = logging.getLogger("moat.engine")

DEFAULT_SIZES: Final = "container=1"
#: The most warm sandboxes one tier's pool may hold, at rest or grown.
MAX_PER_TIER: Final = 8
#: How far a pool grows with demand when ``MOAT_WARM_POOL`` names no bound (an idle
#: container sandbox is ~15 MiB; grown ones retire after ``DEMAND_WINDOW_S`` without demand).
DEFAULT_GROWTH: Final = 8
#: Demand is measured over this many seconds; sandboxes grown for it retire after as long idle.
DEMAND_WINDOW_S: Final = 30.0
#: Warm starts under way at once, per pool. More than the 2 cores of the reference host: a
#: start also sleeps (the cgroup v1 move waits for an RCU grace period, the agent's imports
#: wait on the page cache), and back-to-back creates measured best with 4 (bench_pool.py).
FILL_PARALLEL: Final = 4
#: A pool grows past its resting size only while the host has this much memory available.
GROW_MIN_AVAILABLE: Final = 1 << 30
#: Take times remembered per pool (enough to see a second's peak at any sane rate).
_MAX_TAKES: Final = 256


def parse_pool(text: str | None = None) -> dict[str, tuple[int, int]]:
    """Parse ``MOAT_WARM_POOL`` into tier -> (resting size, bound it may grow to)."""
    raw = os.environ.get("MOAT_WARM_POOL", DEFAULT_SIZES) if text is None else text
    raw = raw.strip()
    if raw in ("", "0", "off", "none"):
        return {}
    out: dict[str, tuple[int, int]] = {}
    for part in raw.split(","):
        tier, _, value = part.partition("=")
        rest, _, bound = value.strip().partition(":")
        if tier.strip() not in TIERS or not rest.isdigit() or not (bound.isdigit() or bound == ""):
            raise InvalidArgumentError("MOAT_WARM_POOL must look like 'container=1,gvisor=0:2'")
        n = int(rest)
        top = int(bound) if bound else (max(n, DEFAULT_GROWTH) if n else 0)
        if n > MAX_PER_TIER or top > MAX_PER_TIER:
            raise InvalidArgumentError(
                f"MOAT_WARM_POOL: at most {MAX_PER_TIER} warm sandboxes per tier"
            )
        out[tier.strip()] = (n, max(n, top))
    return out


def pool_sizes(text: str | None = None) -> dict[str, int]:
    """The resting size per tier from ``MOAT_WARM_POOL`` (see :func:`parse_pool`)."""
    return {tier: rest for tier, (rest, _) in parse_pool(text).items()}


def poolable(spec_args: Mapping[str, Any], secrets: object, gateway_config: object) -> bool:
    """Whether a request can be served by a pooled sandbox (its sandbox side is default)."""
    return (
        spec_args.get("template", "default") == "default"
        and not spec_args.get("envs")
        and not spec_args.get("mounts")
        and spec_args.get("limits", Limits()) == Limits()
        and not secrets
        and gateway_config is None
    )


def pooled_spec(sandbox_id: str, tier: str, template: TemplateRef | None = None) -> SandboxSpec:
    """The spec of a warm-pool sandbox: the default shape on ``template`` (the default
    template, as a create that names none gets; None: the host's /usr), moat's proxy settings
    over the template's environment."""
    args = templating.spec_args(template, ()) if template is not None else {}
    env = dict(args.pop("envs", ()))
    env.update(proxy_env(PROXY_PORT, CA_BUNDLE_PATH))  # moat's own names win, as at create
    return SandboxSpec(sandbox_id=sandbox_id, tier=tier, envs=tuple(sorted(env.items())), **args)


def plain(template: TemplateRef | None) -> bool:
    """Whether sandboxes of ``template`` can wait in a pool: no start command or ready check
    (those run per sandbox, at its create)."""
    return template is None or (template.start_cmd is None and template.ready_cmd is None)


def memory_available() -> int:
    """Bytes of memory the host has available (0 when unknown: then a pool doesn't grow)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def peak_per_second(times: collections.deque[float]) -> int:
    """The most takes within any one second among ``times`` (ascending)."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@dataclass
class _Pool:
    """One tier's pool on one event loop."""

    rest: int
    bound: int
    ready: list[Any] = field(default_factory=list)
    starting: set[asyncio.Task[None]] = field(default_factory=set)
    takes: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=_MAX_TAKES)
    )
    waiting: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    trim: asyncio.TimerHandle | None = None
    closed: bool = False

    def target(self, now: float) -> int:
        """How many warm sandboxes the recent demand calls for."""
        while self.takes and now - self.takes[0] > DEMAND_WINDOW_S:
            self.takes.popleft()
        return max(self.rest, min(self.bound, peak_per_second(self.takes)))


class WarmPool:
    """Idle, never-used sessions, refilled as soon as one is taken, sized by demand."""

    def __init__(
        self,
        sizes: Mapping[str, int | tuple[int, int]],
        start: Callable[[str], Awaitable[Any]],
        memory: Callable[[], int] = memory_available,
    ) -> None:
        self.bounds: dict[str, tuple[int, int]] = {}
        for tier, size in sizes.items():
            rest, bound = (
                (size, max(size, DEFAULT_GROWTH) if size else 0) if isinstance(size, int) else size
            )
            self.bounds[tier] = (rest, min(MAX_PER_TIER, max(rest, bound)))
        self.sizes = {tier: rest for tier, (rest, _) in self.bounds.items()}
        self._start = start
        self._memory = memory
        self._pools: dict[tuple[str, int], _Pool] = {}
        #: hand-outs served from the pool (ready, or a warm start waited for), and poolable
        #: requests that found it empty with nothing under way
        self.hits = 0
        self.misses = 0
        #: of the hits, those that waited for a warm start under way
        self.waited = 0
        #: trims under way (asyncio holds tasks weakly: a task nobody references may vanish)
        self._trims: set[asyncio.Task[None]] = set()

    def _pool(self, tier: str) -> _Pool | None:
        rest, bound = self.bounds.get(tier, (0, 0))
        if not bound:
            return None
        key = (tier, id(asyncio.get_running_loop()))
        pool = self._pools.get(key)
        if pool is None or pool.closed:
            pool = self._pools[key] = _Pool(rest, bound)
        return pool

    def ready(self, tier: str) -> list[Any]:
        """The warm sandboxes of ``tier`` waiting on this loop (read-only view, for tests)."""
        pool = self._pools.get((tier, id(asyncio.get_running_loop())))
        return list(pool.ready) if pool is not None else []

    def target(self, tier: str) -> int:
        """How many warm sandboxes of ``tier`` this loop's pool aims to hold now."""
        pool = self._pool(tier)
        return pool.target(time.monotonic()) if pool is not None else 0

    async def take(self, tier: str, refill: bool = True) -> Any | None:
        """A ready session for ``tier`` on this loop, or None (then start a cold one).

        Counts the demand and starts replacements at once, before the caller's first call
        (``refill=False``: the caller calls ``refill`` itself once its own work is done; a
        resume replays its files first, without a start competing for the CPU).
        """
        pool = self._pool(tier)
        if pool is None:
            return None
        pool.takes.append(time.monotonic())
        session = self._pop(pool)
        if session is None and pool.waiting < len(pool.starting):
            # A warm start is under way and nobody else waits for it: it is further along
            # than a cold start would be.
            pool.waiting += 1
            try:
                while session is None and pool.starting and not pool.closed:
                    pool.arrived.clear()
                    await pool.arrived.wait()
                    session = self._pop(pool)
            finally:
                pool.waiting -= 1
            self.waited += session is not None
        self._schedule_trim(pool)
        if session is None:
            self.misses += 1  # the engine refills after its cold start, off that start's path
        else:
            self.hits += 1
            if refill:
                self._fill(tier, pool)
        return session

    def refill(self, tier: str) -> None:
        """Start warm sandboxes until this loop's pool holds what demand calls for."""
        pool = self._pool(tier)
        if pool is not None:
            self._fill(tier, pool)

    @staticmethod
    def _pop(pool: _Pool) -> Any | None:
        while pool.ready:
            candidate = pool.ready.pop(0)
            if candidate.is_running():
                return candidate
        return None

    def _fill(self, tier: str, pool: _Pool) -> None:
        if pool.closed:
            return
        want = pool.target(time.monotonic())
        if want > pool.rest and self._memory() < GROW_MIN_AVAILABLE:
            want = pool.rest  # growth must not push the host into swapping or the OOM killer
        loop = asyncio.get_running_loop()
        while len(pool.ready) + len(pool.starting) < want and len(pool.starting) < FILL_PARALLEL:
            task = loop.create_task(self._start_one(tier, pool))
            pool.starting.add(task)

    async def _start_one(self, tier: str, pool: _Pool) -> None:
        task = asyncio.current_task()
        try:
            session = await self._start(tier)
        except asyncio.CancelledError:
            raise
        except SandboxError as exc:  # e.g. the default template not built: said in a line
            log.warning("warm pool: could not start a %s sandbox: %s", tier, exc)
            return
        except Exception:  # a failed warm start only costs the next caller some time
            log.warning("warm pool: could not start a %s sandbox", tier, exc_info=True)
            return
        finally:
            pool.starting.discard(task)
            pool.arrived.set()
        if pool.closed:
            await session.kill("killed")
            return
        pool.ready.append(session)
        pool.arrived.set()
        self._fill(tier, pool)  # the next one, if demand still calls for it

    def _schedule_trim(self, pool: _Pool) -> None:
        """Retire grown sandboxes once demand has been quiet for the window."""
        if pool.trim is not None:
            pool.trim.cancel()
        loop = asyncio.get_running_loop()

        def start() -> None:
            task = loop.create_task(self._trim(pool))
            self._trims.add(task)
            task.add_done_callback(self._trims.discard)

        pool.trim = loop.call_later(DEMAND_WINDOW_S + 0.5, start)

    async def _trim(self, pool: _Pool) -> None:
        pool.trim = None
        if pool.closed:
            return
        extra = len(pool.ready) - pool.target(time.monotonic())
        retired = [pool.ready.pop(0) for _ in range(max(0, extra))]
        await asyncio.gather(*(s.kill("killed") for s in retired), return_exceptions=True)
        if pool.takes:
            self._schedule_trim(pool)

    async def close(self) -> None:
        """Kill every idle sandbox of this loop and what its starts bring (engine shutdown)."""
        loop_id = id(asyncio.get_running_loop())
        sessions: list[Any] = []
        for key, pool in list(self._pools.items()):
            if key[1] != loop_id:
                continue
            del self._pools[key]
            pool.closed = True
            pool.arrived.set()
            if pool.trim is not None:
                pool.trim.cancel()
            # Not cancelled: a start cancelled twice (here and by asyncio.run's shutdown) can't
            # clean up after itself. A closed pool's start kills what it started (bounded by
            # the session's START_TIMEOUT).
            for task in list(pool.starting):
                with contextlib.suppress(BaseException):
                    await asyncio.shield(task)
            sessions.extend(pool.ready)
            pool.ready.clear()
        await asyncio.gather(*(s.kill("killed") for s in sessions), return_exceptions=True)
