"""microVM checkpoint/restore with memory (issue 11), at the driver, with real QEMU (TCG).

Few and lean: each restore costs seconds here. A 128 MiB guest (memory limit 32 MiB). What
must survive (a file in /home/user, a Python variable in the default context, a background
``http.server`` answering on its port) and what must not (shared CRNG state, leftovers) is
checked from outside the guest's agent: results come back through a fresh host channel, and
processes, fds, cgroups and files are counted on the host.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import require
from tests.killcheck import cgroup_dirs, eventually
from tests.raw_agent import Client

from moat.errors import DiskFullError, PolicyError
from moat.protocol import Frame, MsgType, encode
from moat.runtime.base import Checkpointable
from moat.runtime.microvm import MicroVMProcess, MicroVMRuntime, checkpoint
from moat.runtime.spec import Limits, SandboxSpec

RUNTIME = MicroVMRuntime(snapshots=True)
_REASON = RUNTIME.probe()
pytestmark = [pytest.mark.microvm, pytest.mark.slow, pytest.mark.timeout(600)]
PORT = 8765


@pytest.fixture(autouse=True)
def _prerequisite() -> None:
    require(_REASON, "the microvm tier")


@pytest.fixture
def ckdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="moat-ckpt-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _spec(**kw: object) -> SandboxSpec:
    return SandboxSpec(
        sandbox_id="t-" + uuid.uuid4().hex[:12],
        tier="microvm",
        limits=Limits(memory_mb=32),  # a 128 MiB guest
        **kw,  # type: ignore[arg-type]
    )


class Recording(Client):
    """The raw client, remembering the id of every frame it reads."""

    def __init__(self, vm: MicroVMProcess) -> None:
        super().__init__(vm, timeout=60)
        self.seen: list[int] = []

    async def frame(self, timeout: float | None = None) -> Frame:
        f = await super().frame(timeout)
        self.seen.append(f.id)
        return f

    async def send(self, mtype: MsgType, **fields: object) -> int:
        rid, self.next_id = self.next_id, self.next_id + 1
        self.sb.writer.write(encode(Frame(mtype, rid, dict(fields))))
        await self.sb.writer.drain()
        return rid

    async def until(self, rid: int, mtype: MsgType) -> Frame:
        while True:
            f = await self.frame()
            if f.id == rid and f.type is mtype:
                return f


async def _ready(vm: MicroVMProcess) -> Recording:
    client = Recording(vm)
    try:
        ready = await client.frame(timeout=120)
    except BaseException:
        await vm.kill()
        raise
    assert ready.type is MsgType.READY, ready
    return client


async def _py(client: Recording, code: str) -> str:
    """Run ``code`` in the default Python context; its stdout."""
    rid = await client.send(MsgType.EXEC, context="default", language="python", code=code)
    out = []
    while True:
        f = await client.frame()
        if f.id != rid:
            continue
        if f.type is MsgType.STDOUT:
            out.append(f.payload.decode())
        elif f.type is MsgType.RESULT:
            out.append(str(f.fields["data"].get("text/plain", "")))
        elif f.type is MsgType.ERROR:
            raise AssertionError(f.fields)
        elif f.type in (MsgType.DONE, MsgType.FAIL):
            assert f.type is MsgType.DONE, f
            return "".join(out)


def _qemu_pids(sandbox_id: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"moat-{sandbox_id}".encode() in argv:
                found.append(int(entry.name))
    return found


def _cgroups_of(sandbox_id: str) -> list[str]:
    return [str(p) for p in cgroup_dirs(lambda n: n.startswith(f"sbx-{sandbox_id}."))]


def _fds() -> dict[str, str]:
    """This process's open fds and what they are (after closed transports are collected)."""
    gc.collect()
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return out


#: One process printing a line every 0.2 s (a shell loop forking `sleep` is costly on TCG).
TICKER = "python3 -u -c 'import time\nwhile True: print(\"tick\"); time.sleep(0.2)'"
HTTP_GET = (
    f"exec 3<>/dev/tcp/127.0.0.1/{PORT} && printf 'GET /keep.txt HTTP/1.0\\r\\n\\r\\n' >&3 "
    "&& cat <&3 | tail -n1"
)


async def _save(rt: MicroVMRuntime, vm: MicroVMProcess, dest: Path, *, leave: bool) -> float:
    dest.mkdir()
    t0 = time.monotonic()
    await rt.checkpoint(vm, dest, memory=True, leave_running=leave)
    return time.monotonic() - t0


@pytest.mark.asyncio
async def test_state_survives_three_cycles_and_nothing_grows(ckdir: Path) -> None:
    assert isinstance(RUNTIME, Checkpointable) and RUNTIME.keeps_memory
    spec = _spec()
    vm = await RUNTIME.start(spec)
    client = await _ready(vm)
    try:
        out, code = await client.sh(
            "echo kept-$((6*7)) > /home/user/keep.txt && "
            f"(setsid python3 -m http.server {PORT} --bind 127.0.0.1 >/dev/null 2>&1 &) && "
            f"for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/{PORT}) 2>/dev/null && break;"
            " sleep 0.1; done; echo up"
        )
        assert code == 0 and "up" in out, out
        assert (await _py(client, "x = 41\nprint(x)")).strip() == "41"
        # A command streaming output to a request of the old host while it is saved: after a
        # restore nothing of it reaches the new host before READY, nor under the old id; it
        # runs on and a new request re-attaches to it.
        ticker = await client.send(MsgType.CMD_START, cmd=TICKER)
        tick_pid = int((await client.until(ticker, MsgType.STARTED)).fields["pid"])
        await client.until(ticker, MsgType.STDOUT)
        sizes, procs, fds = [], [], []
        for cycle in range(3):
            dest = ckdir / f"c{cycle}"
            await _save(RUNTIME, vm, dest, leave=False)
            await vm.kill()
            manifest = json.loads((dest / checkpoint.MANIFEST).read_text())
            sizes.append(manifest["memory"]["size"])
            vm = await RUNTIME.restore(spec, dest)
            assert _qemu_pids(spec.sandbox_id) == [vm.pid]
            client = await _ready(vm)
            first = client.next_id = 100 * (cycle + 1)  # above every id the old host used
            out, code = await client.sh(
                f"cat /home/user/keep.txt; {HTTP_GET}; ls /proc | grep -c '^[0-9]'"
            )
            assert code == 0, out
            lines = out.split()
            assert lines[0] == "kept-42" and lines[1] == "kept-42", out  # file, and the server
            procs.append(int(lines[-1]))
            assert (await _py(client, "x += 1\nprint(x)")).strip() == str(42 + cycle)
            again = await client.send(MsgType.CMD_CONNECT, pid=tick_pid)
            assert (await client.until(again, MsgType.STARTED)).fields["pid"] == tick_pid
            assert b"tick" in (await client.until(again, MsgType.STDOUT)).payload
            # READY (id 0), then only answers to this host's own requests
            assert client.seen[0] == 0 and min(client.seen[1:]) >= first, client.seen
            ticker = again
            fds.append(len(_fds()))
            shutil.rmtree(dest)
        # nothing grows per cycle: stream size (within 10%), guest processes, host fds
        assert max(sizes) < min(sizes) * 1.10, sizes
        assert len(set(procs)) == 1, procs
        assert len(set(fds)) == 1, fds
        print(f"checkpoint sizes {sizes} guest procs {procs} host fds {fds}")
    finally:
        await vm.kill()

    def gone() -> bool:
        return not _qemu_pids(spec.sandbox_id) and not _cgroups_of(spec.sandbox_id)

    # kill of a restored guest: no hang, nothing left (invariant 5)
    assert await asyncio.to_thread(eventually, gone)


@pytest.mark.asyncio
async def test_restores_diverge_refuse_damage_and_full_disk(ckdir: Path) -> None:
    spec = _spec()
    src = await RUNTIME.start(spec)
    client = await _ready(src)
    forks: list[MicroVMProcess] = []
    try:
        dest = ckdir / "snap"
        took = await _save(RUNTIME, src, dest, leave=True)
        out, code = await client.sh("echo source-runs")  # leave_running: the source serves on
        assert code == 0 and "source-runs" in out
        print(f"checkpoint took {took:.2f}s")

        # Two guests restored from one checkpoint do not share the kernel's CRNG (nor the
        # source's): the host's fresh seed went in through guest root on each restore.
        words = [await _urandom(client)]
        for _ in range(2):
            fork_spec = _spec()
            vm = await RUNTIME.restore(fork_spec, dest)
            forks.append(vm)
            c = await _ready(vm)
            words.append(await _urandom(c))
            out, _ = await c.sh("hostname")
            assert out.strip() == fork_spec.hostname  # a fork's own host name
        assert len(set(words)) == 3 and all(len(w) == 32 for w in words), words
        for vm in forks:
            await vm.kill()
        forks.clear()
        await asyncio.sleep(0.2)  # closed transports let go of their sockets

        # Refused before anything runs: another VM shape, other artifacts, a damaged stream.
        fds_before = _fds()
        bad_spec = SandboxSpec(
            sandbox_id="t-" + uuid.uuid4().hex[:12], tier="microvm", limits=Limits(memory_mb=64)
        )
        with pytest.raises(PolicyError, match="memory_mb"):
            await RUNTIME.restore(bad_spec, dest)
        other = ckdir / "other"
        shutil.copytree(dest, other)
        manifest = json.loads((other / checkpoint.MANIFEST).read_text())
        manifest["qemu"] = "QEMU emulator version 0.0.1"
        (other / checkpoint.MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(PolicyError, match="qemu"):
            await RUNTIME.restore(_spec(), other)
        shutil.rmtree(other)
        shutil.copytree(dest, other)
        _flip_byte(other / checkpoint.MEMORY)
        tampered = _spec()
        with pytest.raises(PolicyError, match="damaged"):
            await RUNTIME.restore(tampered, other)

        def gone() -> bool:
            return not _qemu_pids(tampered.sandbox_id) and not _cgroups_of(tampered.sandbox_id)

        assert await asyncio.to_thread(eventually, gone)  # no QEMU, no cgroup left
        assert _fds().keys() == fds_before.keys(), (fds_before, _fds())  # no fd left
        # positive control: the untouched checkpoint still restores
        vm = await RUNTIME.restore(_spec(), dest)
        forks.append(vm)
        await _ready(vm)

        # A full disk: a clear error, nothing of ours in the directory, the source runs on.
        full = ckdir / "full"
        full.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True)
        try:
            with pytest.raises(DiskFullError):
                await RUNTIME.checkpoint(src, full, memory=True, leave_running=True)
            assert list(full.iterdir()) == []
        finally:
            subprocess.run(["umount", str(full)], check=True)
        out, code = await client.sh("echo still-runs")
        assert code == 0 and "still-runs" in out
    finally:
        for vm in forks:
            await vm.kill()
        await src.kill()


async def _urandom(client: Client) -> str:
    out, code = await client.sh("head -c16 /dev/urandom | od -An -tx1 | tr -d ' \\n'")
    assert code == 0, out
    return out.strip()


def _flip_byte(path: Path) -> None:
    """Flip one byte in the middle of ``path`` (a damaged or altered checkpoint)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
