"""Pause/resume benchmark (issue 11): per tier, beside create in the same run.

    .venv/bin/python bench/bench_pause.py [--tier container] [--runs 15] [--files-mb 1]
                                          [--memory] [--pool N] [--breakdown]

Per run, on one sandbox through the engine's front door: create -> first ``run_code``
result; write ``--files-mb`` MiB of files (half text, half random bytes) into /home/user;
pause (``memory=--memory``; the container tier keeps files only); resume -> first
``run_code`` result. Prints medians and ranges of create, pause, checkpoint size and
resume -> first result. ``--tier`` takes any tier whose driver is Checkpointable.

``--pool N`` keeps N warm sandboxes of the tier (default: 1 on the container tier, as
``MOAT_WARM_POOL`` does, else 0); before each timed step the bench waits until the pool
holds what it aims for (a sandbox resumed after a while finds it so), and reports how many
sandboxes it handed out (fork starts take warm sandboxes too, and make it grow). A
files-only resume, a snapshot start and a fork start take a warm sandbox when the shape is
poolable (docs/persistence.md); ``--pool 0`` measures the cold path. ``--breakdown`` also
prints where a resume's time goes (driver start, agent up, file replay, reseed, the first
call).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from moat.engine import persist
from moat.engine.api import FrontDoor
from moat.engine.engine import Engine
from moat.engine.inside import AgentInside
from moat.engine.persist import Persistence
from moat.engine.session import Session
from moat.engine.snapshots import Snapshots
from moat.engine.tiers import runtime_for
from moat.model import SandboxInfo
from moat.store.paused import PausedStore
from moat.store.snapshots import SnapshotStore

T = "bench"
#: --breakdown: phase -> seconds, per resume (only while ``_timing`` is set)
_phases: dict[str, list[float]] = {}
_timing = False


def fmt(xs: list[float], unit: str = "ms", scale: float = 1000) -> str:
    return (
        f"median {statistics.median(xs) * scale:8.1f} {unit}  "
        f"range {min(xs) * scale:.1f}-{max(xs) * scale:.1f} {unit}"
    )


def _timed(owner: Any, name: str, phase: str) -> None:
    """Wrap the coroutine function ``owner.name`` to add its time to ``phase`` (--breakdown)."""
    real: Callable[..., Awaitable[Any]] = getattr(owner, name)

    async def timed(*args: Any, **kwargs: Any) -> Any:
        t0, counted = time.perf_counter(), _timing  # calls begun during a resume only
        try:
            return await real(*args, **kwargs)
        finally:
            if counted:
                _phases.setdefault(phase, []).append(time.perf_counter() - t0)

    setattr(owner, name, timed)


def breakdown(tier: str) -> None:
    runtime = type(runtime_for(tier))
    _timed(runtime, "restore", "driver start (cold path)")
    real_start = Session.start

    async def start(self: Session, pooled: bool = False, restore: Path | None = None) -> None:
        if restore is None or not _timing:  # a warm pool's start, a fork's: not the resume's
            return await real_start(self, pooled, restore)
        t0 = time.perf_counter()
        try:
            return await real_start(self, pooled, restore)
        finally:
            _phases.setdefault("start+agent+files (cold path)", []).append(time.perf_counter() - t0)

    Session.start = start  # type: ignore[method-assign]
    if hasattr(runtime, "restore_into"):
        _timed(runtime, "restore_into", "files into a warm sandbox")
    _timed(AgentInside, "input_from", "file replay (tar -x inside)")
    _timed(persist, "reseed", "reseed")


async def first_result(door: FrontDoor, sid: str) -> None:
    async for _ in door.run_code(T, sid, "1+1"):
        pass


async def pool_ready(door: FrontDoor, tier: str) -> None:
    """Wait (5 s at most) until the tier's warm pool holds what it aims for (at least one),
    if it has a pool: its starts are then not counted in what is measured next."""
    pool = door.engine.pool
    if not pool.bounds.get(tier, (0, 0))[1]:
        return
    pool.refill(tier)
    for _ in range(100):
        if len(pool.ready(tier)) >= max(1, pool.target(tier)):
            return
        await asyncio.sleep(0.05)


async def one(
    door: FrontDoor, tier: str, files_mb: float, memory: bool, forks: int
) -> tuple[float, ...]:
    global _timing
    await pool_ready(door, tier)
    t0 = time.perf_counter()
    sid = (await door.create(T, door.resolve(isolation=tier, timeout=300))).sandbox_id
    await first_result(door, sid)
    create = time.perf_counter() - t0
    half = max(1, int(files_mb * (1 << 20) / 2))
    code = (
        "import os\n"
        f"open('/home/user/text.txt','w').write('moat pause bench line\\n' * {half // 22})\n"
        f"open('/home/user/random.bin','wb').write(os.urandom({half}))\n"
    )
    await first_result(door, sid)
    async for _ in door.run_code(T, sid, code):
        pass
    await pool_ready(door, tier)  # its refill after the create is not the pause's cost
    t0 = time.perf_counter()
    await door.pause(T, sid, memory)
    pause = time.perf_counter() - t0
    size = door.engine.persist.paused()[sid].size
    await pool_ready(door, tier)
    _timing = True
    t0 = time.perf_counter()
    await door.connect(T, sid)
    connected = time.perf_counter()
    await first_result(door, sid)
    resume = time.perf_counter() - t0
    _timing = False
    _phases.setdefault("first run_code after resume", []).append(time.perf_counter() - connected)
    await pool_ready(door, tier)
    t0 = time.perf_counter()
    snap = await door.create_snapshot(T, sid)
    snapshot = time.perf_counter() - t0
    await door.delete_snapshot(T, snap.snapshot_id)
    t0 = time.perf_counter()
    got = await door.fork(T, sid, forks)
    infos = [g for g in got if isinstance(g, SandboxInfo)]
    if len(infos) != forks:
        raise SystemExit(f"fork failed: {got}")
    await asyncio.gather(*(first_result(door, i.sandbox_id) for i in infos))
    fork = time.perf_counter() - t0
    for i in infos:
        await door.kill(T, i.sandbox_id)
    await door.kill(T, sid)
    return create, pause, float(size), resume, snapshot, fork


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tier", default="container")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--files-mb", type=float, default=1.0)
    ap.add_argument("--memory", action="store_true", help="pause with memory=True")
    ap.add_argument("--forks", type=int, default=5, help="sandboxes per fork (1-20)")
    ap.add_argument("--pool", type=int, default=None, help="warm sandboxes of the tier")
    ap.add_argument("--breakdown", action="store_true", help="where a resume's time goes")
    args = ap.parse_args()
    size = args.pool if args.pool is not None else (1 if args.tier == "container" else 0)
    if args.breakdown:
        breakdown(args.tier)
    with tempfile.TemporaryDirectory(prefix="moat-bench-pause-") as tmp:
        engine = Engine(pool={args.tier: size} if size else {})
        engine.persist = Persistence(engine, PausedStore(Path(tmp) / "paused"))
        engine.snapshots = Snapshots(engine, SnapshotStore(Path(tmp) / "snapshots"))
        door = FrontDoor(engine)
        a = (args.tier, args.files_mb, args.memory, args.forks)
        await one(door, *a)  # warm caches
        _phases.clear()
        hits = engine.pool.hits
        rows = [await one(door, *a) for _ in range(args.runs)]
        hits = engine.pool.hits - hits
        await engine.end_loop()
    create, pause, size_b, resume, snapshot, fork = (list(c) for c in zip(*rows, strict=True))
    print(
        f"tier {args.tier}, {args.runs} runs, {args.files_mb:g} MiB of files, "
        f"memory={args.memory}, warm pool {size} ({hits} hand-outs to the {2 * args.runs} "
        f"creates and resumes and {args.forks * args.runs} fork starts)"
    )
    print(f"  create -> first result  {fmt(create)}")
    print(f"  pause                   {fmt(pause)}")
    print(f"  checkpoint size         {fmt(size_b, 'KiB', 1 / 1024)}")
    print(f"  resume -> first result  {fmt(resume)}")
    print(f"  snapshot (keeps running) {fmt(snapshot)}")
    print(f"  fork of {args.forks} -> results   {fmt(fork)}")
    if args.breakdown:
        print("  resume breakdown (phases that ran):")
        for phase, xs in _phases.items():
            print(f"    {phase:30s} {fmt(xs)}")


if __name__ == "__main__":
    asyncio.run(main())
