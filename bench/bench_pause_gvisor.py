"""gvisor tier pause/resume: checkpoint time, image size, restore -> first agent answer.

Run: ``.venv/bin/python bench/bench_pause_gvisor.py [-n 10]`` (as root, runsc installed).
Each round, interleaved so that drift of the machine hits all alike:

* create: ``start()`` -> the agent's answer to a PING queued at once (what a new sandbox costs);
* pause: ``checkpoint(leave_running=False)`` + ``kill()`` of a sandbox that ran a Python kernel
  context (a variable in it), and the image size;
* resume: ``restore()`` under the same id (with its RESUME handshake: the agent was
  quiesced) -> the answer to a PING, then -> ``print(x)`` in the restored kernel;
* snapshot: ``checkpoint(leave_running=True)`` -> the same stream answering again;
* fork5: five ``restore()`` of that snapshot at once (new ids) -> all five answered a PING.

Prints median and range of each (target: resume <= 0.5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from moat.protocol import AGENT_TO_HOST, Decoder, Frame, MsgType, encode
from moat.runtime.gvisor import GvisorRuntime, GvisorSandbox
from moat.runtime.gvisor.checkpoint import IMAGE
from moat.runtime.spec import SandboxSpec


class _Talk:
    """The host side, as the engine's client is for a checkpoint: it quiesces the agent
    (``sb.agent_gate``), so the checkpoints and restores here take the RESUME handshake."""

    def __init__(self, sb: GvisorSandbox) -> None:
        self.sb, self.dec, self.rid = sb, Decoder(direction=AGENT_TO_HOST), 0
        sb.agent_gate = self

    async def quiesce(self, timeout: float) -> None:
        await asyncio.wait_for(self.call(MsgType.QUIESCE), timeout)

    def release(self) -> None:
        self.rid += 1
        self.sb.writer.write(encode(Frame(MsgType.RESUME, self.rid, {})))

    async def call(self, mtype: MsgType, **fields: object) -> bytes:
        self.rid += 1
        self.sb.writer.write(encode(Frame(mtype, self.rid, dict(fields))))
        await self.sb.writer.drain()
        out = b""
        while True:
            data = await asyncio.wait_for(self.sb.reader.read(1 << 16), 60)
            if not data:
                raise EOFError("agent stream closed")
            for f in self.dec.feed(data):
                if f.id != self.rid:
                    continue
                if f.type is MsgType.STDOUT:
                    out += f.payload
                elif f.type is MsgType.DONE:
                    return out
                elif f.type is MsgType.FAIL:
                    raise RuntimeError(f"agent failed: {f.fields}")


async def create(rt: GvisorRuntime) -> float:
    spec = SandboxSpec(sandbox_id="bench-" + uuid.uuid4().hex[:10], tier="gvisor")
    t0 = time.perf_counter()
    sb = await rt.start(spec)
    try:
        await _Talk(sb).call(MsgType.PING)  # READY has id 0: skipped
        return time.perf_counter() - t0
    finally:
        await sb.kill()


async def fork(rt: GvisorRuntime, snap: Path) -> GvisorSandbox:
    spec = SandboxSpec(sandbox_id="bench-" + uuid.uuid4().hex[:10], tier="gvisor")
    sb = await rt.restore(spec, snap)
    try:
        await _Talk(sb).call(MsgType.PING)
    except BaseException:
        await sb.kill()
        raise
    return sb


async def cycle(rt: GvisorRuntime, base: Path) -> dict[str, float]:
    spec = SandboxSpec(sandbox_id="bench-" + uuid.uuid4().hex[:10], tier="gvisor")
    sb = await rt.start(spec)
    talk = _Talk(sb)
    code = {"context": "default", "language": "python"}
    out: dict[str, float] = {}
    try:
        await talk.call(MsgType.EXEC, code="x = 42", **code)
        snap = base / "snap"
        snap.mkdir()
        t0 = time.perf_counter()
        await rt.checkpoint(sb, snap, memory=True, leave_running=True)
        await talk.call(MsgType.PING)  # released in place: the same stream
        out["snapshot"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        forks = await asyncio.gather(*(fork(rt, snap) for _ in range(5)))
        out["fork5"] = time.perf_counter() - t0
        await asyncio.gather(*(f.kill() for f in forks))
        dest = base / "pause"
        dest.mkdir()
        t0 = time.perf_counter()
        await rt.checkpoint(sb, dest, memory=True, leave_running=False)
        out["checkpoint"] = time.perf_counter() - t0
        await sb.kill()
        out["pause"] = time.perf_counter() - t0
        out["image_mib"] = (dest / IMAGE).stat().st_size / (1 << 20)
        t0 = time.perf_counter()
        sb = await rt.restore(spec, dest)
        talk = _Talk(sb)
        await talk.call(MsgType.PING)
        out["resume"] = time.perf_counter() - t0
        got = await talk.call(MsgType.EXEC, code="print(x)", **code)
        out["resume_run_code"] = time.perf_counter() - t0
        if got != b"42\n":
            raise RuntimeError(f"restored kernel answered {got!r}")
        return out
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
    runs: dict[str, list[float]] = {}
    await create(rt)  # warm-up: agent dir, compat library, runsc's version
    await cycle(rt, Path(tempfile.mkdtemp(prefix="moat-bench-")))
    for _ in range(args.n):
        runs.setdefault("create", []).append(await create(rt))
        base = Path(tempfile.mkdtemp(prefix="moat-bench-"))
        try:
            for k, v in (await cycle(rt, base)).items():
                runs.setdefault(k, []).append(v)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    print(f"gvisor pause/resume, platform {args.platform}, n={args.n} (median [min-max])")
    for k, v in runs.items():
        unit, scale = ("MiB", 1.0) if k == "image_mib" else ("ms", 1000.0)
        med, lo, hi = (statistics.median(v) * scale, min(v) * scale, max(v) * scale)
        print(f"  {k:16} {med:8.1f} {unit}  [{lo:.1f}-{hi:.1f}]")


if __name__ == "__main__":
    asyncio.run(main())
