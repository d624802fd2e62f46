"""``user="root"`` on the container tier: uid 0 of the sandbox's own user namespace, whose two
ids (root and the user) are fresh host ids of the sandbox range that own nothing on the host
(docs/users.md). Real bubblewrap; every containment claim is checked from OUTSIDE the sandbox
(host canaries, the host's ``/proc``, the sandbox's cgroup), each with a positive control.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import require_tier
from tests.test_containment import FORK_LOOP

from moat import Sandbox, testing
from moat.errors import PolicyError, SandboxError
from moat.model import Limits, Mount
from moat.protocol.contract import ROOT_CAPS
from moat.runtime.container.driver import SANDBOX_HOST_GID, UID_BASE, UID_SPAN

pytestmark = [pytest.mark.container, pytest.mark.timeout(240)]

ROOT_MASK = f"{sum(1 << b for b in ROOT_CAPS.values()):016x}"
_SYS_ADMIN, _SYS_PTRACE, _SYS_RESOURCE, _SETPCAP = 21, 19, 24, 8


def _fields(text: str) -> dict[str, str]:
    return {k: v.strip() for k, v in (ln.split(":", 1) for ln in text.splitlines() if ":" in ln)}


def _in_range(uid: int) -> bool:
    return UID_BASE < uid < UID_BASE + UID_SPAN


@pytest.fixture(scope="module")
def csbx() -> Iterator[Sandbox]:
    require_tier("container")
    sbx = Sandbox.create(isolation="container", timeout=600)
    try:
        yield sbx
    finally:
        sbx.kill()


def _proc(sbx: Sandbox) -> object:
    proc = testing.session_of(sbx).proc
    assert proc is not None
    return proc


def _host_pids(sbx: Sandbox) -> list[int]:
    """Host pids of the sandbox's processes (its cgroup), bwrap included."""
    return list(_proc(sbx).cgroup.pids())  # type: ignore[attr-defined]


def _host_status(pid: int) -> dict[str, str]:
    return _fields(Path(f"/proc/{pid}/status").read_text())


def _find_host_pid(sbx: Sandbox, argv0: bytes, arg: bytes) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in _host_pids(sbx):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd[:1] == [argv0] and arg in cmd:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no {argv0!r} {arg!r} in the sandbox's cgroup")


# -- root inside, from inside and from outside --------------------------------------------------


def test_root_inside_is_uid_0_with_the_bounded_set(csbx: Sandbox) -> None:
    out = csbx.commands.run(
        "id -u; touch /tmp/owned; chown 1000:1000 /tmp/owned; stat -c %u:%g /tmp/owned; "
        "grep -E '^(Uid|Cap(Prm|Eff|Bnd)|NoNewPrivs)' /proc/self/status",
        user="root",
    ).stdout
    lines = out.splitlines()
    assert lines[:2] == ["0", "1000:1000"]  # root's chown works (positive control)
    caps = _fields("\n".join(lines[2:]))
    assert caps["Uid"].split() == ["0"] * 4 and caps["NoNewPrivs"] == "1"
    assert caps["CapPrm"] == caps["CapEff"] == caps["CapBnd"] == ROOT_MASK
    for never in (_SYS_ADMIN, _SYS_PTRACE, _SYS_RESOURCE, _SETPCAP):
        assert not int(ROOT_MASK, 16) & (1 << never)
    # the user: uid 1000 throughout, no capability, bounding set root's at most
    user = _fields(csbx.commands.run("grep -E '^(Uid|Cap(Prm|Eff|Bnd))' /proc/self/status").stdout)
    assert user["Uid"].split() == ["1000"] * 4 and user["CapPrm"] == user["CapEff"] == "0" * 16
    assert user["CapBnd"] == ROOT_MASK
    e = csbx.run_code(
        "print([l.split()[1] for l in open('/proc/self/status') "
        "if l.startswith(('CapInh', 'CapPrm', 'CapEff'))])"
    )
    assert e.logs.stdout == [f"{['0' * 16] * 3}\n"]  # a forked kernel keeps nothing either
    # two ids mapped, nothing else (no host root, no range)
    maps = csbx.commands.run("cat /proc/self/uid_map /proc/self/gid_map").stdout.split()
    uid_map, gid_map = maps[:6], maps[6:]
    assert uid_map[0::3] == ["0", "1000"] and uid_map[2::3] == ["1", "1"]
    assert all(_in_range(int(h)) for h in uid_map[1::3]) and uid_map[1] != uid_map[4]
    assert gid_map[0::3] == ["0", "1000"] and gid_map[4] == str(SANDBOX_HOST_GID)
    assert gid_map[1] == uid_map[1]  # root's group: the sandbox's own root id


def test_host_sees_roots_processes_as_fresh_unprivileged_ids(csbx: Sandbox) -> None:
    """From the host: a root call's process runs as the sandbox's own root id (not 0, not the
    user's), with no capability over the host's namespace; no process of the sandbox that
    user code could reach is host uid 0."""
    csbx.commands.run("sleep 4711 >/dev/null 2>&1 &", user="root")
    csbx.commands.run("sleep 4712 >/dev/null 2>&1 &")
    root_pid = _find_host_pid(csbx, b"sleep", b"4711")
    user_pid = _find_host_pid(csbx, b"sleep", b"4712")
    root_ids = _host_status(root_pid)["Uid"].split()
    user_ids = _host_status(user_pid)["Uid"].split()
    assert len(set(root_ids)) == 1 and _in_range(int(root_ids[0]))
    assert len(set(user_ids)) == 1 and _in_range(int(user_ids[0]))
    assert root_ids[0] != user_ids[0]
    assert _proc(csbx).host_uid == int(user_ids[0])  # type: ignore[attr-defined]
    for pid in _host_pids(csbx):
        try:
            st = _host_status(pid)
        except OSError:
            continue
        assert st["Uid"].split()[0] != "0", (pid, st["Name"])
    # moat's holder of the namespace: host root outside the sandbox's pid namespace (nothing
    # inside can name it), with no capability left (it exec'd as nobody of the namespace)
    holder = _proc(csbx).holder.popen.pid  # type: ignore[attr-defined]
    st = _host_status(holder)
    assert st["CapEff"] == st["CapPrm"] == "0" * 16
    assert os.readlink(f"/proc/{holder}/ns/user") == os.readlink(f"/proc/{root_pid}/ns/user")
    assert os.readlink(f"/proc/{holder}/ns/pid") != os.readlink(f"/proc/{root_pid}/ns/pid")
    csbx.commands.run("kill $(pgrep -x sleep) 2>/dev/null; true", user="root")  # inside only


def test_root_reads_no_host_root_only_file(csbx: Sandbox) -> None:
    """A host root-owned 0600 file under a read-only bind (the host's /usr) stays unreadable:
    root's DAC_OVERRIDE holds only on inodes whose owner is mapped (host root is not)."""
    d = Path(tempfile.mkdtemp(prefix="moat-rootcanary-", dir="/usr/share"))
    try:
        d.chmod(0o755)
        value = "moat-root-secret-" + secrets.token_hex(8)
        (d / "secret").write_text(value)
        (d / "secret").chmod(0o600)
        (d / "public").write_text("public")
        (d / "public").chmod(0o644)
        out = csbx.commands.run(
            f"cat {d}/secret 2>&1; cat {d}/public; echo; "
            f"grep -rs {value} /usr/share/doc /etc /opt /proc/1 | head -1; "
            f"cp {d}/secret /tmp/x 2>&1; chmod 644 {d}/secret 2>&1; chown 0 {d}/secret 2>&1; true",
            user="root",
        ).stdout
        assert value not in out
        assert "public" in out  # positive control: the directory is there and readable
        assert "Permission denied" in out
        assert (d / "secret").read_text() == value  # checked on the host
        st = (d / "secret").stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    finally:
        shutil.rmtree(d)


def test_root_writes_no_host_file_through_any_bind(csbx: Sandbox) -> None:
    name = f"moat-root-canary-{secrets.token_hex(6)}"
    binds = ("/usr", "/usr/lib", "/etc/ssl/certs", "/opt/moat", "/", "/etc", "/dev", "/proc")
    script = "; ".join(f"echo x > {d.rstrip('/')}/{name} 2>/dev/null; echo {d}=$?" for d in binds)
    out = csbx.commands.run(script, user="root").stdout
    for d in binds:
        assert f"{d}=0" not in out, out
        assert not os.path.exists(f"{d.rstrip('/')}/{name}")  # checked on the host
    # Positive control: the same write works where the sandbox may write (its own tmpfs).
    assert csbx.commands.run(f"echo x > /tmp/{name}; echo $?", user="root").stdout == "0\n"
    assert not os.path.exists(f"/tmp/{name}")  # the sandbox's /tmp is not the host's


def test_roots_files_and_setuid_bits_are_nothing_on_the_host(csbx: Sandbox) -> None:
    """Root's files (setuid ones too) belong to the sandbox's root id, on tmpfs mounts that
    are nosuid; the user cannot become root through them (no_new_privs, nosuid)."""
    csbx.commands.run(
        "cp /usr/bin/python3 /tmp/rootpy && chmod 4755 /tmp/rootpy && "
        "mkdir -p /home/user/r && cp /usr/bin/id /home/user/r/id && chmod 6755 /home/user/r/id",
        user="root",
    )
    csbx.commands.run("sleep 4713 >/dev/null 2>&1 &")
    inside = _find_host_pid(csbx, b"sleep", b"4713")
    host_root_id = None
    for path, mount in (("tmp/rootpy", "tmp"), ("home/user/r/id", "home/user")):
        st = os.stat(f"/proc/{inside}/root/{path}")  # the file, from outside
        assert st.st_mode & stat.S_ISUID  # positive control: root set the bit
        assert st.st_uid != 0 and _in_range(st.st_uid), st.st_uid
        host_root_id = st.st_uid
        assert os.statvfs(f"/proc/{inside}/root/{mount}").f_flag & os.ST_NOSUID
    assert host_root_id is not None
    out = csbx.commands.run(
        "/tmp/rootpy -c 'import os; print(os.geteuid())'; /home/user/r/id -u; "
        "python3 -c 'import os; os.setuid(0)' 2>&1 | tail -1; su -c true 2>&1 | tail -1; true"
    ).stdout.splitlines()
    assert out[:2] == ["1000", "1000"], out
    assert "PermissionError" in out[2]
    csbx.commands.run("kill $(pgrep -x sleep) 2>/dev/null; true", user="root")  # inside only


def test_root_cannot_mount_unshare_raise_limits_or_take_the_agent(csbx: Sandbox) -> None:
    probes = csbx.commands.run(
        "mount -t tmpfs x /mnt 2>/dev/null; echo mount=$?; "
        "unshare -U true 2>/dev/null; echo userns=$?; unshare -m true 2>/dev/null; echo mntns=$?; "
        "echo 9 > /proc/sys/user/max_user_namespaces 2>/dev/null; echo sysctl=$?; "
        "ulimit -Hu unlimited 2>/dev/null; echo nproc=$?; "
        "ulimit -Hn 1048576 2>/dev/null; echo nofile=$?; "
        "kill -9 1 2>/dev/null; echo kill1=$?; kill -STOP 1 2>/dev/null; kill -CONT 1; "
        "head -c 16 /proc/1/mem >/dev/null 2>&1; echo mem=$?; "
        "readlink /proc/1/fd/0 >/dev/null 2>&1; echo fd=$?; "
        "cat /proc/1/fd/0 </dev/null >/dev/null 2>&1; echo chan=$?; "
        "cat /proc/1/environ >/dev/null 2>&1; echo environ=$?; "
        "echo max=$(cat /proc/sys/user/max_user_namespaces)",
        user="root",
    ).stdout
    for probe in ("mount", "userns", "mntns", "sysctl", "nproc", "nofile", "mem", "fd", "chan"):
        assert f"{probe}=0" not in probes, probes
    assert "environ=0" not in probes, probes
    # no user namespace may be made in the sandbox's, seccomp aside (userns.Holder)
    assert "max=0" in probes, probes
    # Positive control: the probes ran (root's kill works on a process of its own).
    assert csbx.commands.run("sleep 30 & kill -9 $!; echo $?", user="root").stdout == "0\n"
    # The agent is unharmed: it still answers, as the user and as root.
    assert csbx.commands.run("echo alive").stdout == "alive\n"
    assert csbx.commands.run("id -u", user="root").stdout == "0\n"


def test_root_reaches_no_host_process_nor_another_sandboxs(csbx: Sandbox) -> None:
    """Root's CAP_KILL holds in the sandbox's namespaces only: a host process running as the
    sandbox's own root id, and another sandbox's processes, are out of its reach."""
    bwrap_pid = _proc(csbx).proc.pid  # type: ignore[attr-defined]
    root_id = int(_host_status(bwrap_pid)["Uid"].split()[0])  # bwrap runs as the root id
    assert _in_range(root_id)
    host = subprocess.Popen(
        ["setpriv", f"--reuid={root_id}", f"--regid={root_id}", "--clear-groups", "sleep", "300"]
    )
    other = Sandbox.create(isolation="container")
    try:
        other.commands.run("sleep 4714 >/dev/null 2>&1 &", user="root")
        theirs = _find_host_pid(other, b"sleep", b"4714")
        out = csbx.commands.run(
            f"kill -9 {host.pid} {theirs} 2>&1; echo rc=$?; "
            "for p in $(seq 2 4000); do kill -0 $p 2>/dev/null && echo seen $p; done | wc -l; "
            "kill -9 -1 2>/dev/null; true",
            user="root",
        ).stdout
        assert "rc=0" not in out
        time.sleep(0.3)
        assert host.poll() is None  # alive, seen from the host
        assert Path(f"/proc/{theirs}").exists()
        assert other.commands.run("echo alive", user="root").stdout == "alive\n"
        assert csbx.commands.run("echo alive").stdout == "alive\n"  # kill -1 spared the agent
    finally:
        host.kill()
        host.wait()
        other.kill()


def test_roots_fork_bomb_hits_the_caps() -> None:
    require_tier("container")
    with Sandbox.create(isolation="container", timeout=120, limits=Limits(pids=64)) as s:
        s.files.write("/tmp/forkloop.py", FORK_LOOP)
        h = s.commands.run("python3 /tmp/forkloop.py", user="root", background=True)
        deadline = time.monotonic() + 60
        while "refused" not in h.stdout and time.monotonic() < deadline:
            time.sleep(0.1)
        refused = h.stdout.split()
        assert refused[:1] == ["refused"], h.stdout
        assert 16 < int(refused[1]) < 64 and int(refused[2]) == 11  # EAGAIN
        proc = _proc(s)
        pids = len(proc.cgroup.pids())  # type: ignore[attr-defined]
        assert pids <= 64 + 8  # from outside: the cgroup's cap (bwrap aside)
        assert s.files.read("/proc/self/stat")  # the agent's reserve still serves
        h.kill()
        deadline = time.monotonic() + 20
        while True:
            try:
                assert s.run_code("1 + 1").text == "2"
                break
            except SandboxError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)


# -- files, pause, mounts -----------------------------------------------------------------------


def test_files_as_root(csbx: Sandbox) -> None:
    assert csbx.files.make_dir("/home/user/rootonly", user="root") is True
    csbx.commands.run("chmod 700 /home/user/rootonly", user="root")
    entry = csbx.files.write("/home/user/rootonly/f.txt", "for root", user="root")
    assert entry.path == "/home/user/rootonly/f.txt"
    assert csbx.files.read("/home/user/rootonly/f.txt", user="root") == "for root"
    assert [e.name for e in csbx.files.list("/home/user/rootonly", user="root")] == ["f.txt"]
    owner = csbx.commands.run("stat -c %u:%g /home/user/rootonly/f.txt", user="root").stdout
    assert owner == "0:0\n"
    with pytest.raises(SandboxError, match=r"(?i)permission denied"):
        csbx.files.read("/home/user/rootonly/f.txt")
    with pytest.raises(SandboxError, match=r"(?i)permission denied"):
        csbx.files.write("/home/user/rootonly/h.txt", "x")
    # root writes over a file only root may write (root-owned 0600 in the user's home)
    csbx.commands.run("echo a > /home/user/r600 && chmod 600 /home/user/r600", user="root")
    csbx.files.write("/home/user/r600", "b", user="root")
    assert csbx.files.read("/home/user/r600", user="root") == "b"
    csbx.files.write("/home/user/u.txt", "u")
    assert csbx.commands.run("stat -c %u /home/user/u.txt").stdout == "1000\n"


def test_pty_as_root(csbx: Sandbox) -> None:
    screen = bytearray()
    h = csbx.pty.create(80, 24, on_data=screen.extend, cmd="id -u; tty", user="root")
    h.wait()
    assert b"0\r\n/dev/pts/" in bytes(screen)


def test_roots_files_survive_pause_and_resume() -> None:
    require_tier("container")
    sbx = Sandbox.create(isolation="container", timeout=300)
    try:
        sbx.commands.run(
            "mkdir -m 700 /home/user/vault /tmp/vault && echo k1 > /home/user/vault/key && "
            "echo k2 > /tmp/vault/key && chmod 600 /home/user/vault/key /tmp/vault/key",
            user="root",
        )
        sbx.files.write("/home/user/mine.txt", "user's")
        sbx.pause(memory=False)
        sbx = Sandbox.connect(sbx.sandbox_id)
        out = sbx.commands.run(
            "stat -c '%u:%g %a %n' /home/user/vault /home/user/vault/key /tmp/vault "
            "/tmp/vault/key /home/user/mine.txt /home/user; "
            "cat /home/user/vault/key /tmp/vault/key",
            user="root",
        ).stdout.splitlines()
        assert out == [
            "0:0 700 /home/user/vault",
            "0:0 600 /home/user/vault/key",
            "0:0 700 /tmp/vault",
            "0:0 600 /tmp/vault/key",
            "1000:1000 644 /home/user/mine.txt",
            "1000:1000 755 /home/user",
            "k1",
            "k2",
        ], out
        with pytest.raises(SandboxError, match=r"(?i)permission denied"):
            sbx.files.read("/home/user/vault/key")  # still root's alone
    finally:
        sbx.kill()


def test_a_sandbox_with_a_mount_refuses_root_and_has_no_uid_0() -> None:
    require_tier("container")
    host = Path(tempfile.mkdtemp(prefix="moat-users-"))
    host.chmod(0o755)
    (host / "canary").write_text("host")
    (host / "canary").chmod(0o600)
    sbx = Sandbox.create(
        isolation="container", mounts=[Mount(str(host), "/mnt/host", read_only=False)]
    )
    try:
        with pytest.raises(PolicyError, match="host mounts"):
            sbx.commands.run("cp /bin/true /mnt/host/suid; chmod 6755 /mnt/host/suid", user="root")
        with pytest.raises(PolicyError, match="host mounts"):
            sbx.files.read("/mnt/host/canary", user="root")
        assert sorted(p.name for p in host.iterdir()) == ["canary"]  # seen from the host
        # bwrap's own one-uid namespace: no uid 0 inside at all, no capability
        out = sbx.commands.run("cat /proc/self/uid_map; grep CapBnd /proc/self/status").stdout
        words = out.split()
        assert len(words) == 5 and words[0] == "1000" and words[2] == "1", out
        assert words[-1] == "0" * 16
        assert _proc(sbx).holder is None  # type: ignore[attr-defined]
        assert "Permission denied" in sbx.commands.run("cat /mnt/host/canary 2>&1 || true").stdout
    finally:
        sbx.kill()
        shutil.rmtree(host)


# -- failure paths: refused, and nothing left behind (invariant 5) -------------------------------


def _children(name: bytes) -> list[int]:
    me = str(os.getpid())
    out = []
    for d in Path("/proc").iterdir():
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[1] == me and (d / "comm").read_bytes().strip() == name:
                out.append(int(d.name))
        except (OSError, IndexError):
            continue
    return out


def _cgroups(name: str) -> list[str]:
    found = []
    for root in Path("/sys/fs/cgroup").glob("*"):
        for dirpath, dirnames, _files in os.walk(root):
            found += [f"{dirpath}/{d}" for d in dirnames if name in d]
    return found


@pytest.mark.parametrize("fault", ["maps", "join"])
def test_a_failed_namespace_leaves_nothing(fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder's maps refused by the kernel (overlapping ids), or bwrap's child failing to
    join: a typed error, and no holder, bwrap or cgroup left (checked from the host)."""
    import asyncio

    from moat.errors import IsolationUnavailableError, SandboxDiedError
    from moat.runtime.container import ContainerRuntime, driver, userns
    from moat.runtime.spec import SandboxSpec

    require_tier("container")
    if fault == "maps":
        monkeypatch.setattr(driver, "_fresh_ids", lambda: (UID_BASE + 77, UID_BASE + 77))
        expected: type[Exception] = IsolationUnavailableError
    else:

        def broken(fd: int) -> None:
            raise OSError(1, "setns refused (test)")

        monkeypatch.setattr(userns, "enter", broken)
        expected = SandboxDiedError
    sid = f"sbx-nsfault-{fault}-{secrets.token_hex(3)}"
    before = set(_children(b"cat")) | set(_children(b"bwrap"))

    async def start() -> None:
        rt = ContainerRuntime()
        with pytest.raises(expected):
            await rt.start(SandboxSpec(sandbox_id=sid, tier="container"))

    asyncio.run(start())
    assert set(_children(b"cat")) - before == set()
    assert set(_children(b"bwrap")) - before == set()
    assert _cgroups(sid.removeprefix("sbx-")) == []


def test_the_holder_ends_with_the_sandbox() -> None:
    require_tier("container")
    sbx = Sandbox.create(isolation="container")
    holder = _proc(sbx).holder  # type: ignore[attr-defined]
    pid = holder.popen.pid
    assert Path(f"/proc/{pid}").exists()  # positive control: it runs while the sandbox does
    sbx.kill()
    deadline = time.monotonic() + 10
    while holder.popen.returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the background reaper closes it
    assert holder.popen.returncode is not None
    assert not Path(f"/proc/{pid}").exists() or pid not in _children(b"cat")
