"""Fork WITH memory (issue 11): gVisor (runsc checkpoint, restored in place for the source)
and the microVM (QEMU migration to a file, the VM resumed). One fork of three per tier.

Memory is shared by the forks, so this is the real randomness test: the source seeds
Python's ``random`` with a constant before the fork; after the fork each sandbox's kernel is
reseeded by the host (moat.agent.reseed), so ``random.random()``, ``os.urandom(16)`` and
``uuid.uuid4()`` all differ across the forks, while a kernel variable survives into each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from tests.conftest import require_tier
from tests.test_pause import _close
from tests.test_snapshots import T, _dirs, _door

from moat.engine.api import FrontDoor
from moat.model import SandboxInfo

pytestmark = [pytest.mark.asyncio]


@pytest_asyncio.fixture
async def door(tmp_path: Path) -> AsyncIterator[FrontDoor]:
    d = _door(tmp_path)
    yield d
    await _close(d)


async def _run(door: FrontDoor, sid: str, code: str) -> str:
    out = []
    async for e in door.run_code(T, sid, code):
        text = getattr(e, "text", None)
        if text is not None and getattr(e, "stream", None) == "stdout":
            out.append(text)
    return "".join(out)


PROBE = "import os, uuid; print(random.random(), os.urandom(16).hex(), uuid.uuid4())"


@pytest.mark.parametrize("tier", ["gvisor", "microvm"])
async def test_fork_keeps_memory_and_reseeds_every_fork(
    door: FrontDoor, tmp_path: Path, tier: str
) -> None:
    require_tier(tier)
    cfg = door.resolve(isolation=tier, timeout=600)
    sid = (await door.create(T, cfg)).sandbox_id
    await _run(door, sid, "import random; x = 41; random.seed(1)")
    await door.write_file(T, sid, "/home/user/keep.txt", "kept")
    got = await door.fork(T, sid, 3)
    assert all(isinstance(g, SandboxInfo) for g in got), got
    ids = [g.sandbox_id for g in got if isinstance(g, SandboxInfo)]
    assert len(set(ids) | {sid}) == 4
    draws = []
    for f in ids:
        assert await _run(door, f, "print(x + 1)") == "42\n"  # the kernel's memory
        assert await door.read_file(T, f, "/home/user/keep.txt") == "kept"
        line = (await _run(door, f, PROBE)).split()
        assert len(line) == 3, line
        draws.append(line)
    for i in range(3):  # random.random(), os.urandom(16), uuid4(): each differs per fork
        assert len({d[i] for d in draws}) == 3, (i, draws)
    # the source kept running through it, its memory as it was
    assert await door.is_running(T, sid)
    assert await _run(door, sid, "print(x)") == "41\n"
    assert _dirs(tmp_path) == []  # the fork's temporary snapshot is gone
