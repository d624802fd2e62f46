"""A warm pool: sandboxes of the default shape, started before anyone asks for them.

What hosted services do for fast starts. A pooled sandbox has run no code; it is handed out
only for a request whose sandbox-side shape it already has (default template, limits and
environment, no mounts, no secrets: placeholders live in the environment), and is then given
the caller's guard, network policy, metadata and lifetime. Pools are per tier and per event
loop (a session belongs to the loop that started it). Sizes come from ``MOAT_WARM_POOL``
(``"container=1"`` by default; ``"0"`` turns pooling off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from moat.errors import InvalidArgumentError
from moat.model import TIERS, Limits

log = logging.getLogger("moat.engine")

DEFAULT_SIZES = "container=1"


def pool_sizes(text: str | None = None) -> dict[str, int]:
    """Parse ``MOAT_WARM_POOL`` (``"container=1,gvisor=0"``, or ``"0"`` for none)."""
    raw = os.environ.get("MOAT_WARM_POOL", DEFAULT_SIZES) if text is None else text
    raw = raw.strip()
    if raw in ("", "0", "off", "none"):
        return {}
    sizes: dict[str, int] = {}
    for part in raw.split(","):
        tier, _, n = part.partition("=")
        if tier.strip() not in TIERS or not n.strip().isdigit():
            raise InvalidArgumentError("MOAT_WARM_POOL must look like 'container=1,gvisor=0'")
        if int(n) > 8:
            raise InvalidArgumentError("MOAT_WARM_POOL: at most 8 warm sandboxes per tier")
        sizes[tier.strip()] = int(n)
    return sizes


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


class WarmPool:
    """Idle, never-used sessions, refilled in the background after each hand-out."""

    def __init__(self, sizes: dict[str, int], start: Callable[[str], Awaitable[Any]]) -> None:
        self.sizes = sizes
        self._start = start
        self._ready: dict[tuple[str, int], list[Any]] = {}
        self._filling: dict[tuple[str, int], asyncio.Task[None]] = {}
        #: hand-outs served from the pool, and poolable requests that found it empty
        self.hits = 0
        self.misses = 0

    def take(self, tier: str) -> Any | None:
        """A ready session for ``tier`` on this loop, or None; schedules the refill."""
        if not self.sizes.get(tier):
            return None
        key = (tier, id(asyncio.get_running_loop()))
        ready = self._ready.setdefault(key, [])
        session = None
        while ready and session is None:
            candidate = ready.pop(0)
            if candidate.is_running():
                session = candidate
        if session is None:
            self.misses += 1
        else:
            self.hits += 1
            self.refill(tier)  # on a miss the engine refills after its cold start instead
        return session

    def refill(self, tier: str) -> None:
        key = (tier, id(asyncio.get_running_loop()))
        task = self._filling.get(key)
        if task is not None and not task.done():
            return
        if len(self._ready.get(key, [])) >= self.sizes.get(tier, 0):
            return
        self._filling[key] = asyncio.get_running_loop().create_task(self._fill(tier, key))

    async def _fill(self, tier: str, key: tuple[str, int]) -> None:
        while len(self._ready.setdefault(key, [])) < self.sizes.get(tier, 0):
            try:
                session = await self._start(tier)
            except Exception:  # a failed warm start only costs the next caller some time
                log.warning("warm pool: could not start a %s sandbox", tier, exc_info=True)
                return
            self._ready[key].append(session)

    async def close(self) -> None:
        """Kill every idle sandbox of this loop (engine shutdown)."""
        loop_id = id(asyncio.get_running_loop())
        for key, task in list(self._filling.items()):
            if key[1] == loop_id:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        for key, sessions in list(self._ready.items()):
            if key[1] == loop_id:
                for s in sessions:
                    await s.kill("killed")
                sessions.clear()
