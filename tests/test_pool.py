"""The warm pool: a pooled sandbox is clean, gets its caller's settings, and is refilled."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from tests.conftest import require_tier

from moat import AsyncSandbox, InvalidArgumentError, Limits, NotFoundError
from moat.engine import Engine, pool
from moat.engine.pool import WarmPool, parse_pool, pool_sizes, poolable
from moat.guard import GuardPolicy
from moat.testing import local_transport

pytestmark = pytest.mark.container


def test_pool_sizes_parse() -> None:
    assert pool_sizes("container=2,gvisor=0") == {"container": 2, "gvisor": 0}
    assert pool_sizes("0") == {}
    assert parse_pool("container=1") == {"container": (1, pool.DEFAULT_GROWTH)}
    assert parse_pool("container=1:6,gvisor=0") == {"container": (1, 6), "gvisor": (0, 0)}
    assert parse_pool("container=3:1") == {"container": (3, 3)}  # a bound below rest is rest
    for bad in ("docker=1", "container=x", "container=99", "container=1:9", "container=1:x"):
        with pytest.raises(InvalidArgumentError):
            pool_sizes(bad)


def test_only_default_shapes_are_pooled() -> None:
    assert poolable(
        {"template": "default", "envs": (), "mounts": (), "limits": Limits()}, None, None
    )
    assert not poolable({"envs": (("A", "1"),)}, None, None)
    assert not poolable({"limits": Limits(memory_mb=256)}, None, None)
    assert not poolable({}, {"K": object()}, None)


def test_pooled_sandbox_is_clean_and_takes_callers_settings() -> None:
    require_tier("container")
    value = "pool-secret-" + secrets.token_hex(8)

    async def main() -> None:
        engine = Engine(pool={"container": 1})
        first = await AsyncSandbox.create(
            isolation="container", transport=local_transport(engine), timeout=60
        )
        # the pool fills in the background after the first (cold) start
        for _ in range(200):
            if engine.pool.ready("container"):
                break
            await asyncio.sleep(0.05)
        warm_id = engine.pool.ready("container")[0].id
        second = await AsyncSandbox.create(
            isolation="container",
            transport=local_transport(engine),
            timeout=30,
            metadata={"who": "second"},
            sensitive=[value],
            guard=GuardPolicy(mode="redact"),
        )
        assert second.sandbox_id == warm_id  # served from the pool
        info = await second.get_info()
        assert info.metadata == {"who": "second"}
        assert 25 < (info.end_at - info.started_at).total_seconds() <= 30.5
        # the caller's guard is in force, and the sandbox has run nothing before
        out = await second.run_code(
            f"print({value!r})\nimport os\nsorted(os.listdir('/home/user'))"
        )
        assert value not in "".join(out.logs.stdout) and out.text == "[]"
        assert (await second.run_code("1 + 1")).execution_count == 2
        await first.kill()
        await second.kill()
        await engine.pool.close()
        assert not engine.pool.ready("container")
        assert not engine.sessions  # nothing left running

    asyncio.run(main())


class _FakeSession:
    """Stands in for a warm session in the pool's own logic (no sandbox needed)."""

    def __init__(self) -> None:
        self.killed = False

    def is_running(self) -> bool:
        return not self.killed

    async def kill(self, reason: str = "killed") -> None:
        self.killed = True


def _fake_pool(
    bounds: tuple[int, int], memory: int = 1 << 40
) -> tuple[WarmPool, list[_FakeSession]]:
    started: list[_FakeSession] = []

    async def start(tier: str) -> _FakeSession:
        await asyncio.sleep(0.01)
        started.append(_FakeSession())
        return started[-1]

    return WarmPool({"container": bounds}, start, memory=lambda: memory), started


async def _settle(wp: WarmPool) -> None:
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not any(p.starting for p in wp._pools.values()):
            return


def test_pool_grows_with_demand_within_its_bound_and_retires_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pool, "DEMAND_WINDOW_S", 0.5)

    async def main() -> None:
        wp, started = _fake_pool((1, 3))
        wp.refill("container")
        await _settle(wp)
        assert len(wp.ready("container")) == 1  # at rest
        taken = [await wp.take("container") for _ in range(6)]  # a burst of demand
        assert all(t is not None for t in taken[:1]) and wp.target("container") == 3
        await _settle(wp)
        assert len(wp.ready("container")) == 3  # grown to its bound, no further
        assert len(started) <= 1 + 6 + 3
        await asyncio.sleep(1.2)  # demand gone for the window: the extra ones retire
        assert len(wp.ready("container")) == 1
        assert sum(s.killed for s in started) == 2
        await wp.close()
        assert all(s.killed for s in started if s not in taken)

    asyncio.run(main())


def test_pool_does_not_grow_when_memory_is_short() -> None:
    async def main() -> None:
        wp, _ = _fake_pool((1, 4), memory=pool.GROW_MIN_AVAILABLE - 1)
        wp.refill("container")
        await _settle(wp)
        for _ in range(5):
            await wp.take("container")
            await _settle(wp)
        assert wp.target("container") == 4 and len(wp.ready("container")) == 1
        await wp.close()

    asyncio.run(main())


def test_take_waits_for_a_start_under_way_instead_of_missing() -> None:
    async def main() -> None:
        wp, started = _fake_pool((1, 1))
        assert await wp.take("container") is None  # nothing yet: a miss, the engine refills
        wp.refill("container")  # a warm start is now under way
        got = await wp.take("container")
        assert got is started[0] and (wp.hits, wp.misses) == (1, 1)
        await wp.close()

    asyncio.run(main())


def test_sequential_loop_is_served_by_the_pool() -> None:
    """create -> run_code -> kill, back to back: every create after the first is a pool hit
    (the replacement starts when one is taken, and a caller waits for one under way)."""
    require_tier("container")
    n = 20

    async def main() -> None:
        engine = Engine(pool={"container": 1})
        for _ in range(n):
            s = await AsyncSandbox.create(
                isolation="container", transport=local_transport(engine), timeout=60
            )
            assert (await s.run_code("1+1")).text == "2"
            await s.kill()
        assert engine.pool.misses <= 2 and engine.pool.hits >= n - 2, (
            engine.pool.hits,
            engine.pool.misses,
        )
        assert 1 < engine.pool.target("container") <= pool.DEFAULT_GROWTH  # grew with demand
        await engine.end_loop()
        assert not engine.sessions  # nothing left running, pool included

    asyncio.run(main())


def test_pooled_sandbox_belongs_to_the_tenant_that_took_it() -> None:
    """Invariant 11: a warm sandbox is nobody's until taken, then its taker's alone."""
    require_tier("container")

    async def main() -> None:
        engine = Engine(pool={"container": 1})
        a = await AsyncSandbox.create(
            isolation="container", transport=local_transport(engine, "tenant-a"), timeout=60
        )
        for _ in range(200):
            if engine.pool.ready("container"):
                break
            await asyncio.sleep(0.05)
        warm = engine.pool.ready("container")[0]
        assert warm.tenant is None
        b = await AsyncSandbox.create(
            isolation="container", transport=local_transport(engine, "tenant-b"), timeout=60
        )
        assert b.sandbox_id == warm.id and warm.tenant == "tenant-b"
        as_a = local_transport(engine, "tenant-a")
        with pytest.raises(NotFoundError):  # answers like an unknown id
            await as_a.info(b.sandbox_id)
        ids_a = {i.sandbox_id for i in await as_a.list_sandboxes()}
        assert ids_a == {a.sandbox_id}
        assert warm not in engine.pool.ready("container")  # never handed out twice
        await engine.end_loop()
        assert not engine.sessions

    asyncio.run(main())
