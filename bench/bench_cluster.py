"""Cluster benchmark (issue 13): placement latency, creates/s, node-loss detection, memory.

    PYTHONPATH=src .venv/bin/python bench/bench_cluster.py [--runs 15] [--burst 12]

One run starts a Ray head and three moat nodes on loopback (``moat node``, container tier,
each its own state dir), and a ``ClusterFrontDoor`` in this process. It prints:

* placement: the median time of a placement group's create -> ready -> node lookup (what a
  clustered create adds before the node starts the sandbox), and the median clustered create
  beside the median create of a local FrontDoor (one host, no Ray) in the same run;
* creates/s: ``burst`` concurrent creates through the 3-node cluster vs the local front door
  (on this 2-core machine all nodes share the same CPUs: no scaling is expected here);
* node death -> SandboxLostError: SIGKILL of a node's raylet to the first call that raises;
* memory: resident size of each node's actor (the engine it hosts) after the creates.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster_support import kill_raylet, start_cluster, wait_nodes
from tests.loopnet import loopback_only_netns

from moat.cluster.door import ClusterFrontDoor
from moat.cluster.resources import bundle_for
from moat.engine.api import FrontDoor, kill_everything
from moat.errors import SandboxLostError


def med(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1000:7.1f} ms  range {min(xs) * 1000:.1f}-" + (
        f"{max(xs) * 1000:.1f} ms"
    )


async def placement_only(runs: int) -> list[float]:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        pg = await asyncio.to_thread(placement_group, [bundle_for("container", 512)], "STRICT_PACK")
        await pg.ready()
        await asyncio.to_thread(ray.util.placement_group_table, pg)
        out.append(time.perf_counter() - t0)
        remove_placement_group(pg)
    return out


async def creates(front: Any, tenant: str, runs: int) -> list[float]:
    cfg = front.resolve(isolation="container", timeout=120)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        info = await front.create(tenant, cfg)
        out.append(time.perf_counter() - t0)
        await front.kill(tenant, info.sandbox_id)
    return out


async def burst(front: Any, tenant: str, n: int) -> float:
    cfg = front.resolve(isolation="container", timeout=120)
    t0 = time.perf_counter()
    infos = await asyncio.gather(*(front.create(tenant, cfg) for _ in range(n)))
    rate = n / (time.perf_counter() - t0)
    await asyncio.gather(*(front.kill(tenant, i.sandbox_id) for i in infos))
    return rate


async def main(args: argparse.Namespace) -> None:
    import ray

    os.environ.setdefault("MOAT_WARM_POOL", "0")
    work = Path(tempfile.mkdtemp(prefix="moat-bench-cluster-"))
    t0 = time.perf_counter()
    cluster = start_cluster(work)
    try:
        ray.init(address=cluster.address, namespace="moat", log_to_driver=False,
                 configure_logging=False)  # fmt: skip
        for i, name in enumerate(("n1", "n2", "n3")):
            cluster.add_node(name, "container", 64)
            wait_nodes(i + 1, timeout=120)
        door = ClusterFrontDoor(cluster.address)
        await door.start(min_nodes=3)
        print(f"cluster of 3 nodes up in {time.perf_counter() - t0:.1f} s")
        local = FrontDoor()
        await creates(local, "bench", 2)  # warm both paths
        await creates(door, "bench", 3)
        print(f"placement group create->ready->lookup  {med(await placement_only(args.runs))}")
        clustered = await creates(door, "bench", args.runs)
        single = await creates(local, "bench", args.runs)
        print(f"create, clustered (3 nodes)           {med(clustered)}")
        print(f"create, local front door (no Ray)     {med(single)}")
        added = statistics.median(clustered) - statistics.median(single)
        print(f"added by the cluster (median)         {added * 1000:7.1f} ms")
        c_rate = await burst(door, "bench", args.burst)
        l_rate = await burst(local, "bench", args.burst)
        print(f"burst of {args.burst}: {c_rate:.2f} creates/s through 3 nodes, "
              f"{l_rate:.2f} creates/s local")  # fmt: skip
        for node in door.nodes.values():
            stats = await node.handle.stats.remote()
            print(f"node actor {node.node_id[:12]}: rss {stats['rss_bytes'] / 2**20:.0f} MiB")
        lost = []
        for _ in range(2):
            info = await door.create("bench", door.resolve(isolation="container", timeout=120))
            sid = info.sandbox_id
            victim = _node_of(cluster.nodes, _ppid(door.node_of("bench", sid)["pid"]))
            killed = kill_raylet(cluster.nodes[victim])
            while True:
                try:
                    await door.list_commands("bench", sid)
                except SandboxLostError:
                    lost.append(time.monotonic() - killed)
                    break
                await asyncio.sleep(0.02)
        print(f"node death -> SandboxLostError        {med(lost)} ({len(lost)} nodes)")
        await door.close()
        await kill_everything(local.engine)
    finally:
        ray.shutdown()
        cluster.stop()


def _node_of(nodes: dict[str, Any], raylet: int) -> str:
    for name, node in nodes.items():
        try:
            if node.raylet() == raylet:
                return name
        except RuntimeError:  # a node killed before
            continue
    raise RuntimeError("no node runs that raylet")


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--burst", type=int, default=12)
    with loopback_only_netns():  # Ray's ports on loopback only, as in the tests
        asyncio.run(main(parser.parse_args()))
