"""gvisor tier: create -> first agent reply, beside raw ``runsc do python3 -c 1+1``.

Run: ``.venv/bin/python bench/bench_gvisor.py [-n 10]`` (as root, runsc installed).
Prints medians of each, and the ratio to the raw tool (target <= 1.5x).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
import uuid

from moat.protocol import AGENT_TO_HOST, Decoder, Frame, MsgType, encode
from moat.runtime.gvisor import GvisorRuntime, GvisorSandbox
from moat.runtime.spec import SandboxSpec


def raw_runsc_do() -> float:
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        subprocess.run(
            ["runsc", "--root", root, "--network=none", "do", "python3", "-c", "1+1"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=root,
            timeout=60,
        )
        return time.perf_counter() - t0


async def _until_done(sb: GvisorSandbox, dec: Decoder, rid: int) -> Frame:
    while True:
        data = await asyncio.wait_for(sb.reader.read(1 << 16), 60)
        if not data:
            raise EOFError("agent stream closed")
        for f in dec.feed(data):
            if f.id == rid and f.type in (MsgType.DONE, MsgType.FAIL, MsgType.READY):
                return f


async def moat_first_reply(rt: GvisorRuntime, command: bool) -> float:
    spec = SandboxSpec(sandbox_id="bench-" + uuid.uuid4().hex[:10], tier="gvisor")
    t0 = time.perf_counter()
    sb = await rt.start(spec)
    try:
        dec = Decoder(direction=AGENT_TO_HOST)
        if command:
            req = Frame(MsgType.CMD_START, 1, {"cmd": "python3 -c 1+1"})
        else:
            req = Frame(MsgType.PING, 1)
        sb.writer.write(encode(req))  # queued before READY: the agent reads it once up
        await sb.writer.drain()
        reply = await _until_done(sb, dec, 1)
        elapsed = time.perf_counter() - t0
        if reply.type is not MsgType.DONE:
            raise RuntimeError(f"agent answered {reply.type}")
        return elapsed
    finally:
        await sb.kill()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--platform", default="ptrace")
    args = ap.parse_args()
    rt = GvisorRuntime(platform=args.platform)
    reason = rt.probe()
    if reason:
        raise SystemExit(reason)
    raw, ping, cmd = [], [], []
    for _ in range(args.n):  # interleaved so drift of the machine hits all three alike
        raw.append(raw_runsc_do())
        ping.append(await moat_first_reply(rt, command=False))
        cmd.append(await moat_first_reply(rt, command=True))
    r, p, c = (statistics.median(x) for x in (raw, ping, cmd))
    print(f"runs: {args.n} each, platform {args.platform}")
    print(f"raw  runsc do python3 -c 1+1        median {r * 1000:7.1f} ms")
    print(f"moat create -> PING reply           median {p * 1000:7.1f} ms  ratio {p / r:.2f}x")
    print(f"moat create -> 'python3 -c 1+1' done median {c * 1000:7.1f} ms  ratio {c / r:.2f}x")
    print("target: <= 1.5x raw runsc do")


if __name__ == "__main__":
    asyncio.run(main())
