"""The gvisor tier with real runsc and the real agent: containment, limits, kill, sweep.

Every containment case plants its canary outside the sandbox, checks from outside, and keeps a
positive control that shows the check can fail.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from tests.conftest import require
from tests.killcheck import cannot_run, eventually
from tests.raw_agent import Client as RawClient

from moat.paths import state_dir
from moat.protocol import MsgType
from moat.runtime.gvisor import GvisorRuntime, GvisorSandbox
from moat.runtime.gvisor.hostcg import CGROUP_ROOT, HostCgroup
from moat.runtime.gvisor.oci import CGROUP_PREFIX
from moat.runtime.spec import Limits, Mount, SandboxSpec

RUNTIME = GvisorRuntime()
_REASON = RUNTIME.probe()
pytestmark = [
    pytest.mark.gvisor,
    pytest.mark.timeout(120),
]


@pytest.fixture(autouse=True)
def _prerequisite() -> None:
    """Fails (not skips) where this tier can't run: CI must prove it (see conftest.require)."""
    require(_REASON, "the gvisor tier")


class Client(RawClient):
    """The shared raw protocol client, with this tier's patience."""

    def __init__(self, sb: Any) -> None:
        super().__init__(sb, timeout=30)
        self.sb = sb


def _spec(**kw: object) -> SandboxSpec:
    return SandboxSpec(sandbox_id="t-" + uuid.uuid4().hex[:12], tier="gvisor", **kw)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def box() -> AsyncIterator[tuple[GvisorSandbox, Client]]:
    sb = await RUNTIME.start(_spec(limits=Limits(memory_mb=256, pids=64, disk_mb=64)))
    client = Client(sb)
    try:
        ready = await client.frame()
        assert ready.type is MsgType.READY
        yield sb, client
    finally:
        await sb.kill()


def _host_leftovers(sandbox_id: str, workdir: Path) -> list[str]:
    """Everything of one sandbox visible from the host: processes, cgroups, files."""
    found: list[str] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(workdir).encode() in cmd:
                found.append(f"process {entry.name}")
    for hierarchy in CGROUP_ROOT.iterdir():
        if (hierarchy / (CGROUP_PREFIX + sandbox_id)).exists():
            found.append(f"cgroup {hierarchy.name}")
    if workdir.exists():
        found.append("workdir")
    return found


@pytest.mark.asyncio
async def test_ping_via_real_agent(box: tuple[GvisorSandbox, Client]) -> None:
    sb, client = box
    _, _, done = await client.request(MsgType.PING)
    assert done.type is MsgType.DONE and done.id == 1
    assert sb.alive()
    stats = sb.stats()
    assert stats["memory_bytes"] > 0 and stats["host_tasks"] > 0


@pytest.mark.asyncio
async def test_kernel_is_gvisors(box: tuple[GvisorSandbox, Client]) -> None:
    _, client = box
    out, code = await client.sh("cat /proc/version; uname -r; id -u; hostname")
    assert code == 0
    host_version = Path("/proc/version").read_text().strip()
    assert host_version not in out  # positive control: the host's own string is known
    assert os.uname().release not in out.split()
    assert out.split("\n")[2:4] == ["1000", "sandbox"]


@pytest.mark.asyncio
async def test_host_processes_invisible(box: tuple[GvisorSandbox, Client]) -> None:
    _, client = box
    marker = "moatcanary" + uuid.uuid4().hex[:8]
    host = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", marker], stdin=subprocess.DEVNULL
    )
    try:
        # positive control: the marker is findable in /proc on the host (once it has exec'd)
        cmdline = Path(f"/proc/{host.pid}/cmdline")
        deadline = time.monotonic() + 5
        while marker.encode() not in cmdline.read_bytes() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a host /proc file
            await asyncio.sleep(0.02)
        assert marker.encode() in cmdline.read_bytes()
        out, _ = await client.sh("cat /proc/[0-9]*/cmdline | tr '\\0' ' '; ls /proc")
        assert marker not in out
        assert str(host.pid) not in out.split() or host.pid < 10  # pid namespace of its own
        assert "python3" in out  # the listing itself worked: the agent is there
    finally:
        host.kill()
        host.wait()


@pytest.mark.asyncio
async def test_host_env_canary_absent() -> None:
    canary = "moat-env-" + uuid.uuid4().hex
    os.environ["MOAT_TEST_CANARY"] = canary
    try:
        sb = await RUNTIME.start(_spec(envs=(("MOAT_POSITIVE", "visible-" + canary[-6:]),)))
    finally:
        del os.environ["MOAT_TEST_CANARY"]
    client = Client(sb)
    try:
        await client.frame()
        out, code = await client.sh("env; cat /proc/1/environ | tr '\\0' '\\n'")
        assert code == 0
        assert canary not in out and "MOAT_TEST_CANARY" not in out
        assert "MOAT_POSITIVE=visible-" + canary[-6:] in out  # positive control
    finally:
        await sb.kill()


@pytest.mark.asyncio
async def test_host_file_canary_unreadable(tmp_path: Path) -> None:
    hidden = tmp_path / "hidden"
    shared = tmp_path / "shared"
    hidden.mkdir()
    shared.mkdir()
    secret = "moat-file-" + uuid.uuid4().hex
    (hidden / "canary.txt").write_text(secret)
    (shared / "ok.txt").write_text("bound-" + secret[-6:])
    for d in (tmp_path, hidden, shared):
        d.chmod(0o755)
    (hidden / "canary.txt").chmod(0o644)
    (shared / "ok.txt").chmod(0o644)
    sb = await RUNTIME.start(_spec(mounts=(Mount(str(shared), "/mnt/shared"),)))
    client = Client(sb)
    try:
        await client.frame()
        out, _ = await client.sh(
            f"cat {hidden}/canary.txt; cat /root/.bashrc; ls /var /home /run;"
            " cat /mnt/shared/ok.txt"
        )
        assert secret not in out
        assert "bound-" + secret[-6:] in out  # positive control: a bound file is readable
        assert "No such file" in out
    finally:
        await sb.kill()


@pytest.mark.asyncio
async def test_writes_to_usr_fail(box: tuple[GvisorSandbox, Client]) -> None:
    _, client = box
    name = "moat-write-" + uuid.uuid4().hex[:8]
    out, code = await client.sh(f"touch /usr/{name} /usr/bin/{name} /{name} /etc/{name}")
    assert code != 0
    for p in (f"/usr/{name}", f"/usr/bin/{name}"):
        assert not os.path.exists(p)
    # positive control: HOME and /tmp are writable
    out, code = await client.sh("echo hi > ~/a && echo hi > /tmp/b && cat ~/a /tmp/b")
    assert code == 0 and out == "hi\nhi\n"


@pytest.mark.asyncio
async def test_no_network_but_loopback(box: tuple[GvisorSandbox, Client]) -> None:
    _, client = box
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    try:
        # positive control: the host itself reaches the server
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        conn, _ = srv.accept()
        conn.close()
        code_py = (
            "import socket\n"
            "print(sorted(n for _, n in socket.if_nameindex()))\n"
            "s = socket.socket(); s.settimeout(3)\n"
            f"print('connect', s.connect_ex(('127.0.0.1', {port})))\n"
        )
        out, code = await client.sh(f'python3 -c "{code_py}"')
        assert code == 0, out
        assert "['lo']" in out
        assert "connect 0" not in out and "connect " in out
        srv.settimeout(0.5)
        with pytest.raises(TimeoutError):
            srv.accept()  # nothing from the sandbox arrived
    finally:
        srv.close()


@pytest.mark.asyncio
async def test_memory_limit(box: tuple[GvisorSandbox, Client]) -> None:
    sb, client = box
    alloc = "python3 -c \"x = bytearray({} << 20); x[::4096] = b'a' * len(x[::4096]); print('ok')\""
    out, code = await client.sh(alloc.format(64))
    assert (out, code) == ("ok\n", 0)  # positive control: below the limit works
    out, code = await client.sh(alloc.format(600))  # limit: 256 MiB; address space 2x that
    assert code != 0 and "MemoryError" in out
    assert sb.alive()  # the process died inside; the sandbox lives on
    # Several processes, each under the limit, together over it: the host cgroup ends the
    # whole sandbox rather than let it grow (fail closed).
    many = " & ".join([alloc.format(200).replace("print('ok')", "import time; time.sleep(20)")] * 3)
    try:
        await asyncio.wait_for(client.sh(many + "; wait"), 60)
    except (EOFError, AssertionError):
        pass
    await asyncio.wait_for(sb._proc.wait(), 30)
    assert not sb.alive()


@pytest.mark.asyncio
async def test_pids_limit() -> None:
    sb = await RUNTIME.start(_spec(limits=Limits(memory_mb=512, pids=32)))
    client = Client(sb)
    fork = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(500):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(3); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n"
        "print('forked', n)\n"
    )
    try:
        await client.frame()
        out, _ = await client.sh(f"cat > /tmp/fork.py <<'EOF'\n{fork}EOF\npython3 /tmp/fork.py")
        assert "refused 11" in out  # EAGAIN from the sentry's RLIMIT_NPROC
        forked = int(out.split("forked ")[1].split()[0])
        assert 0 < forked < 32  # positive control: forking works up to the limit
        assert sb.alive()  # the backstop host cgroup did not have to fire
        await asyncio.sleep(3.5)
        _, code = await client.sh("true")
        assert code == 0  # the sandbox works again once the loop's children are gone
    finally:
        await sb.kill()


@pytest.mark.asyncio
async def test_kill_leaves_nothing() -> None:
    spec = _spec()
    workdir = state_dir() / "gvisor" / spec.sandbox_id
    assert _host_leftovers(spec.sandbox_id, workdir) == []
    sb = await RUNTIME.start(spec)
    client = Client(sb)
    await client.frame()
    await client.sh("sleep 100 & sleep 100 & python3 -c 'import time; time.sleep(100)' &")
    during = _host_leftovers(spec.sandbox_id, workdir)
    # positive control: the listing sees the sandbox while it runs
    assert any(x.startswith("process") for x in during)
    assert any(x.startswith("cgroup") for x in during) and "workdir" in during
    pids = HostCgroup(CGROUP_PREFIX + spec.sandbox_id).pids()
    t0 = time.monotonic()
    await sb.kill()
    assert time.monotonic() - t0 < 0.5  # runsc delete (often > 1 s) is not waited for
    assert not sb.alive()
    assert pids and all(cannot_run(p) for p in pids)  # sentry, gofer, stubs: all dying
    await sb.kill()  # idempotent
    # the reaper removes the rest in the background (invariant 5)
    assert await asyncio.to_thread(
        eventually, lambda: not _host_leftovers(spec.sandbox_id, workdir)
    )


def test_sweep_spares_a_live_engines_probe() -> None:
    """Engines share the state directory: one's start-up sweep must not kill another's probe
    sandbox in flight (that failed the other's start with "exit -9")."""
    base = state_dir() / "gvisor"
    live = base / f".probe-{os.getpid()}-test{uuid.uuid4().hex[:6]}"
    dead = base / f".probe-999999999-test{uuid.uuid4().hex[:6]}"
    live.mkdir()
    dead.mkdir()
    try:
        RUNTIME.sweep()
        assert live.is_dir()
        assert not dead.exists()  # positive control: a dead engine's probe is swept
    finally:
        for d in (live, dead):
            if d.exists():
                d.rmdir()


@pytest.mark.asyncio
async def test_sweep_reaps_an_orphan() -> None:
    spec = _spec()
    sb = await RUNTIME.start(spec)
    await Client(sb).frame()
    workdir = sb.workdir
    # Pretend the engine that started it crashed: its owner record names a dead process.
    (workdir / "owner").write_text("999999999 0\n")
    assert RUNTIME.sweep() >= 1
    assert _host_leftovers(spec.sandbox_id, workdir) == []
    await asyncio.wait_for(sb._proc.wait(), 10)
    await sb.kill()


@pytest.mark.asyncio
async def test_sweep_spares_live_sandboxes(box: tuple[GvisorSandbox, Client]) -> None:
    sb, client = box
    RUNTIME.sweep()
    assert sb.alive()
    _, _, done = await client.request(MsgType.PING)
    assert done.type is MsgType.DONE


@pytest.mark.asyncio
async def test_statx_compat_library_is_what_makes_ls_work(
    box: tuple[GvisorSandbox, Client],
) -> None:
    # Control: the raw syscall with AT_NO_AUTOMOUNT still fails under this runsc (if a newer
    # runsc accepts it, the library is moot and this test says so); through libc's statx,
    # which the library wraps, coreutils' flags work.
    _, client = box
    probe = (
        "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
        "buf = ctypes.create_string_buffer(256); "
        "raw = libc.syscall(332, -100, b'/tmp', 0x800, 0x7ff, buf); "
        "wrapped = libc.statx(-100, b'/tmp', 0x800, 0x7ff, buf); "
        "print(raw, wrapped, open('/etc/ld.so.preload').read().strip())"
    )
    out, code = await client.sh(f'python3 -c "{probe}"')
    assert code == 0, out
    raw, wrapped, preload = out.split()
    assert raw == "-1", "this runsc accepts AT_NO_AUTOMOUNT: the statx library is not needed"
    assert wrapped == "0" and preload == "/.moat/statx_compat.so"
