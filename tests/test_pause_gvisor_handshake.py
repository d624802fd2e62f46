"""gVisor memory pause/resume whatever the agent was doing (issue 11): the quiesce handshake.

A memory checkpoint of the gvisor tier quiesces the agent first (QUIESCE: acknowledged at a
frame boundary both ways, nothing more written); a restore onto a new stream sends RESUME
with a nonce, and the host drops whatever precedes the agent's announcement (bounded).
Real runsc, real agent, through the engine's front door. Pauses land at random moments
while the agent streams output both from a command and from a running cell, and while the
host streams a large file in; what is checked after each resume is read back from inside
(a kernel's variable) and from the host (the paused store, the sandbox's processes, cgroups
and files).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from tests.conftest import require_tier
from tests.test_gvisor_checkpoint import _leftovers
from tests.test_pause import T, _close, _door, _root, _run

from moat.engine.api import FrontDoor
from moat.engine.client import AgentClient
from moat.errors import SandboxDiedError, SandboxError
from moat.errors import TimeoutError as MoatTimeout
from moat.runtime.gvisor import driver as gvdriver
from moat.runtime.gvisor.oci import CGROUP_PREFIX

pytestmark = [pytest.mark.asyncio, pytest.mark.gvisor, pytest.mark.timeout(600)]

CYCLES = 10
#: A cell that prints in a tight loop for a while (then ends, freeing its context).
_FLOOD_CELL = "import time\nt = time.time()\nwhile time.time() - t < 1.5:\n    print('z' * 300)"
#: A command that prints in a tight loop until killed.
_FLOOD_CMD = "yes 'some output of a busy background command, line after line'"


@pytest_asyncio.fixture
async def door(tmp_path: Path) -> AsyncIterator[FrontDoor]:
    require_tier("gvisor")
    d = _door(tmp_path / "paused")
    yield d
    await _close(d)


async def _create(door: FrontDoor) -> str:
    cfg = door.resolve(isolation="gvisor", timeout=600)
    return (await door.create(T, cfg)).sandbox_id


async def _consume(events: AsyncIterator[object]) -> None:
    """Read a stream until it ends; its end by the pause (the sandbox stopped) is expected."""
    with contextlib.suppress(SandboxError):
        async for _ in events:
            pass


def _paused_dirs(door: FrontDoor) -> list[str]:
    root = _root(door)
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


async def test_pauses_mid_stream_resume_with_memory(door: FrontDoor) -> None:
    """A command and a cell print in tight loops while the pause lands (random offsets);
    each of CYCLES resumes serves run_code with the kernel's variables kept.

    Without the handshake this fails within a few cycles: the restored agent finishes a
    frame it was writing into the new stream (or reads the new host's first frame after
    half of an old one), and the resume dies with a protocol error."""
    sid = await _create(door)
    await _run(door, sid, "x = 0")
    flood_ctx = await door.create_context(T, sid, "python")
    cmd = await door.start_command(T, sid, _FLOOD_CMD)
    pid = cmd.pid
    rng = random.Random()
    for cycle in range(CYCLES):
        # the command's output, flowing to a caller that reads it (re-attached each cycle)
        stream = cmd.events() if cycle == 0 else (await door.connect_command(T, sid, pid)).events()
        readers = [asyncio.ensure_future(_consume(stream))]
        # a cell printing in a tight loop, in flight as the pause lands
        readers.append(
            asyncio.ensure_future(
                _consume(door.run_code(T, sid, _FLOOD_CELL, context=flood_ctx.id))
            )
        )
        await asyncio.sleep(rng.uniform(0.05, 0.6))
        info = await door.pause(T, sid, memory=True)
        assert info.state == "paused"
        await asyncio.wait_for(asyncio.gather(*readers), 30)
        _, resumed = await door.connect(T, sid)
        assert resumed, cycle
        assert await _run(door, sid, "x += 1; print(x)") == f"{cycle + 1}\n", cycle
        assert await _run(door, sid, f"y{cycle} = {cycle}; print('ok')") == "ok\n"
    total = " + ".join(f"y{c}" for c in range(CYCLES))
    assert await _run(door, sid, f"print({total})") == f"{sum(range(CYCLES))}\n"
    # the background command survived every pause (memory kept) and still prints
    listed = [p.pid for p in await door.list_commands(T, sid)]
    assert pid in listed
    assert _paused_dirs(door) == []


async def test_pauses_while_the_host_streams_a_large_file_in(door: FrontDoor) -> None:
    """The host is mid-frame on the way in (a large files.write) as the pause lands: the
    resumed agent never reads half of an old frame; files and variables work after."""
    sid = await _create(door)
    await _run(door, sid, "x = 0")
    blob = random.randbytes(24 << 20)
    rng = random.Random()
    for cycle in range(5):
        write = asyncio.ensure_future(door.write_file(T, sid, f"/home/user/big{cycle}", blob))
        await asyncio.sleep(rng.uniform(0.02, 0.3))
        await door.pause(T, sid, memory=True)
        with contextlib.suppress(SandboxError):  # stopped under it, or done before
            await write
        _, resumed = await door.connect(T, sid)
        assert resumed
        assert await _run(door, sid, "x += 1; print(x)") == f"{cycle + 1}\n"
        await door.write_file(T, sid, "/home/user/small", f"cycle {cycle}")
        assert await door.read_file(T, sid, "/home/user/small") == f"cycle {cycle}"


async def test_an_agent_that_does_not_quiesce_fails_the_pause_and_keeps_running(
    door: FrontDoor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent that never answers QUIESCE: the pause fails with a typed error inside the
    bound, nothing is kept or left on disk, and the sandbox runs on with its memory (paused
    fine once it answers again).

    Stuck for real: the sandbox's processes (sentry, agent) frozen by the host's cgroup
    freezer, then thawed."""
    monkeypatch.setattr(gvdriver, "QUIESCE_TIMEOUT", 1.0)
    sid = await _create(door)
    await _run(door, sid, "x = 41")
    v1 = Path("/sys/fs/cgroup/freezer") / (CGROUP_PREFIX + sid) / "freezer.state"
    v2 = Path("/sys/fs/cgroup") / (CGROUP_PREFIX + sid) / "cgroup.freeze"
    state, frozen, thawed = (v1, "FROZEN", "THAWED") if v1.exists() else (v2, "1", "0")
    if not state.exists():
        pytest.fail(f"no freezer for the sandbox's cgroup ({v1} or {v2})")
    real_quiesce = AgentClient.quiesce

    async def frozen_then_quiesce(self: AgentClient, timeout: float) -> None:
        state.write_text(frozen)  # the moment QUIESCE goes out, nothing inside can answer
        await real_quiesce(self, timeout)

    monkeypatch.setattr(AgentClient, "quiesce", frozen_then_quiesce)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        with pytest.raises(MoatTimeout, match="keeps running"):
            await door.pause(T, sid, memory=True)
    finally:
        state.write_text(thawed)
        monkeypatch.setattr(AgentClient, "quiesce", real_quiesce)
    assert loop.time() - t0 < 4.0
    assert door.engine.get(sid) is not None  # still running, not paused
    assert _paused_dirs(door) == []  # nothing kept, no half checkpoint
    # thawed, the agent answers again: the same sandbox, its memory intact
    assert await _run(door, sid, "x += 1; print(x)") == "42\n"
    await door.pause(T, sid, memory=True)
    await door.connect(T, sid)
    assert await _run(door, sid, "print(x)") == "42\n"


async def test_a_wrong_announcement_fails_the_resume_and_keeps_the_paused_state(
    door: FrontDoor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host waits for the line of ITS nonce: a line with another (what a forged one
    would be) is dropped with everything before it, the resume fails closed within the
    bound and leaves no runsc process, cgroup or file behind; the paused state stays, and a
    retry resumes it with its memory."""
    sid = await _create(door)
    await _run(door, sid, "x = 7")
    await door.pause(T, sid, memory=True)
    real = gvdriver._announced

    async def other_nonce(pipes: object, nonce: str) -> None:
        await real(pipes, "0" * len(nonce))  # type: ignore[arg-type]

    monkeypatch.setattr(gvdriver, "_announced", other_nonce)
    monkeypatch.setattr(gvdriver, "RESTORE_TIMEOUT", 3.0)
    with pytest.raises(SandboxDiedError):
        await door.connect(T, sid)
    assert _leftovers(sid) == []
    assert (_root(door) / sid / "record.json").is_file()  # still paused, whole
    monkeypatch.setattr(gvdriver, "_announced", real)
    _, resumed = await door.connect(T, sid)
    assert resumed
    assert await _run(door, sid, "print(x)") == "7\n"
