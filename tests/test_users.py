"""``user="root"``: uid 0 *inside* the sandbox where a tier can give it safely, never host root.

gVisor gives root of the sentry (docs/users.md; the container tier's root, uid 0 of the
sandbox's own user namespace, is tests/test_users_container.py; the microVM's root of its guest
kernel, tests/test_users_microvm.py); a sandbox with host mounts refuses with a typed error
naming the tier, never running the call as ``user`` instead. Containment is checked from
outside: canaries planted on the host, the host's view of the sandbox's processes, and a
positive control for each probe.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import require_tier

from moat import Sandbox
from moat.engine.users import ROOT_TIERS, as_root, root_refusal
from moat.errors import InvalidArgumentError, PolicyError, SandboxError
from moat.errors import TimeoutError as MoatTimeout
from moat.model import TIERS, Mount
from moat.protocol.contract import ROOT_CAPS
from moat.runtime.spec import SandboxSpec

pytestmark = pytest.mark.timeout(180)

#: Root's capability set as /proc/<pid>/status prints it (CapBnd, CapPrm, CapEff).
ROOT_MASK = f"{sum(1 << b for b in ROOT_CAPS.values()):016x}"
_SYS_ADMIN, _SYS_PTRACE, _SYS_RESOURCE = 21, 19, 24


def _caps(status: str) -> dict[str, str]:
    return {k: v.strip() for k, v in (ln.split(":", 1) for ln in status.splitlines() if ":" in ln)}


@pytest.fixture(scope="module")
def gsbx() -> Iterator[Sandbox]:
    require_tier("gvisor")
    sbx = Sandbox.create(isolation="gvisor")
    try:
        yield sbx
    finally:
        sbx.kill()


# -- names and tiers (no sandbox) -------------------------------------------------------------


def test_only_user_and_root_are_names() -> None:
    spec = SandboxSpec(sandbox_id="t-users", tier="gvisor")
    assert as_root(spec, "user") is False and as_root(spec, "root") is True
    for bad in ("admin", "ROOT", "", "root:", 0, None):
        with pytest.raises(InvalidArgumentError, match="user must be one of"):
            as_root(spec, bad)  # type: ignore[arg-type]


def test_every_tier_gives_root_and_an_old_agent_refuses_clearly() -> None:
    assert set(TIERS) == ROOT_TIERS
    for tier in TIERS:
        assert as_root(SandboxSpec(sandbox_id="t-users", tier=tier), "root") is True
    assert "'user.root'" in str(root_refusal(None))  # a guest started by an older moat


@pytest.mark.parametrize("tier", ["gvisor", "container", "microvm"])
def test_host_mounts_refuse(tier: str, tmp_path: Path) -> None:
    spec = SandboxSpec(sandbox_id="t-users", tier=tier, mounts=(Mount(str(tmp_path), "/mnt/x"),))
    with pytest.raises(PolicyError, match=f"the {tier} tier .* host mounts"):
        as_root(spec, "root")


# -- gVisor: root of the sentry ---------------------------------------------------------------


@pytest.mark.gvisor
def test_root_inside_is_uid_0_with_the_bounded_set(gsbx: Sandbox) -> None:
    # Positive control: root inside really is root (id, chown of a file in /tmp).
    out = gsbx.commands.run(
        "id -u; touch /tmp/owned; chown 123:456 /tmp/owned; stat -c %u:%g /tmp/owned; "
        "grep -E '^(Uid|Cap(Prm|Eff|Bnd)|NoNewPrivs)' /proc/self/status",
        user="root",
    ).stdout
    lines = out.splitlines()
    assert lines[:2] == ["0", "123:456"]
    caps = _caps("\n".join(lines[2:]))
    assert caps["Uid"].split() == ["0"] * 4
    assert caps["CapPrm"] == caps["CapEff"] == caps["CapBnd"] == ROOT_MASK
    mask = int(ROOT_MASK, 16)
    for never in (_SYS_ADMIN, _SYS_PTRACE, _SYS_RESOURCE):
        assert not mask & (1 << never)
    # The same sandbox's user: uid 1000 throughout, no capability (what runs by default).
    user = _caps(gsbx.commands.run("grep -E '^(Uid|CapPrm|CapEff)' /proc/self/status").stdout)
    assert user["Uid"].split() == ["1000"] * 4 and user["CapPrm"] == user["CapEff"] == "0" * 16
    assert gsbx.commands.run("id -un", user="user").stdout == "user\n"
    # ...and so does user code in a kernel the agent forked (no exec that drops what the
    # agent keeps for root calls): without user_limits' drop it held root's permitted set.
    e = gsbx.run_code(
        "print([l.split()[1] for l in open('/proc/self/status') "
        "if l.startswith(('CapInh', 'CapPrm', 'CapEff'))])"
    )
    assert e.logs.stdout == [f"{['0' * 16] * 3}\n"]


@pytest.mark.gvisor
def test_root_cannot_mount_unshare_raise_limits_or_kill_the_agent(gsbx: Sandbox) -> None:
    probes = gsbx.commands.run(
        "mount -t tmpfs x /mnt 2>/dev/null; echo mount=$?; "
        "unshare -U true 2>/dev/null; echo userns=$?; unshare -m true 2>/dev/null; echo mntns=$?; "
        "ulimit -Hu unlimited 2>/dev/null; echo nproc=$?; "
        "ulimit -Hn 1048576 2>/dev/null; echo nofile=$?; "
        "kill -9 1 2>/dev/null; echo kill1=$?; kill -STOP 1 2>/dev/null; echo stop1=$?; "
        "head -c 16 /proc/1/mem >/dev/null 2>&1; echo mem=$?",
        user="root",
    ).stdout
    # (gVisor's /proc lets root open the agent's fds, unlike the user's: root can take the
    # agent over, as user code may on other tiers; the host never trusts it, invariant 6.)
    for probe in ("mount", "userns", "mntns", "nproc", "nofile", "kill1", "stop1", "mem"):
        assert f"{probe}=0" not in probes, probes
    # Positive control: the probes ran (and root's kill works on a process of its own).
    assert gsbx.commands.run("sleep 30 & kill -9 $!; echo $?", user="root").stdout == "0\n"
    # The agent is unharmed: it still answers, as the user and as root.
    assert gsbx.commands.run("echo alive").stdout == "alive\n"
    assert gsbx.commands.run("id -u", user="root").stdout == "0\n"


@pytest.mark.gvisor
def test_root_writes_no_host_file_through_any_bind(gsbx: Sandbox) -> None:
    name = f"moat-root-canary-{secrets.token_hex(6)}"
    binds = ("/usr", "/usr/lib", "/etc/ssl/certs", "/opt/moat", "/", "/etc")
    script = "; ".join(f"echo x > {d.rstrip('/')}/{name} 2>/dev/null; echo {d}=$?" for d in binds)
    out = gsbx.commands.run(script, user="root").stdout
    for d in binds:
        assert f"{d}=0" not in out, out
        assert not os.path.exists(f"{d.rstrip('/')}/{name}")  # checked on the host
    # Positive control: the same write works where the sandbox may write (its own tmpfs).
    assert gsbx.commands.run(f"echo x > /tmp/{name}; echo $?", user="root").stdout == "0\n"
    assert not os.path.exists(f"/tmp/{name}")  # the sandbox's /tmp is not the host's


@pytest.mark.gvisor
def test_root_reads_no_host_only_canary(gsbx: Sandbox, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    value = "moat-root-secret-" + secrets.token_hex(8)
    canary.write_text(value)
    canary.chmod(0o600)
    out = gsbx.commands.run(
        f"cat {canary} 2>&1; grep -rs {value} /usr/share/doc /etc /opt /proc/1 | head -1",
        user="root",
    ).stdout
    assert value not in out
    assert canary.read_text() == value and stat.S_IMODE(canary.stat().st_mode) == 0o600


@pytest.mark.gvisor
def test_host_sees_the_sentry_unprivileged(gsbx: Sandbox) -> None:
    """From the host: root inside runs as no host process at all; the sentry that runs it
    (and the stubs of its address spaces) run as host ``nobody``."""
    gsbx.commands.run("sleep 3600 >/dev/null 2>&1 &", user="root", timeout=30)
    sentries: list[tuple[int, list[str]]] = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            status = (d / "status").read_text()
        except OSError:
            continue
        if cmd and cmd[0] == b"runsc-sandbox" and gsbx.sandbox_id.encode() in b" ".join(cmd):
            sentries.append((int(d.name), _caps(status)["Uid"].split()))
        assert not (cmd and cmd[0] == b"sleep" and cmd[1:2] == [b"3600"]), "a host process"
    assert sentries, "the sentry of the sandbox was not found (the check would prove nothing)"
    for _pid, uids in sentries:
        assert uids == ["65534"] * 4


@pytest.mark.gvisor
def test_files_as_root(gsbx: Sandbox) -> None:
    assert gsbx.files.make_dir("/tmp/rootonly", user="root") is True
    gsbx.commands.run("chmod 700 /tmp/rootonly", user="root")
    entry = gsbx.files.write("/tmp/rootonly/f.txt", "for root", user="root")
    assert entry.path == "/tmp/rootonly/f.txt"
    assert gsbx.files.read("/tmp/rootonly/f.txt", user="root") == "for root"
    assert [e.name for e in gsbx.files.list("/tmp/rootonly", user="root")] == ["f.txt"]
    assert gsbx.files.exists("/tmp/rootonly/f.txt", user="root")
    owner = gsbx.commands.run("stat -c %u:%g /tmp/rootonly/f.txt", user="root").stdout
    assert owner == "0:0\n"  # a root write makes a root file
    moved = gsbx.files.rename("/tmp/rootonly/f.txt", "/tmp/rootonly/g.txt", user="root")
    assert moved.name == "g.txt"
    # The user is kept out of root's 0700 directory: the same calls as the user fail.
    with pytest.raises(SandboxError, match=r"(?i)permission denied"):
        gsbx.files.read("/tmp/rootonly/g.txt")
    with pytest.raises(SandboxError, match=r"(?i)permission denied"):
        gsbx.files.write("/tmp/rootonly/h.txt", "x")
    gsbx.files.remove("/tmp/rootonly/g.txt", user="root")
    assert not gsbx.files.exists("/tmp/rootonly/g.txt", user="root")
    # A user write stays the user's.
    gsbx.files.write("/home/user/u.txt", "u")
    assert gsbx.commands.run("stat -c %u /home/user/u.txt").stdout == "1000\n"
    with pytest.raises(InvalidArgumentError):
        gsbx.files.read("/home/user/u.txt", user="admin")


@pytest.mark.gvisor
def test_pty_as_root(gsbx: Sandbox) -> None:
    screen = bytearray()
    h = gsbx.pty.create(80, 24, on_data=screen.extend, cmd="id -u; tty", user="root")
    h.wait()
    assert b"0\r\n/dev/pts/" in bytes(screen)


@pytest.mark.gvisor
def test_gvisor_sandbox_with_a_mount_refuses_root() -> None:
    require_tier("gvisor")
    host = Path(tempfile.mkdtemp(prefix="moat-users-"))
    host.chmod(0o755)
    (host / "canary").write_text("host")
    (host / "canary").chmod(0o600)
    sbx = Sandbox.create(isolation="gvisor", mounts=[Mount(str(host), "/mnt/host")])
    try:
        # Without the refusal, root here wrote root-owned (and setuid) files into the host
        # directory and read its 0600 files: gVisor's gofer serves mounts as host root.
        with pytest.raises(PolicyError, match="host mounts"):
            sbx.commands.run("cp /bin/true /mnt/host/suid; chmod 4755 /mnt/host/suid", user="root")
        with pytest.raises(PolicyError, match="host mounts"):
            sbx.files.read("/mnt/host/canary", user="root")
        assert sorted(p.name for p in host.iterdir()) == ["canary"]  # seen from the host
        assert sbx.commands.run("id -u").stdout == "1000\n"
        # Positive control: the mount is there, and the user is kept out of the 0600 file.
        assert "Permission denied" in sbx.commands.run("cat /mnt/host/canary 2>&1 || true").stdout
    finally:
        sbx.kill()
        shutil.rmtree(host)


@pytest.mark.gvisor
def test_root_calls_are_stopped_like_the_users(gsbx: Sandbox) -> None:
    # The agent signals root's processes (its CAP_KILL; without it kill() answered False and
    # a timeout left the root command running).
    h = gsbx.commands.run("sleep 4242.5", user="root", background=True)
    assert gsbx.commands.kill(h.pid) is True
    with pytest.raises(MoatTimeout):
        gsbx.commands.run("sleep 4243.5", user="root", timeout=1)
    left = gsbx.commands.run("ps -eo args | grep -c '^sleep 424' || true").stdout
    assert left == "0\n"
