"""Benchmark microVM pause/resume with memory (issue 11) beside a create in the same run.

Per run, a 128 MiB guest (memory limit 32 MiB; TCG or KVM as the probe decides):
  create   start (from the base VM snapshot) -> first ``run_code`` result (``x = 1; x``)
  pause    ``checkpoint(memory=True, leave_running=False)``: stop, migrate, compress, fsync
  size     the checkpoint's stream: raw (what QEMU wrote) and zstd-compressed (on disk)
  resume   ``restore`` -> the agent's READY -> first ``run_code`` result (``x``, kept)
  fork     5 restores from one checkpoint, one after another -> each one's first result

Usage: python bench/bench_pause_microvm.py [-n 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from moat.protocol import AGENT_TO_HOST, Decoder, Frame, MsgType, encode
from moat.runtime.microvm import MicroVMProcess, MicroVMRuntime, checkpoint
from moat.runtime.spec import Limits, SandboxSpec


def _spec() -> SandboxSpec:
    return SandboxSpec(
        sandbox_id="bench-" + uuid.uuid4().hex[:10], tier="microvm", limits=Limits(memory_mb=32)
    )


class Agent:
    """Just enough of the host side: READY, then one run_code at a time."""

    def __init__(self, vm: MicroVMProcess) -> None:
        self.vm = vm
        self.dec = Decoder(direction=AGENT_TO_HOST)
        self.pending: list[Frame] = []
        self.rid = 0

    async def until(self, rid: int, kinds: set[MsgType]) -> Frame:
        while True:
            while self.pending:
                f = self.pending.pop(0)
                if f.id == rid and f.type in kinds:
                    return f
            data = await asyncio.wait_for(self.vm.reader.read(1 << 16), 120)
            if not data:
                raise EOFError("agent closed")
            self.pending.extend(self.dec.feed(data))

    async def run(self, code: str) -> str:
        self.rid += 1
        fields = {"context": "default", "language": "python", "code": code}
        self.vm.writer.write(encode(Frame(MsgType.EXEC, self.rid, fields)))
        res = await self.until(self.rid, {MsgType.RESULT, MsgType.FAIL, MsgType.ERROR})
        if res.type is not MsgType.RESULT:
            raise RuntimeError(f"run_code failed: {res.fields}")
        await self.until(self.rid, {MsgType.DONE})
        return str(res.fields["data"].get("text"))


async def one_run(rt: MicroVMRuntime, work: Path) -> dict[str, float]:
    spec = _spec()
    t0 = time.monotonic()
    vm = await rt.start(spec)
    agent = Agent(vm)
    await agent.until(0, {MsgType.READY})
    assert await agent.run("x = 1\nx") == "1", "run_code"
    t_create = time.monotonic() - t0
    dest = work / uuid.uuid4().hex
    dest.mkdir()
    try:
        t0 = time.monotonic()
        await rt.checkpoint(vm, dest, memory=True, leave_running=False)
        t_pause = time.monotonic() - t0
        await vm.kill()
        mem = json.loads((dest / checkpoint.MANIFEST).read_text())["memory"]
        t0 = time.monotonic()
        vm = await rt.restore(spec, dest)
        agent = Agent(vm)
        await agent.until(0, {MsgType.READY})
        t_ready = time.monotonic() - t0
        assert await agent.run("x") == "1"
        t_resume = time.monotonic() - t0
        await vm.kill()
        return {
            "create": t_create,
            "pause": t_pause,
            "raw_mb": mem["raw_size"] / 1e6,
            "zst_mb": mem["size"] / 1e6,
            "ready": t_ready,
            "resume": t_resume,
        }
    finally:
        await vm.kill()
        shutil.rmtree(dest, ignore_errors=True)


async def fork5(rt: MicroVMRuntime, work: Path) -> list[float]:
    src = await rt.start(_spec())
    agent = Agent(src)
    await agent.until(0, {MsgType.READY})
    await agent.run("x = 5\nx")
    dest = work / "fork"
    dest.mkdir()
    times = []
    try:
        await rt.checkpoint(src, dest, memory=True, leave_running=True)
        for _ in range(5):
            t0 = time.monotonic()
            vm = await rt.restore(_spec(), dest)
            try:
                a = Agent(vm)
                await a.until(0, {MsgType.READY})
                assert await a.run("x") == "5"
                times.append(time.monotonic() - t0)
            finally:
                await vm.kill()
    finally:
        await src.kill()
        shutil.rmtree(dest, ignore_errors=True)
    return times


def med(xs: list[float], unit: str = "s") -> str:
    return f"{statistics.median(xs):7.3f}{unit} (min {min(xs):.3f}, max {max(xs):.3f})"


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5)
    n = ap.parse_args().n
    rt = MicroVMRuntime(snapshots=True)
    reason = rt.probe()
    if reason:
        print(f"microvm unavailable: {reason}")
        return 1
    work = Path(tempfile.mkdtemp(prefix="moat-bench-pause-"))
    try:
        await one_run(rt, work)  # the base VM snapshot and caches (not measured)
        runs = [await one_run(rt, work) for _ in range(n)]
        forks = await fork5(rt, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"accelerator: {rt._choose_accel()}, runs: {n}, host cpus: {os.cpu_count()}, guest 128 MiB"
    )
    rows = [
        ("create -> first result", "create", "s"),
        ("pause (checkpoint, stopped)", "pause", "s"),
        ("checkpoint stream raw", "raw_mb", "MB"),
        ("checkpoint on disk (zstd)", "zst_mb", "MB"),
        ("resume -> agent READY", "ready", "s"),
        ("resume -> first result", "resume", "s"),
    ]
    for label, key, unit in rows:
        print(f"{label:32s}{med([r[key] for r in runs], unit)}")
    print(f"{'fork: each of 5 -> first result':32s}{med(forks)}  total {sum(forks):.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
