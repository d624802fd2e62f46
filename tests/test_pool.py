"""The warm pool: a pooled sandbox is clean, gets its caller's settings, and is refilled."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from tests.conftest import require_tier

from moat import AsyncSandbox, InvalidArgumentError, Limits
from moat.engine import Engine
from moat.engine.pool import pool_sizes, poolable
from moat.guard import GuardPolicy
from moat.testing import local_transport

pytestmark = pytest.mark.container


def test_pool_sizes_parse() -> None:
    assert pool_sizes("container=2,gvisor=0") == {"container": 2, "gvisor": 0}
    assert pool_sizes("0") == {}
    for bad in ("docker=1", "container=x", "container=99"):
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
            if engine.pool._ready.get(("container", id(asyncio.get_running_loop()))):
                break
            await asyncio.sleep(0.05)
        warm_id = engine.pool._ready[("container", id(asyncio.get_running_loop()))][0].id
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
        assert not engine.pool._ready.get(("container", id(asyncio.get_running_loop())))
        assert not engine.sessions  # nothing left running

    asyncio.run(main())
