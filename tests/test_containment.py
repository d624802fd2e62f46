"""Containment on every tier: each check looks from OUTSIDE too, with a positive control.

Invariants 1 (no ambient authority), 5 (nothing survives), 9 (no privilege inside), 10 (the
kernel enforces limits).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.killcheck import cannot_run, descendants, engine_child, eventually

from moat import (
    CommandExitError,
    Limits,
    Mount,
    PolicyError,
    Sandbox,
    SandboxError,
)
from moat.egress import proxy_env
from moat.model import CA_BUNDLE_PATH, PROXY_PORT
from moat.paths import state_dir
from moat.runtime.container.driver import UID_BASE, UID_SPAN
from moat.testing import session_of

_ENGINES = (b"bwrap", b"runsc", b"qemu-system")


def _stat(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text()[:80]
    except OSError:
        return "gone"


def sandbox_procs() -> set[int]:
    """Host pids of any sandbox (seen from outside): a sandbox uid, or a tier's engine."""
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            uid = d.stat().st_uid
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        # an engine by its program name, not by any argument: a pytest run whose command line
        # names tests/test_bwrap_argv.py is no sandbox
        program = os.path.basename(cmd.split(b"\0", 1)[0])
        engine = any(program.startswith(e) for e in _ENGINES)
        if UID_BASE <= uid < UID_BASE + UID_SPAN or (engine and int(d.name) != os.getpid()):
            out.add(int(d.name))
    return out


def moat_cgroups() -> set[str]:
    """Sandbox cgroups owned by this process (their names carry the owner's pid)."""
    found: set[str] = set()
    mine = f".{os.getpid()}."
    for root in Path("/sys/fs/cgroup").glob("*"):
        # os.walk, not rglob: groups vanish while we list (the reaper removes them)
        for dirpath, dirnames, _files in os.walk(root):
            found.update(f"{dirpath}/{d}" for d in dirnames if "sbx-" in d and mine in d)
    return found


def test_host_environment_does_not_leak(tier: str) -> None:
    canary = "canary-" + secrets.token_hex(12)
    os.environ["MOAT_TEST_CANARY"] = canary
    try:
        with Sandbox.create(isolation=tier, timeout=120, envs={"GIVEN": canary + "-ok"}) as s:
            env = s.commands.run("env").stdout
            proc1 = s.commands.run("cat /proc/1/environ 2>/dev/null | tr '\\0' '\\n'; true").stdout
            code = s.run_code("import os; dict(os.environ)").text or ""
    finally:
        del os.environ["MOAT_TEST_CANARY"]
    assert canary + "-ok" in env  # positive control: what the caller names does get in
    for seen in (env, proc1, code):
        assert canary not in seen.replace(canary + "-ok", "")
    names = {line.split("=", 1)[0] for line in env.splitlines()}
    moat_own = set(proxy_env(PROXY_PORT, CA_BUNDLE_PATH))  # the egress gateway's proxy settings
    expected = {"PATH", "HOME", "LANG", "LC_ALL", "TERM", "MPLBACKEND", "PWD", "SHLVL", "_",
                "PYTHONDONTWRITEBYTECODE", "GIVEN", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                "MKL_NUM_THREADS"}  # fmt: skip
    assert names <= expected | moat_own


@pytest.fixture
def host_secret() -> Iterator[tuple[Path, str]]:
    canary = "canary-" + secrets.token_hex(12)
    secret_dir = Path("/var/tmp") / f"moat-canary-{secrets.token_hex(4)}"
    secret_dir.mkdir()
    (secret_dir / "secret.txt").write_text(canary)
    os.chmod(secret_dir, 0o755)
    os.chmod(secret_dir / "secret.txt", 0o644)
    yield secret_dir, canary
    (secret_dir / "secret.txt").unlink()
    secret_dir.rmdir()


def test_host_files_do_not_leak(tier: str, host_secret: tuple[Path, str]) -> None:
    secret_dir, canary = host_secret
    mounts = [Mount(str(secret_dir), "/data/visible")]  # positive control
    if tier == "microvm":  # read-only mounts are copied in; a writable one is refused
        with pytest.raises(PolicyError):
            Sandbox.create(
                isolation=tier, timeout=60, mounts=[Mount(str(secret_dir), "/w", read_only=False)]
            )
    with Sandbox.create(isolation=tier, timeout=120, mounts=mounts) as s:
        assert s.files.read("/data/visible/secret.txt") == canary
        probe = (
            f"cat {secret_dir}/secret.txt; ls /root /var /home /run /etc/shadow 2>&1; "
            f"grep -r {canary} /etc /opt /tmp /home /var /root 2>/dev/null; true"
        )
        out = s.commands.run(probe)
        assert canary not in out.stdout + out.stderr
        etc = {e.name for e in s.files.list("/etc")}
        assert "shadow" not in etc and "passwd" in etc
        passwd = s.files.read("/etc/passwd")
        assert "user:x:1000:1000" in passwd and Path("/etc/passwd").read_text() != passwd
        assert "user" in {e.name for e in s.files.list("/home")}


def test_readonly_system_and_writes_leave_nothing_on_host(sbx: Sandbox) -> None:
    marker = f"moat-w-{secrets.token_hex(4)}"
    for target in (f"/usr/{marker}", f"/etc/{marker}", f"/opt/{marker}", f"/{marker}",
                   f"/opt/moat/{marker}", f"/usr/bin/{marker}"):  # fmt: skip
        r = sbx.commands.run(f"touch {target} 2>&1; echo rc=$?")
        assert "rc=0" not in r.stdout, target
        assert not os.path.exists(target)
    # positive control: the writable places are writable (and are not the host's)
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
        with pytest.raises(SandboxError):  # NotFound: the host file is not there
            sbx.files.read("l1")
        assert "user:x:1000" in sbx.files.read("l2")  # the sandbox's passwd, not the host's
        with pytest.raises(SandboxError):
            sbx.files.write("l2", "overwrite")  # read-only
        assert host_marker.read_text() == "host-side"
        try:  # may fail (no such dir inside) or create a file inside; never touches the host
            sbx.files.write("l1", "overwrite")
        except SandboxError:
            pass
        assert host_marker.read_text() == "host-side"
    finally:
        host_marker.unlink()


def test_privileges_inside(tier: str, sbx: Sandbox) -> None:
    shared_sbx = sbx
    status = shared_sbx.files.read("/proc/self/status")  # read by the agent, in the sandbox
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    # Every tier's agent keeps CAP_KILL effective (to stop the root calls it started) and
    # root's bounded set (for user="root" calls: the sentry's, the sandbox's own user
    # namespace's, or the guest kernel's) permitted only, never effective (docs/users.md)
    assert fields["CapEff"].strip() == "0000000000000020"
    assert fields["CapPrm"].strip() == "00000000200404fb"
    assert fields["CapBnd"].strip() == "00000000200404fb"  # the sandbox's: root's, no more
    real, effective, saved, fs = fields["Uid"].split()
    assert effective == fs == "1000"
    # gVisor's and the microVM's agents keep a uid of their own as real and saved uid, the
    # container tier's the sandbox's root (moat.agent.shield)
    assert real == saved == {"container": "0"}.get(tier, "999")
    # ...and user code has nothing of it: all four uids the user's, no capability at all
    user = shared_sbx.commands.run("grep -E '^(Uid|CapPrm|CapEff):' /proc/self/status").stdout
    assert user.split() == ["Uid:", *["1000"] * 4, "CapPrm:", "0" * 16, "CapEff:", "0" * 16]
    if tier == "container":  # the shared-kernel tier's own layers (DESIGN invariant 9)
        assert fields["NoNewPrivs"].strip() == "1"
        assert fields["Seccomp"].strip() == "2"
        pids = sandbox_procs()
        assert pids
        for pid in pids:
            if Path(f"/proc/{pid}/status").exists():
                line = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1]
                assert (
                    int(line.split()[0]) >= UID_BASE
                    or b"bwrap" not in Path(f"/proc/{pid}/cmdline").read_bytes()
                )
    probes = shared_sbx.commands.run(
        "unshare -U true 2>&1; echo u=$?; mount -t tmpfs x /tmp 2>&1; echo m=$?; "
        "su -c true root </dev/null 2>&1; echo s=$?"
    ).stdout
    assert "u=0" not in probes and "m=0" not in probes and "s=0" not in probes


def test_network_is_loopback_only(sbx: Sandbox) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # positive control
        code = (
            "import socket\nres = []\n"
            f"for addr in [('127.0.0.1', {port}), ('10.0.2.2', 80), ('1.1.1.1', 53)]:\n"
            "    try:\n        socket.create_connection(addr, timeout=2); res.append('open')\n"
            "    except OSError as e:\n        res.append(type(e).__name__)\n"
            "try:\n    socket.getaddrinfo('example.com', 80); res.append('dns')\n"
            "except OSError:\n    pass\nres"
        )
        ex = sbx.run_code(code)
        assert ex.error is None and "open" not in (ex.text or "") and "dns" not in (ex.text or "")
        ifaces = sbx.commands.run("ls /sys/class/net 2>/dev/null; cat /proc/net/dev; true").stdout
        assert "eth" not in ifaces and "ens" not in ifaces
    finally:
        server.close()


def test_two_sandboxes_are_isolated(tier: str) -> None:
    with Sandbox.create(isolation=tier, timeout=120) as a, \
         Sandbox.create(isolation=tier, timeout=120) as b:  # fmt: skip
        a.files.write("/tmp/mine", "a-secret")
        h = a.commands.run("sleep 60", background=True)
        assert a.files.exists("/tmp/mine")  # positive control
        assert not b.files.exists("/tmp/mine")
        cmdlines = b.commands.run("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '").stdout
        assert "sleep 60" not in cmdlines
        h.kill()


def test_kill_leaves_nothing_behind(tier: str) -> None:
    before_procs, before_cg = sandbox_procs(), moat_cgroups()
    before_mounts = Path("/proc/self/mountinfo").read_text()
    s = Sandbox.create(isolation=tier, timeout=120)
    s.commands.run("setsid sh -c 'sleep 300 & sleep 300' >/dev/null 2>&1 &", timeout=10)
    s.commands.run("(sleep 301 &) ; nohup sleep 302 >/dev/null 2>&1 &", timeout=10)
    during = sandbox_procs() - before_procs
    assert during  # positive control: we can see the sandbox from outside
    ours = during & descendants()  # what this test started (other sandboxes share the host)
    assert ours and not any(cannot_run(p) for p in ours)  # positive control: all can run
    t0 = time.monotonic()
    s.kill()
    kill_s = time.monotonic() - t0
    assert kill_s < 5
    # When kill() returns nothing of the sandbox runs any more (frozen, dying or gone)...
    running = {p: _stat(p) for p in ours if not cannot_run(p) and not engine_child(p)}
    assert not running
    assert not s.is_running()
    # ...and within seconds the background reaper has removed all of it (invariant 5).
    eventually(lambda: not sandbox_procs() & during and moat_cgroups() <= before_cg)
    left = {p: _stat(p) for p in sandbox_procs() & during}
    assert not left
    assert moat_cgroups() <= before_cg
    assert Path("/proc/self/mountinfo").read_text() == before_mounts


def test_memory_bomb_dies_inside_only(tier: str) -> None:
    with Sandbox.create(isolation=tier, timeout=120, limits=Limits(memory_mb=128)) as s:
        ex = s.run_code("x = bytearray(1024 * 1024 * 1024)\nx[::4096] = b'1' * len(x[::4096])")
        assert ex.error is not None and ex.error.name in ("MemoryError", "ContextDied")
        assert s.run_code("1 + 1").text == "2"  # the sandbox lives on
        bomb = "python3 -c 'b = bytearray(600 * 2**20); b[::4096] = bytes(len(b[::4096]))'"
        with pytest.raises(CommandExitError) as info:  # the OOM killer (or the rlimit) ends it
            s.commands.run(bomb)
        assert info.value.exit_code != 0
        assert s.is_running() and s.run_code("2 + 2").text == "4"


FORK_LOOP = """
import os, sys, time
n = 0
try:
    while n < 10000:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as e:
    print("refused", n, e.errno, flush=True)
time.sleep(60)
"""


def test_fork_bomb_hits_pids_cap_host_stays_responsive(tier: str) -> None:
    before = sandbox_procs()
    with Sandbox.create(isolation=tier, timeout=120, limits=Limits(pids=64)) as s:
        s.files.write("/tmp/forkloop.py", FORK_LOOP)
        h = s.commands.run("python3 /tmp/forkloop.py", background=True)
        slowest = 0.0
        deadline = time.monotonic() + 60
        while "refused" not in h.stdout and time.monotonic() < deadline:
            t0 = time.monotonic()
            subprocess.run(["true"], check=True)  # the host can still start processes
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.1)
        assert slowest < 1.0
        # the positive control: forks were refused, at the cap (less what already runs)
        refused = h.stdout.split()
        assert refused[:1] == ["refused"], h.stdout
        assert 16 < int(refused[1]) < 64 and int(refused[2]) == 11  # EAGAIN
        # while the loop holds every process user code may have, the agent still starts a
        # thread to serve a call: its reserve below the cap (moat.agent.shield)
        assert s.files.read("/proc/self/stat")
        if tier == "container":
            # read from outside: the user's process limit (RLIMIT_NPROC, below the agent's)
            # refused the loop before the pids cgroup, so the agent's reserve stayed free
            proc = session_of(s).proc
            assert proc is not None and proc.stats()["pids_limit_hits"] == 0
        h.kill()
        deadline = time.monotonic() + 20
        while True:  # the sandbox recovers once the loop's processes are gone
            try:
                assert s.run_code("1 + 1").text == "2"
                break
            except SandboxError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
    deadline = time.monotonic() + 3
    while sandbox_procs() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not {p: _stat(p) for p in sandbox_procs() - before}


SYSCALL_PROBE = r"""
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    return errno.errorcode.get(ctypes.get_errno(), "0") if r == -1 else "ok"
# bad pointers: an allowed call fails with EFAULT, a refused one with the filter's errno
print("add_key", call(248, 1, 1, 1, 0, 0))
print("keyctl", call(250, 0, 1, 0, 0, 0))
print("uname", call(63, 1))
print("seccomp", open("/proc/self/status").read().split("Seccomp:")[1].split()[0])
"""


def test_seccomp_filter_binds_user_code(tier: str, sbx: Sandbox) -> None:
    """Invariant 9 on every tier: the keyring calls are refused to user code (the microVM
    guest included, where the host-built filter is installed by the guest's boot)."""
    sbx.files.write("/tmp/sc.py", SYSCALL_PROBE)
    out = dict(line.split() for line in sbx.commands.run("python3 /tmp/sc.py").stdout.splitlines())
    assert out["uname"] == "EFAULT"  # positive control: an allowed call reaches the kernel
    assert out["add_key"] == "EPERM" and out["keyctl"] == "EPERM"
    if tier != "gvisor":  # gVisor's /proc reports no filter state (its sentry applies it)
        assert out["seccomp"] == "2"


def test_shell_fork_bomb_leaves_the_sandbox_usable(tier: str) -> None:
    """Issue 17: a fork bomb hits the pids limit inside; the agent keeps its reserve, kills
    the bomb and serves the next call in the same sandbox."""
    with Sandbox.create(isolation=tier, timeout=180, limits=Limits(pids=64)) as s:
        h = s.commands.run(":(){ :|:& };:", background=True)
        time.sleep(5)
        try:
            # while the bomb runs, the agent still answers (its reserve of processes)
            assert s.files.read("/proc/self/stat")
            h.kill()
        except SandboxError:
            if tier == "gvisor":
                # runsc 20221219's ptrace platform pools stubs of exited processes forever and
                # gives each a host thread per sentry thread that ran in it: a shell bomb's
                # churn drives host tasks past the backstop and the sentry dies, fail closed
                # (docs/containment.md "Fork bombs"; a bomb that wedges early survives)
                pytest.xfail(
                    "gVisor 20221219 (ptrace platform) cannot outlive a shell fork bomb: its "
                    "stub pool exhausts the sandbox's host task limit and the sandbox ends, "
                    "fail closed, host unharmed; needs a newer gVisor platform "
                    "(docs/containment.md, Fork bombs)"
                )
            raise
        deadline = time.monotonic() + 30
        while True:
            try:
                assert s.run_code("1 + 1").text == "2"
                break
            except SandboxError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert s.commands.run("echo ok").stdout == "ok\n"
        assert s.is_running()


def test_unnamed_devices_cannot_be_opened(tier: str, sbx: Sandbox) -> None:
    """Invariant 1: no device a policy did not name (gVisor adds /dev/fuse and /dev/net/tun)."""
    probe = (
        "import os\n"
        "for p in ('/dev/null', '/dev/fuse', '/dev/net/tun', '/dev/kvm', '/dev/vhost-net'):\n"
        "    try:\n"
        "        os.close(os.open(p, os.O_RDWR)); print(p, 'open')\n"
        "    except OSError as e:\n"
        "        print(p, 'refused', e.errno)\n"
    )
    sbx.files.write("/tmp/devs.py", probe)
    out = dict(
        line.split(" ", 1) for line in sbx.commands.run("python3 /tmp/devs.py").stdout.splitlines()
    )
    assert out.pop("/dev/null") == "open"  # positive control
    assert all(v.startswith("refused") for v in out.values()), out


def test_dev_shm_is_capped_within_the_disk_limit(tier: str) -> None:
    """Issue 17: /dev and /dev/shm are no way around ``disk_mb``."""
    with Sandbox.create(isolation=tier, timeout=120, limits=Limits(disk_mb=64)) as s:
        out = s.commands.run(
            "for i in 1 2 3 4 5 6 7 8 9 10; do "
            "dd if=/dev/zero of=/dev/shm/f$i bs=1M count=16 2>/dev/null || echo full; done; "
            "touch /dev/x 2>/dev/null && echo dev-writable; du -sk /dev/shm | cut -f1",
            timeout=60,
        ).stdout.split()
        assert "full" in out  # ENOSPC well before the 160 MiB asked for
        assert "dev-writable" not in out
        assert 0 < int(out[-1]) <= 64 * 1024  # positive control: something was written
        assert s.run_code("1 + 1").text == "2"


def test_host_kernel_command_line_is_hidden(tier: str, sbx: Sandbox) -> None:
    """Issue 17 §4: the host's /proc/cmdline (boot setup, infrastructure flags) stays outside."""
    inside = sbx.files.read("/proc/cmdline").strip()
    host = Path("/proc/cmdline").read_text().strip()
    assert inside  # positive control: the file is there and read
    if tier != "microvm":  # the microVM's command line is its own guest kernel's
        assert inside != host


def test_host_paths_are_hidden_from_mountinfo(tier: str, tmp_path: Path) -> None:
    """Issue 17 §4: no moat host path (state dir, home, worktree) in the mount table inside.

    The caller's own Mount may name its host path (the caller chose it): it is the positive
    control that the table read is the sandbox's real one.
    """
    (tmp_path / "f").write_text("x")
    os.chmod(tmp_path, 0o755)  # the sandbox uid reads it
    os.chmod(tmp_path / "f", 0o644)
    mine = Mount(str(tmp_path), "/data")
    with Sandbox.create(isolation=tier, timeout=120, mounts=[mine]) as s:
        table = s.files.read("/proc/self/mountinfo")
        assert s.files.read("/data/f") == "x"
    lines = table.splitlines()
    assert any(" /data " in line for line in lines)  # positive control: a real table
    if tier == "container":  # bwrap binds the path itself: its root field names it
        assert any(str(tmp_path) in line for line in lines)
    forbidden = {str(state_dir()), "/var/lib/moat", "/root", "/work", str(Path.home())}
    forbidden |= {str(Path(p).resolve()) for p in (state_dir(), Path.home())}
    leaks = [(f, line) for line in lines for f in forbidden if f in line]
    assert not leaks
