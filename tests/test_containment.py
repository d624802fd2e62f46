"""Containment on the container tier: every check looks from OUTSIDE too, with controls.

Invariants 1 (no ambient authority), 5 (nothing survives), 9 (no privilege inside), 10 (the
kernel enforces limits).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from moat import CommandExitError, Limits, Mount, Sandbox, SandboxError
from moat.egress import proxy_env
from moat.engine.session import CA_BUNDLE_PATH, PROXY_PORT
from moat.runtime.container.driver import UID_BASE, UID_SPAN
from tests.conftest import require_tier

pytestmark = pytest.mark.container


def sandbox_procs() -> set[int]:
    """Host pids running as a sandbox uid (seen from outside)."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                uid = d.stat().st_uid
            except OSError:
                continue
            if UID_BASE <= uid < UID_BASE + UID_SPAN:
                out.add(int(d.name))
    return out


def _stat(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text()[:80]
    except OSError:
        return "gone"


def moat_cgroups() -> set[str]:
    found = set()
    for root in Path("/sys/fs/cgroup").glob("*"):
        for p in root.rglob("sbx-*"):
            found.add(str(p))
    return found


def test_host_environment_does_not_leak() -> None:
    require_tier("container")
    canary = "canary-" + secrets.token_hex(12)
    os.environ["MOAT_TEST_CANARY"] = canary
    try:
        with Sandbox.create(isolation="container", timeout=60, envs={"GIVEN": canary + "-ok"}) as s:
            env = s.commands.run("env").stdout
            proc1 = s.commands.run("cat /proc/1/environ | tr '\\0' '\\n'").stdout
            code = s.run_code("import os; dict(os.environ)").text or ""
    finally:
        del os.environ["MOAT_TEST_CANARY"]
    assert canary + "-ok" in env  # positive control: what the caller names does get in
    for seen in (
        env.replace(canary + "-ok", ""),
        proc1.replace(canary + "-ok", ""),
        code.replace(canary + "-ok", ""),
    ):
        assert canary not in seen
    names = {line.split("=", 1)[0] for line in env.splitlines()}
    moat_own = set(proxy_env(PROXY_PORT, CA_BUNDLE_PATH))  # the egress gateway's proxy settings
    expected = {"PATH", "HOME", "LANG", "LC_ALL", "TERM", "MPLBACKEND", "PWD", "SHLVL", "_",
                "PYTHONDONTWRITEBYTECODE", "GIVEN", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                "MKL_NUM_THREADS"}  # fmt: skip
    assert names <= expected | moat_own


def test_host_files_do_not_leak(tmp_path: Path) -> None:
    require_tier("container")
    canary = "canary-" + secrets.token_hex(12)
    secret_dir = Path("/var/tmp") / f"moat-canary-{secrets.token_hex(4)}"
    secret_dir.mkdir()
    (secret_dir / "secret.txt").write_text(canary)
    os.chmod(secret_dir, 0o755)
    os.chmod(secret_dir / "secret.txt", 0o644)
    try:
        with Sandbox.create(
            isolation="container",
            timeout=60,
            mounts=[Mount(str(secret_dir), "/data/visible")],  # positive control
        ) as s:
            assert s.files.read("/data/visible/secret.txt") == canary
            probe = (
                f"cat {secret_dir}/secret.txt; ls /root /var /home /run /etc/shadow 2>&1; "
                f"grep -r {canary} /etc /opt /tmp /home 2>/dev/null; true"
            )
            out = s.commands.run(probe)
            assert canary not in out.stdout + out.stderr
            etc = set(s.commands.run("ls /etc").stdout.split())
            assert "shadow" not in etc and "passwd" in etc
            passwd = s.files.read("/etc/passwd")
            assert "root:x:0:0" in passwd and Path("/etc/passwd").read_text() != passwd
            assert s.commands.run("ls /home").stdout.split() == ["user"]
    finally:
        (secret_dir / "secret.txt").unlink()
        secret_dir.rmdir()


def test_readonly_system_and_writes_leave_nothing_on_host(sbx: Sandbox) -> None:
    marker = f"moat-w-{secrets.token_hex(4)}"
    for target in (
        f"/usr/{marker}",
        f"/etc/{marker}",
        f"/opt/{marker}",
        f"/{marker}",
        f"/opt/moat/{marker}",
        f"/var/{marker}",
    ):
        r = sbx.commands.run(f"touch {target} 2>&1; echo rc=$?")
        assert "rc=0" not in r.stdout, target
        assert not os.path.exists(target)
    # positive control: the writable places are writable
    assert sbx.commands.run(f"touch /tmp/{marker} /home/user/{marker} && echo ok").stdout == "ok\n"
    assert not os.path.exists(f"/tmp/{marker}")


def test_symlinks_through_files_api_stay_inside(sbx: Sandbox) -> None:
    host_marker = Path("/var/tmp") / f"moat-sym-{secrets.token_hex(4)}"
    host_marker.write_text("host-side")
    try:
        sbx.commands.run(
            f"ln -s {host_marker} /home/user/l1; ln -s /etc/passwd /home/user/l2; "
            "ln -s /proc/1/root/etc /home/user/l3"
        )
        with pytest.raises(Exception):  # noqa: B017 - NotFound: the host file is not there
            sbx.files.read("l1")
        assert "sandbox user" in sbx.files.read("l2")  # the sandbox's passwd, not the host's
        with pytest.raises(Exception):  # noqa: B017
            sbx.files.write("l1", "overwrite")  # dangling link into a read-only root
        with pytest.raises(Exception):  # noqa: B017
            sbx.files.write("l2", "overwrite")  # read-only bind
        assert host_marker.read_text() == "host-side"
        assert "sandbox user" in sbx.files.read("l3/passwd")
    finally:
        host_marker.unlink()


def test_privileges_inside(shared_sbx: Sandbox) -> None:
    status = shared_sbx.files.read("/proc/self/status")  # read by the agent, in the sandbox
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["CapEff"].strip() == "0000000000000000"
    assert fields["CapPrm"].strip() == "0000000000000000"
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"
    assert fields["Uid"].split()[0] == "1000"
    probes = shared_sbx.commands.run(
        "unshare -U true 2>&1; echo u=$?; mount -t tmpfs x /tmp 2>&1; echo m=$?; "
        "python3 -c 'import ctypes; print(ctypes.CDLL(None).ptrace(0,0,0,0), ctypes.get_errno())'"
    ).stdout
    assert "u=0" not in probes and "m=0" not in probes
    # host view: the sandbox's processes run as an unprivileged host uid
    pids = sandbox_procs()
    assert pids
    for pid in pids:
        status_host = Path(f"/proc/{pid}/status").read_text()
        uid = int(status_host.split("Uid:")[1].split()[0])
        assert uid >= UID_BASE


def test_network_is_loopback_only(shared_sbx: Sandbox) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        # positive control: the host itself can connect
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        code = (
            "import socket\nres = []\n"
            f"for addr in [('127.0.0.1', {port}), ('10.0.2.2', 80), ('1.1.1.1', 53)]:\n"
            "    try:\n        socket.create_connection(addr, timeout=2); res.append('open')\n"
            "    except OSError as e:\n        res.append(type(e).__name__)\nres"
        )
        ex = shared_sbx.run_code(code)
        assert "open" not in (ex.text or ""), ex
        ifaces = shared_sbx.commands.run(
            "ls /sys/class/net 2>/dev/null || cat /proc/net/dev"
        ).stdout
        assert "eth" not in ifaces and "lo" in ifaces
    finally:
        server.close()


def test_two_sandboxes_are_isolated() -> None:
    require_tier("container")
    with (
        Sandbox.create(isolation="container", timeout=60) as a,
        Sandbox.create(isolation="container", timeout=60) as b,
    ):
        a.files.write("/tmp/mine", "a-secret")
        h = a.commands.run("sleep 30", background=True)
        assert not b.files.exists("/tmp/mine")
        ps_b = b.commands.run("ls /proc | grep -E '^[0-9]+$' | wc -l").stdout
        assert int(ps_b) < 10  # only b's own few processes
        assert (
            "sleep 30"
            not in b.commands.run("cat /proc/*/cmdline 2>/dev/null | tr '\\0' ' '").stdout
        )
        h.kill()


def test_kill_leaves_nothing_behind() -> None:
    require_tier("container")
    before_procs, before_cg = sandbox_procs(), moat_cgroups()
    before_mounts = Path("/proc/self/mountinfo").read_text()
    s = Sandbox.create(isolation="container", timeout=60)
    s.commands.run("setsid sh -c 'sleep 300 & sleep 300' >/dev/null 2>&1 &", timeout=5)
    s.commands.run("(sleep 301 &) ; nohup sleep 302 >/dev/null 2>&1 &", timeout=5)
    during = sandbox_procs() - before_procs
    assert len(during) >= 5  # positive control: we can see them from outside
    assert moat_cgroups() - before_cg
    t0 = time.monotonic()
    s.kill()
    assert time.monotonic() - t0 < 2
    left = {p: _stat(p) for p in sandbox_procs() & during}
    assert not left
    assert moat_cgroups() == before_cg
    assert Path("/proc/self/mountinfo").read_text() == before_mounts
    assert not s.is_running()


def test_memory_bomb_dies_inside_only() -> None:
    require_tier("container")
    with Sandbox.create(isolation="container", timeout=60, limits=Limits(memory_mb=128)) as s:
        ex = s.run_code("x = bytearray(1024 * 1024 * 1024)\nx[::4096] = b'1' * len(x[::4096])")
        assert ex.error is not None and ex.error.name in ("MemoryError", "ContextDied")
        assert s.run_code("1 + 1").text == "2"  # the sandbox lives on
        with pytest.raises(CommandExitError) as info:  # the OOM killer ends the command
            s.commands.run(
                "python3 -c 'b = bytearray(600 * 2**20); b[::4096] = bytes(len(b[::4096]))'"
            )
        assert info.value.exit_code in (1, 137)
        assert s.is_running() and s.run_code("2 + 2").text == "4"


def test_fork_bomb_hits_pids_cap_host_stays_responsive() -> None:
    require_tier("container")
    before = sandbox_procs()
    with Sandbox.create(isolation="container", timeout=60, limits=Limits(pids=64)) as s:
        h = s.commands.run("bomb() { bomb | bomb & }; bomb", background=True)
        peak, slowest = 0, 0.0
        for _ in range(20):
            t0 = time.monotonic()
            subprocess.run(["true"], check=True)  # the host can still start processes
            slowest = max(slowest, time.monotonic() - t0)
            peak = max(peak, len(sandbox_procs() - before))
            time.sleep(0.1)
        assert slowest < 1.0
        # never above the cap (+1: the outer bwrap, outside the cgroup) ...
        assert 0 < peak <= 64 + 1
        # ... and the bomb really ran into it (the positive control), seen from outside
        proc = s._a._s.proc
        assert proc is not None and proc.stats()["pids_limit_hits"] > 0
        h.kill()
        # the sandbox recovers once the bomb's processes are reaped
        deadline = time.monotonic() + 10
        while True:
            try:
                assert s.run_code("1 + 1").text == "2"
                break
            except SandboxError:  # e.g. the agent can't start a thread while pids are full
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    assert not {p: _stat(p) for p in sandbox_procs() - before}
