"""Container tier benchmark: moat beside raw bubblewrap, in the same run.

    .venv/bin/python bench/bench_container.py [--runs 20]

Prints medians (ms) and ratios. Targets (2-core machine): create->first result <= 1.5x raw
bwrap; warm run_code <= 2 ms; kill <= 50 ms; idle sandbox <= 15 MiB PSS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

from moat import Sandbox
from moat.runtime.container.driver import UID_BASE, UID_SPAN


def raw_bwrap_argv() -> list[str]:
    """bwrap with the same namespaces and a comparable root, running python3 -c 1+1."""
    argv = [
        "setpriv", "--reuid", str(UID_BASE + 7), "--regid", str(UID_BASE), "--clear-groups",
        "bwrap", "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--unshare-net", "--unshare-cgroup", "--disable-userns", "--uid", "1000", "--gid", "1000",
        "--die-with-parent", "--new-session", "--clearenv", "--setenv", "PATH", "/usr/bin",
        "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev",
        "--tmpfs", "/home/user", "--tmpfs", "/tmp", "--remount-ro", "/",
        "/usr/bin/python3", "-I", "-c", "1+1",
    ]  # fmt: skip
    return argv


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def sandbox_pids() -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if UID_BASE <= d.stat().st_uid < UID_BASE + UID_SPAN:
                    out.append(int(d.name))
            except OSError:
                pass
    return out


async def agent_start_times(n: int) -> list[float]:
    """Spawn -> the agent's READY frame, through the container driver alone."""
    import asyncio

    from moat.runtime.container import ContainerRuntime
    from moat.runtime.spec import SandboxSpec

    rt = ContainerRuntime()
    rt.probe()
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        proc = await rt.start(SandboxSpec(sandbox_id=f"sbx-agentstart{i:04d}", tier="container"))
        await asyncio.wait_for(proc.reader.read(64), 10)
        out.append(time.perf_counter() - t0)
        await proc.kill()
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--pool", type=int, default=0, help="warm sandboxes (MOAT_WARM_POOL)")
    args = ap.parse_args()
    n = args.runs
    os.environ["MOAT_WARM_POOL"] = f"container={args.pool}" if args.pool else "0"
    # warm up both paths (page cache, seccomp filter compile, agent copy)
    subprocess.run(raw_bwrap_argv(), check=True)
    with Sandbox.create(isolation="container") as s:
        s.run_code("1+1")

    raw, create, kill, warm, cmd, pss = [], [], [], [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(raw_bwrap_argv(), check=True)
        raw.append(time.perf_counter() - t0)

        time.sleep(0.15 if args.pool else 0)  # a pool refills between two creates
        t0 = time.perf_counter()
        s = Sandbox.create(isolation="container", timeout=120)
        assert s.run_code("1+1").text == "2"
        create.append(time.perf_counter() - t0)
        for _ in range(10):
            t0 = time.perf_counter()
            s.run_code("1+1")
            warm.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            s.commands.run("true")
            cmd.append(time.perf_counter() - t0)
        time.sleep(0.2)
        pss.append(pss_kib(sandbox_pids()) / 1024)
        t0 = time.perf_counter()
        s.kill()
        kill.append(time.perf_counter() - t0)

    import asyncio

    agent = asyncio.run(agent_start_times(n))
    rows = [
        ("raw bwrap python3 -c 1+1", med(raw), None, None),
        ("create -> first run_code('1+1')", med(create), med(create) / med(raw), 1.5),
        ("warm run_code('1+1') round trip", med(warm), None, 2.0),
        ("commands.run('true') round trip", med(cmd), None, None),
        ("kill", med(kill), None, 50.0),
        ("agent start (spawn -> READY)", med(agent), None, None),
    ]
    pool = f", warm pool {args.pool}" if args.pool else ", no warm pool"
    print(f"container tier, {n} runs, medians  (host: {os.cpu_count()} cpus{pool})")
    print(f"{'measure':<36}{'ms':>10}{'ratio':>9}{'target':>9}")
    for name, value, ratio, target in rows:
        r = f"{ratio:.2f}x" if ratio is not None else ""
        t = (f"{target:.1f}x" if ratio is not None else f"{target:g}ms") if target else ""
        print(f"{name:<36}{value:>10.2f}{r:>9}{t:>9}")
    print(
        f"{'idle sandbox memory (PSS, MiB)':<36}{statistics.median(pss):>10.1f}{'':>9}{'15MiB':>9}"
    )


if __name__ == "__main__":
    main()
