"""Kill latency on every tier: how long leaving a ``with Sandbox.create(...)`` block takes.

    .venv/bin/python bench/bench_kill.py [-n 10] [--tiers container,gvisor,microvm]

Each run creates a sandbox, starts a background ``sleep`` (so there is a process tree to end),
then times ``Sandbox.kill()`` (what ``__exit__`` calls). Beside it: the raw floor, SIGKILL and
waitpid of a plain child process. After the runs it waits for the background reaper and
checks nothing of the sandboxes remains (invariant 5). Target: kill <= 100 ms on every tier.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

from moat import Sandbox
from moat.runtime import reaper


def raw_kill() -> float:
    """The floor: SIGKILL a plain child and reap it."""
    child = subprocess.Popen(["sleep", "60"])
    time.sleep(0.01)
    t0 = time.perf_counter()
    child.kill()
    child.wait()
    return time.perf_counter() - t0


def moat_kill(tier: str) -> float:
    s = Sandbox.create(isolation=tier, timeout=300)
    s.commands.run("sleep 300", background=True)
    t0 = time.perf_counter()
    s.kill()
    return time.perf_counter() - t0


def _fmt(xs: list[float]) -> str:
    ms = [x * 1000 for x in xs]
    return f"median {statistics.median(ms):7.1f} ms  range {min(ms):6.1f}-{max(ms):6.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--tiers", default="container,gvisor,microvm")
    args = ap.parse_args()
    os.environ.setdefault("MOAT_WARM_POOL", "0")  # time kill alone, not a pool refill
    tiers = [t for t in args.tiers.split(",") if t]
    raw = [raw_kill() for _ in range(args.n)]
    print(f"runs: {args.n} per tier")
    print(f"raw  SIGKILL + waitpid of a child      {_fmt(raw)}")
    for tier in tiers:
        moat_kill(tier)  # warm-up: caches, templates, snapshots
        times = [moat_kill(tier) for _ in range(args.n)]
        print(f"moat {tier:<9} Sandbox.kill()         {_fmt(times)}")
    t0 = time.perf_counter()
    left = reaper.drain(timeout=30)
    print(f"background reaping drained in {(time.perf_counter() - t0) * 1000:.0f} ms, left {left}")
    print("target: kill <= 100 ms on every tier")


if __name__ == "__main__":
    main()
