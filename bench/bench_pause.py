"""Pause/resume benchmark (issue 11): per tier, beside create in the same run.

    .venv/bin/python bench/bench_pause.py [--tier container] [--runs 15] [--files-mb 1]
                                          [--memory]

Per run, on one sandbox through the engine's front door (no warm pool): create -> first
``run_code`` result; write ``--files-mb`` MiB of files (half text, half random bytes) into
/home/user; pause (``memory=--memory``; the container tier keeps files only); resume ->
first ``run_code`` result. Prints medians and ranges of create, pause, checkpoint size and
resume -> first result. ``--tier`` takes any tier whose driver is Checkpointable (the
microvm and gvisor rows appear once their drivers are).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from moat.engine.api import FrontDoor
from moat.engine.engine import Engine
from moat.engine.persist import Persistence
from moat.engine.snapshots import Snapshots
from moat.model import SandboxInfo
from moat.store.paused import PausedStore
from moat.store.snapshots import SnapshotStore

T = "bench"


def fmt(xs: list[float], unit: str = "ms", scale: float = 1000) -> str:
    return (
        f"median {statistics.median(xs) * scale:8.1f} {unit}  "
        f"range {min(xs) * scale:.1f}-{max(xs) * scale:.1f} {unit}"
    )


async def first_result(door: FrontDoor, sid: str) -> None:
    async for _ in door.run_code(T, sid, "1+1"):
        pass


async def one(
    door: FrontDoor, tier: str, files_mb: float, memory: bool, forks: int
) -> tuple[float, ...]:
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
    t0 = time.perf_counter()
    await door.pause(T, sid, memory)
    pause = time.perf_counter() - t0
    size = door.engine.persist.paused()[sid].size
    t0 = time.perf_counter()
    await door.connect(T, sid)
    await first_result(door, sid)
    resume = time.perf_counter() - t0
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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="moat-bench-pause-") as tmp:
        engine = Engine(pool={})
        engine.persist = Persistence(engine, PausedStore(Path(tmp) / "paused"))
        engine.snapshots = Snapshots(engine, SnapshotStore(Path(tmp) / "snapshots"))
        door = FrontDoor(engine)
        a = (args.tier, args.files_mb, args.memory, args.forks)
        await one(door, *a)  # warm caches
        rows = [await one(door, *a) for _ in range(args.runs)]
    create, pause, size, resume, snapshot, fork = (list(col) for col in zip(*rows, strict=True))
    print(
        f"tier {args.tier}, {args.runs} runs, {args.files_mb:g} MiB of files, memory={args.memory}"
    )
    print(f"  create -> first result  {fmt(create)}")
    print(f"  pause                   {fmt(pause)}")
    print(f"  checkpoint size         {fmt(size, 'KiB', 1 / 1024)}")
    print(f"  resume -> first result  {fmt(resume)}")
    print(f"  snapshot (keeps running) {fmt(snapshot)}")
    print(f"  fork of {args.forks} -> results   {fmt(fork)}")


if __name__ == "__main__":
    asyncio.run(main())
