"""The microvm tier with real QEMU (TCG here) and the real agent: containment, limits, kill,
snapshot restore.

Every containment case plants its canary outside the sandbox, checks from outside the guest's
view, and keeps a positive control that shows the check can fail.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from tests.conftest import require
from tests.killcheck import cannot_run, cgroup_dirs, eventually
from tests.raw_agent import Client as RawClient

from moat.errors import IsolationUnavailableError
from moat.protocol import Frame, MsgType
from moat.runtime.microvm import MicroVMProcess, MicroVMRuntime, artifacts
from moat.runtime.spec import Limits, SandboxSpec

RUNTIME = MicroVMRuntime(snapshots=True)
_REASON = RUNTIME.probe()
pytestmark = [
    pytest.mark.microvm,
    pytest.mark.slow,
    pytest.mark.timeout(240),
]


@pytest.fixture(autouse=True)
def _prerequisite() -> None:
    """Fails (not skips) where this tier can't run: CI must prove it (see conftest.require)."""
    require(_REASON, "the microvm tier")


class Client(RawClient):
    """The shared raw protocol client, with this tier's patience."""

    def __init__(self, vm: object) -> None:
        super().__init__(vm, timeout=60)  # type: ignore[arg-type]
        self.vm = vm


def _spec(**kw: object) -> SandboxSpec:
    return SandboxSpec(sandbox_id="t-" + uuid.uuid4().hex[:12], tier="microvm", **kw)  # type: ignore[arg-type]


async def _open(rt: MicroVMRuntime, spec: SandboxSpec) -> tuple[MicroVMProcess, Client, Frame]:
    vm = await rt.start(spec)
    client = Client(vm)
    try:
        ready = await client.frame(timeout=120)
    except BaseException:
        await vm.kill()
        raise
    assert ready.type is MsgType.READY
    return vm, client, ready


@pytest_asyncio.fixture
async def box() -> AsyncIterator[tuple[MicroVMProcess, Client]]:
    vm, client, _ = await _open(RUNTIME, _spec())
    try:
        yield vm, client
    finally:
        await vm.kill()


def _qemu_pids(sandbox_id: str) -> list[int]:
    """QEMU processes of one sandbox, found from the host's /proc (by its -name)."""
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


def _state_files() -> set[str]:
    root = artifacts.root()
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.asyncio
async def test_ping_via_real_agent(box: tuple[MicroVMProcess, Client]) -> None:
    vm, client = box
    _, _, done = await client.request(MsgType.PING)
    assert done.type is MsgType.DONE and done.id == 1
    assert vm.alive() and vm.restored
    stats = vm.stats()
    assert stats["memory_bytes"] > 0 and stats["vm_memory_mb"] == 512 + 96


@pytest.mark.asyncio
async def test_kernel_is_the_guests(box: tuple[MicroVMProcess, Client]) -> None:
    _, client = box
    out, code = await client.sh("cat /proc/version; uname -r; id -u; id -g; hostname")
    assert code == 0, out
    lines = out.splitlines()
    host_version = Path("/proc/version").read_text().strip()
    # positive control: both strings are non-empty and of the same shape
    assert lines[0].startswith("Linux version ") and host_version.startswith("Linux version ")
    assert lines[0] != host_version
    assert lines[1] != os.uname().release and lines[1].endswith("-cloud-amd64")
    assert lines[2:5] == ["1000", "1000", "sandbox"]


@pytest.mark.asyncio
async def test_no_dev_kvm_inside(box: tuple[MicroVMProcess, Client]) -> None:
    _, client = box
    if not Path("/dev/kvm").exists():
        pytest.skip("positive control impossible: the host has no /dev/kvm")
    out, code = await client.sh("test -e /dev/kvm && echo PRESENT; ls /dev")
    assert code == 0
    assert "PRESENT" not in out and "kvm" not in out.split()
    assert "null" in out.split()  # control: the listing worked


@pytest.mark.asyncio
async def test_host_processes_invisible(box: tuple[MicroVMProcess, Client]) -> None:
    _, client = box
    marker = "moatcanary" + uuid.uuid4().hex[:8]
    host = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", marker], stdin=subprocess.DEVNULL
    )
    try:
        # positive control: the marker is findable in the host's /proc (once exec'd)
        for _ in range(100):
            if marker.encode() in Path(f"/proc/{host.pid}/cmdline").read_bytes():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("host canary process not visible on the host")
        # The marker goes in reversed, so the guest's own command lines never contain it.
        scan = (
            "import os, sys; m = sys.argv[1][::-1].encode(); ps = [p for p in os.listdir('/proc')"
            " if p.isdigit()]; print(sum(m in open(f'/proc/{p}/cmdline', 'rb').read()"
            " for p in ps), len(ps))"
        )
        out, code = await client.sh(f'python3 -c "{scan}" {marker[::-1]}')
        assert code == 0, out
        count, nprocs = out.split()
        assert count == "0"
        assert 0 < int(nprocs) < 200  # the guest's own few processes
    finally:
        host.kill()
        host.wait()


@pytest.mark.asyncio
async def test_host_env_canary_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    canary = "moatenv" + uuid.uuid4().hex
    monkeypatch.setenv("MOAT_TEST_CANARY", canary)
    # positive control: a host child does see it
    assert canary in subprocess.run(["env"], capture_output=True, text=True).stdout
    vm, client, _ = await _open(RUNTIME, _spec(envs=(("GIVEN", "yes"),)))
    try:
        out, code = await client.sh("env; cat /proc/1/environ | tr '\\0' '\\n'")
        assert code == 0
        assert canary not in out and "MOAT_TEST_CANARY" not in out
        assert "GIVEN=yes" in out and "HOME=/home/user" in out  # the spec's env arrived
    finally:
        await vm.kill()


@pytest.mark.asyncio
async def test_host_file_canary_unreadable(box: tuple[MicroVMProcess, Client]) -> None:
    _, client = box
    secret = "moatfile" + uuid.uuid4().hex
    planted = [Path("/root") / f".moat-canary-{secret[-8:]}", Path("/var/tmp") / f"c-{secret[-8:]}"]
    for p in planted:
        p.write_text(secret)
    try:
        assert all(p.read_text() == secret for p in planted)  # positive control on the host
        cmd = "; ".join(f"cat {p} 2>&1" for p in planted)
        out, _ = await client.sh(
            f"{cmd}; grep -rs {secret} /etc /opt /home /tmp /var /root /run 2>/dev/null | wc -l"
        )
        assert secret not in out.replace(f"grep -rs {secret}", "")
        assert out.strip().splitlines()[-1] == "0"
    finally:
        for p in planted:
            p.unlink()


@pytest.mark.asyncio
async def test_no_network_interface(box: tuple[MicroVMProcess, Client]) -> None:
    _, client = box
    host_ifaces = os.listdir("/sys/class/net")
    assert [i for i in host_ifaces if i != "lo"]  # positive control: the host has a NIC
    out, code = await client.sh("ls /sys/class/net; cat /proc/net/dev | tail -n +3 | wc -l")
    assert code == 0
    *ifaces, count = out.split()
    assert set(ifaces) <= {"lo"} and int(count) <= 1


@pytest.mark.asyncio
async def test_writable_only_home_and_tmp(box: tuple[MicroVMProcess, Client]) -> None:
    _, client = box
    out, _ = await client.sh(
        "touch /home/user/ok && echo HOME_OK; touch /tmp/ok && echo TMP_OK; "
        "touch /usr/x 2>/dev/null || echo USR_RO; touch /etc/x 2>/dev/null || echo ETC_RO; "
        "touch /opt/moat/x 2>/dev/null || echo AGENT_RO; "
        "python3 -c 'import os; os.setuid(0)' 2>/dev/null || echo NOROOT"
    )
    for word in ("HOME_OK", "TMP_OK", "USR_RO", "ETC_RO", "AGENT_RO", "NOROOT"):
        assert word in out, out


@pytest.mark.asyncio
async def test_kill_leaves_nothing() -> None:
    warm, _, _ = await _open(
        RUNTIME, _spec()
    )  # the shared base VM snapshot and initrd caches exist
    await warm.kill()
    before = _state_files()
    spec = _spec()
    vm, client, _ = await _open(RUNTIME, spec)
    pids = _qemu_pids(spec.sandbox_id)
    groups = _cgroups_of(spec.sandbox_id)
    fds_before = set(os.listdir("/proc/self/fd"))
    assert pids == [vm.pid] and groups  # positive controls: we can see what kill must remove
    await client.sh("sleep 1000 & sleep 1000 & echo started")
    t0 = time.monotonic()
    await vm.kill()
    assert time.monotonic() - t0 < 0.5
    assert not vm.alive()
    assert cannot_run(vm.pid)  # QEMU is dying (or gone) when kill() returns
    await vm.kill()  # idempotent

    # the reaper removes the rest in the background (invariant 5)
    def gone() -> bool:
        return not _qemu_pids(spec.sandbox_id) and not _cgroups_of(spec.sandbox_id)

    assert await asyncio.to_thread(eventually, gone)
    assert not Path(f"/proc/{vm.pid}").exists()
    assert _state_files() == before  # no socket, overlay or temp file
    assert not (set(os.listdir("/proc/self/fd")) - fds_before)


@pytest.mark.asyncio
async def test_restored_guests_do_not_share_randomness() -> None:
    cmd = (
        "python3 -c 'import os; print(os.urandom(16).hex())'; "
        "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
        "cat /proc/sys/kernel/random/boot_id"
    )
    outs, readies = [], []
    for _ in range(2):
        vm, client, ready = await _open(RUNTIME, _spec())
        try:
            assert vm.restored
            out, code = await client.sh(cmd)
            assert code == 0, out
            outs.append(out.split())
            readies.append(ready.get("pid"))
        finally:
            await vm.kill()
    # positive control: both guests were restored (vm.restored) from one saved base VM; the
    # agent is pid 1 of its own namespace in both
    assert readies[0] == readies[1] == 1
    a, b = outs
    assert len(a) == len(b) == 3
    assert a[0] != b[0] and a[1] != b[1] and a[2] != b[2]


@pytest.mark.asyncio
async def test_cold_boot_limits_memory_pids_disk() -> None:
    """Cold boot (no snapshot); memory, pids and disk limits bite inside; the host is fine."""
    rt = MicroVMRuntime(snapshots=False)
    limits = Limits(memory_mb=128, pids=48, disk_mb=16, cpus=0.5)
    vm, client, _ = await _open(rt, _spec(limits=limits))
    try:
        assert not vm.restored
        out, code = await client.sh(
            # 8 MiB at a time, each zero-filled (touched): the OOM killer, not malloc, stops it
            "python3 -c \"l = [bytearray(8 << 20) for i in range(50)]; print('sur' + 'vived')\"; "
            "echo rc=$?"
        )
        assert "survived" not in out and "rc=137" in out, out
        out, _ = await client.sh("cat /sys/fs/cgroup/sandbox/memory.events")
        assert "oom_kill 0" not in out and "oom_kill" in out
        # a small allocation is fine (control: the limit is not simply "nothing works")
        out, code = await client.sh("python3 -c 'b = bytearray(32 << 20); print(\"small ok\")'")
        assert code == 0 and "small ok" in out
        forker = (
            "import os, time\n"
            "kids, refused = [], 0\n"
            "for i in range(80):\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except OSError:\n"
            "        refused += 1\n"
            "        continue\n"
            "    if pid == 0:\n"
            "        time.sleep(30)\n"
            "        os._exit(0)\n"
            "    kids.append(pid)\n"
            "print(len(kids), refused, open('/sys/fs/cgroup/sandbox/pids.max').read().strip())\n"
            "for k in kids:\n"
            "    os.kill(k, 9)\n"
            "    os.waitpid(k, 0)\n"
        )
        out, _ = await client.sh(
            f"cat > /tmp/forker.py <<'EOF'\n{forker}EOF\npython3 /tmp/forker.py"
        )
        started, refused, pmax = out.split()[-3:]
        assert pmax == "48" and int(refused) > 0 and int(started) < 48
        out, _ = await client.sh(
            "dd if=/dev/zero of=/tmp/fill bs=1M count=40 2>/dev/null || echo FULL; "
            "stat -c %s /tmp/fill; rm /tmp/fill"
        )
        assert "FULL" in out and 0 < int(out.split()[-1]) <= 16 << 20
        _, _, done = await client.request(MsgType.PING)
        assert done.type is MsgType.DONE and vm.alive()  # the VM and agent survived
    finally:
        await vm.kill()


def test_probe_names_setup_when_not_set_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOAT_STATE_DIR", str(tmp_path))
    rt = MicroVMRuntime()
    reason = rt.probe()
    assert reason is not None and "moat.runtime.microvm.setup" in reason
    with pytest.raises(IsolationUnavailableError, match=r"microvm\.setup"):
        asyncio.run(rt.start(_spec()))
    assert str(tmp_path) not in (reason or "")


def test_firecracker_hook_probe() -> None:
    assert MicroVMRuntime(vmm="firecracker").probe() == "firecracker not installed"
