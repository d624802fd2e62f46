"""Warm pool benchmark: back-to-back creates and bursts, beside raw bubblewrap in the same run.

    .venv/bin/python bench/bench_pool.py [--runs 30] [--bursts 5] [--pool container=1]

Sequential: ``runs`` times create -> run_code('1+1') -> kill (sync SDK, pool as configured by
``--pool``, default moat's own default); prints median and range of create -> first result and
the ratio to raw ``bwrap python3 -c 1+1`` (target <= 1.5x, issue 17 §6). Burst: 10 concurrent
creates (async SDK), wall time until all have their first result, median of ``bursts``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import time

from bench_container import raw_bwrap_argv

from moat import AsyncSandbox, Sandbox
from moat.engine.engine import default_engine


def ms(xs: list[float]) -> str:
    return (
        f"median {statistics.median(xs) * 1000:7.2f} ms  "
        f"range {min(xs) * 1000:.1f}-{max(xs) * 1000:.1f} ms"
    )


async def burst(n: int) -> float:
    async def one() -> AsyncSandbox:
        s = await AsyncSandbox.create(isolation="container", timeout=120)
        assert (await s.run_code("1+1")).text == "2"
        return s

    t0 = time.perf_counter()
    sandboxes = await asyncio.gather(*(one() for _ in range(n)))
    took = time.perf_counter() - t0
    await asyncio.gather(*(s.kill() for s in sandboxes))
    return took


async def bursts(count: int, n: int, pause: float) -> list[float]:
    out = []
    for _ in range(count):
        await asyncio.sleep(pause)  # an idle spell: the pool is back to its resting size
        out.append(await burst(n))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--bursts", type=int, default=5)
    ap.add_argument("--burst-size", type=int, default=10)
    ap.add_argument("--pool", default=None, help="MOAT_WARM_POOL (default: moat's default)")
    args = ap.parse_args()
    if args.pool is not None:
        os.environ["MOAT_WARM_POOL"] = args.pool
    subprocess.run(raw_bwrap_argv(), check=True)  # warm the page cache for both paths
    with Sandbox.create(isolation="container") as s:
        s.run_code("1+1")

    # Raw runs before and after moat's (A-B-A), so both see the same load on a shared host;
    # moat's creates are back to back (no pause for the pool to refill).
    def raw_runs(k: int) -> list[float]:
        out = []
        for _ in range(k):
            t0 = time.perf_counter()
            subprocess.run(raw_bwrap_argv(), check=True)
            out.append(time.perf_counter() - t0)
        return out

    pool = default_engine().pool
    waited0 = getattr(pool, "waited", 0)  # (absent before the pool could wait)
    raw = raw_runs(args.runs // 2)
    hits0, misses0 = pool.hits, pool.misses
    seq: list[float] = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        s = Sandbox.create(isolation="container", timeout=120)
        assert s.run_code("1+1").text == "2"
        seq.append(time.perf_counter() - t0)
        s.kill()
    hits, misses = pool.hits - hits0, pool.misses - misses0
    raw += raw_runs(args.runs - args.runs // 2)
    waited = getattr(pool, "waited", 0) - waited0

    b0, m0 = pool.hits, pool.misses
    burst_times = asyncio.run(bursts(args.bursts, args.burst_size, 1.0))
    print(f"warm pool {os.environ.get('MOAT_WARM_POOL', 'default')}, {os.cpu_count()} cpus")
    print(f"raw bwrap python3 -c 1+1         {ms(raw)}")
    print(f"sequential create->first result  {ms(seq)}  ({args.runs} runs)")
    ratio = statistics.median(seq) / statistics.median(raw)
    print(
        f"  ratio to raw bwrap             {ratio:.2f}x (target <= 1.5x); "
        f"pool hits {hits}/{hits + misses} ({waited} waited for a warm start under way)"
    )
    print(
        f"burst of {args.burst_size} concurrent creates  {ms(burst_times)}  ({args.bursts} bursts; "
        f"pool hits {pool.hits - b0}/{pool.hits - b0 + pool.misses - m0})"
    )


if __name__ == "__main__":
    main()
