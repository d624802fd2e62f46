"""Sustained creates on the container tier: the rate, and the CPU one create -> kill costs.

    .venv/bin/python bench/bench_creates.py [--seconds 20] [--workers 4,8,16]
        [--ways embedded,server] [--pool container=1] [--profile out.prof]

``--workers`` clients loop create -> kill for ``--seconds`` each way (embedded: moat's
``AsyncSandbox`` in this process; server: the E2B SDK against a ``moat serve`` this script
starts). Besides the rate it prints CPU seconds per cycle, which a shared machine's load
moves far less than wall time: the process that owns the engine (this one, or the server)
and its reaped children (bwrap, the sandbox's init, the agent), from ``getrusage`` and
``/proc/PID/stat``. ``--profile`` writes a cProfile of the embedded runs (the engine's own
CPU, by function). The load average is printed beside every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import resource
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench_server import e2b_acreate, serving, sustained_creates

from moat import AsyncSandbox

TICK = os.sysconf("SC_CLK_TCK")


def own_cpu() -> tuple[float, float]:
    """(this process, its reaped children) CPU seconds."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def pid_cpu(pid: int) -> tuple[float, float]:
    """(process ``pid``, its reaped children) CPU seconds, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / TICK, (cutime + cstime) / TICK


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f} {five:.1f} {fifteen:.1f}"


async def run_way(
    create: Callable[[], Awaitable[Any]],
    cpu: Callable[[], tuple[float, float]],
    seconds: float,
    workers: int,
) -> str:
    a0, c0 = cpu()
    made, took, bad = await sustained_creates(create, seconds, workers)
    await asyncio.sleep(3)  # the reaper finishes the last kills: their children are counted
    a1, c1 = cpu()
    n = max(made, 1)
    return (
        f"{made:4d} in {took:5.1f} s = {made / took:5.1f}/s, {bad} failed; CPU per cycle "
        f"{(a1 - a0) / n * 1000:5.1f} ms engine + {(c1 - c0) / n * 1000:5.1f} ms children "
        f"= {((a1 - a0) + (c1 - c0)) / n * 1000:5.1f} ms  ({load()})"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workers", default="4,8,16")
    ap.add_argument("--ways", default="embedded,server")
    ap.add_argument("--pool", default=None, help="MOAT_WARM_POOL (default: moat's)")
    ap.add_argument("--profile", default=None, help="cProfile of the embedded runs to this file")
    args = ap.parse_args()
    if args.pool is not None:
        os.environ["MOAT_WARM_POOL"] = args.pool
    workers = [int(w) for w in args.workers.split(",")]
    ways = args.ways.split(",")
    print(
        f"host: {os.cpu_count()} cpus, {load()}; warm pool "
        f"{os.environ.get('MOAT_WARM_POOL', 'default')}",
        flush=True,
    )
    if "embedded" in ways:
        prof = cProfile.Profile() if args.profile else None

        async def embedded() -> None:
            s = await AsyncSandbox.create(isolation="container", timeout=60)  # warm up
            await s.kill()
            for w in workers:
                if prof is not None:
                    prof.enable()
                line = await run_way(
                    lambda: AsyncSandbox.create(isolation="container", timeout=60),
                    own_cpu, args.seconds, w,
                )  # fmt: skip
                if prof is not None:
                    prof.disable()
                print(f"embedded {w:2d} clients: {line}", flush=True)

        asyncio.run(embedded())
        if prof is not None:
            prof.dump_stats(args.profile)
    if "server" in ways:
        work = Path(tempfile.mkdtemp(prefix="moat-bench-creates-"))
        with serving("container", args.pool, work) as srv:
            pid = srv.proc.pid

            async def served() -> None:
                await (await e2b_acreate(srv, timeout=60)).kill()
                for w in workers:
                    line = await run_way(
                        lambda: e2b_acreate(srv, timeout=60), lambda: pid_cpu(pid),
                        args.seconds, w,
                    )  # fmt: skip
                    print(f"server   {w:2d} clients: {line}", flush=True)

            asyncio.run(served())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
