"""Benchmark the microvm tier beside raw QEMU on the same kernel and initramfs.

Measures (medians of N runs, TCG or KVM as the probe decides):
  raw     QEMU boots the same kernel + initramfs whose /init only echoes to the serial port:
          start -> the line appears on QEMU's stdout
  cold    moat start (no snapshot) -> agent READY -> first PING reply; and -> first run_code
          result (``1+1``)
  restore moat start from the base VM snapshot -> first PING reply; -> first result

Usage: python bench/bench_microvm.py [-n 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from moat.protocol import AGENT_TO_HOST, Decoder, Frame, MsgType, encode
from moat.runtime.microvm import MicroVMRuntime, artifacts, cpio, probe, qemu
from moat.runtime.microvm.driver import _initrd
from moat.runtime.spec import SandboxSpec

RAW_INIT = (
    b"#!/.moat/bin/busybox sh\n"
    b"/.moat/bin/busybox echo RAW-BOOT-OK\n"
    b"/.moat/bin/busybox poweroff -f\n"
)


def raw_boot(initrd: str, accel: str) -> float:
    arts = artifacts.load()
    assert arts is not None
    host, guest = socket.socketpair()  # the same agent port device, left unused
    argv = qemu.build_argv(
        qemu.VMConfig(
            qemu=probe.qemu_binary() or "qemu-system-x86_64", accel=accel,
            vmlinux=str(arts.vmlinux), initrd=initrd, usr_image=str(arts.usr_image),
            memory_mb=qemu.MIN_VM_MB, cpus=1, tsc_khz=probe.host_tsc_khz(), name="moat-bench-raw",
            agent_fd=guest.fileno(),
        )
    )  # fmt: skip
    # Same machine, kernel, initramfs and devices; the console goes to stdout instead of null.
    argv[argv.index("null,id=con")] = "stdio,id=con"
    t0 = time.monotonic()
    p = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, pass_fds=(guest.fileno(),)
    )
    guest.close()
    try:
        assert p.stdout is not None
        for line in p.stdout:
            if b"RAW-BOOT-OK" in line:
                return time.monotonic() - t0
        raise RuntimeError("raw boot printed nothing")
    finally:
        p.kill()
        p.wait()
        host.close()


async def first_replies(rt: MicroVMRuntime) -> tuple[float, float, float]:
    spec = SandboxSpec(sandbox_id="bench-" + uuid.uuid4().hex[:10], tier="microvm")
    t0 = time.monotonic()
    vm = await rt.start(spec)
    dec = Decoder(direction=AGENT_TO_HOST)
    pending: list[Frame] = []

    async def until(rid: int, kinds: set[MsgType]) -> Frame:
        while True:
            while pending:
                f = pending.pop(0)
                if f.id == rid and f.type in kinds:
                    return f
            data = await asyncio.wait_for(vm.reader.read(1 << 16), 120)
            if not data:
                raise EOFError("agent closed")
            pending.extend(dec.feed(data))

    try:
        await until(0, {MsgType.READY})
        vm.writer.write(encode(Frame(MsgType.PING, 1)))
        await until(1, {MsgType.DONE})
        t_ping = time.monotonic() - t0
        vm.writer.write(
            encode(
                Frame(MsgType.EXEC, 2, {"context": "default", "language": "python", "code": "1+1"})
            )
        )
        res = await until(2, {MsgType.RESULT, MsgType.FAIL})
        t_result = time.monotonic() - t0
        if res.type is MsgType.FAIL:
            raise RuntimeError(f"run_code failed: {res.fields}")
        return t_ping, t_result, 0.0
    finally:
        await vm.kill()


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.3f}s (min {min(xs):.3f}, max {max(xs):.3f})"


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5)
    n = ap.parse_args().n
    cold_rt, snap_rt = MicroVMRuntime(snapshots=False), MicroVMRuntime(snapshots=True)
    reason = cold_rt.probe()
    if reason:
        print(f"microvm unavailable: {reason}")
        return 1
    accel = cold_rt._choose_accel()
    arts = artifacts.load()
    assert arts is not None
    initrd, _ = _initrd(arts)
    with tempfile.NamedTemporaryFile(suffix=".cpio", delete=False) as f:
        f.write(initrd.read_bytes() + cpio.archive([cpio.file("/init", RAW_INIT, 0o755)]))
        raw_initrd = f.name
    os.chmod(raw_initrd, 0o644)
    try:
        await first_replies(snap_rt)  # creates the base VM snapshot (not measured)
        raw = [raw_boot(raw_initrd, accel) for _ in range(n)]
        cold = [await first_replies(cold_rt) for _ in range(n)]
        rest = [await first_replies(snap_rt) for _ in range(n)]
    finally:
        os.unlink(raw_initrd)
    raw_m = statistics.median(raw)

    def row(label: str, xs: list[float], ratio: bool = True) -> None:
        extra = f"  = {statistics.median(xs) / raw_m:.2f}x raw" if ratio else ""
        print(f"{label:36s}{med(xs)}{extra}")

    print(f"accelerator: {accel}, runs: {n}, host cpus: {os.cpu_count()}")
    row("raw QEMU boot -> shell echo", raw, ratio=False)
    row("moat cold create -> first reply", [c[0] for c in cold])
    row("moat cold create -> 1+1 result", [c[1] for c in cold])
    row("moat restore -> first reply", [r[0] for r in rest])
    row("moat restore -> 1+1 result", [r[1] for r in rest])
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
