"""``user="root"`` on the microVM tier: uid 0 of the guest kernel with root's bounded set,
and none of the guest's host-facing parts within its reach (docs/users.md).

One sandbox per module (QEMU under TCG is slow). What root tries is checked by its outcome:
the guest kernel's state read back by another process afterwards (core_pattern, the
sandbox's cgroup limit, max_user_namespaces), the host's own restore of the sandbox through
the control port after root went for it, and the agent still answering. Positive controls:
root's writes succeed where the sandbox may write, and each probe's target is shown to be
there (read back) so a refusal is the hardening's, not a missing file. With the hardening of
the agent's mount namespace reverted (``moat/guest/boot.py`` ``confine``), the probes of
:func:`test_root_cannot_reach_the_guest_kernels_host_facing_parts` fail (seen; docs/users.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import require_tier

from moat import Sandbox
from moat.agent import shield
from moat.engine.client import fail_to_error
from moat.engine.users import ROOT_TIERS, as_root
from moat.errors import PolicyError, SandboxError
from moat.errors import TimeoutError as MoatTimeout
from moat.guest import boot
from moat.model import Mount
from moat.protocol import Frame, MsgType
from moat.protocol.contract import ROOT_CAPS
from moat.runtime.spec import SandboxSpec

pytestmark = pytest.mark.timeout(300)

ROOT_MASK = f"{sum(1 << b for b in ROOT_CAPS.values()):016x}"
#: Never in root's set here: mounts, modules, raw I/O, device nodes, ptrace, limits.
_NEVER = {"SYS_ADMIN": 21, "SYS_MODULE": 16, "SYS_RAWIO": 17, "MKNOD": 27, "SYS_PTRACE": 19}
_NEVER["SYS_RESOURCE"] = 24


def _status(text: str) -> dict[str, str]:
    return {k: v.strip() for k, v in (ln.split(":", 1) for ln in text.splitlines() if ":" in ln)}


def _probes(out: str) -> dict[str, str]:
    return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln and " " not in ln)


@pytest.fixture(scope="module")
def vsbx() -> Iterator[Sandbox]:
    require_tier("microvm")
    sbx = Sandbox.create(isolation="microvm", timeout=600)
    try:
        yield sbx
    finally:
        sbx.kill()


# -- no sandbox ---------------------------------------------------------------------------------


def test_the_guest_keeps_the_contracts_numbers() -> None:
    # boot.py runs in the guest without the moat package: its copies must match.
    assert boot.ROOT_CAPS == tuple(sorted(ROOT_CAPS.values()))
    assert boot.AGENT_UID == shield.AGENT_UID
    for cap in _NEVER.values():
        assert cap not in boot.ROOT_CAPS


def test_microvm_gives_root_but_not_with_host_mounts(tmp_path: Path) -> None:
    assert "microvm" in ROOT_TIERS
    assert as_root(SandboxSpec(sandbox_id="t-vmroot", tier="microvm"), "root") is True
    spec = SandboxSpec(
        sandbox_id="t-vmroot", tier="microvm", mounts=(Mount(str(tmp_path), "/mnt/x"),)
    )
    # The mount images keep host owners and modes, checked for the user only: root's
    # DAC_OVERRIDE would read what the user may not.
    with pytest.raises(PolicyError, match="host mounts"):
        as_root(spec, "root")


def test_an_agent_that_cannot_root_is_the_front_doors_refusal() -> None:
    """A guest whose agent has no root (one started by an older moat, or an exec'd agent):
    its "unsupported" answer to a root request is the typed refusal, never a run as user."""
    frame = Frame(MsgType.FAIL, 3, {"kind": "unsupported", "message": "cannot run as root"})
    with pytest.raises(PolicyError, match=r"lacks the capability 'user\.root'"):
        raise fail_to_error(frame, root=True)
    # Positive control: the same FAIL of a user request keeps its own meaning.
    assert "user.root" not in str(fail_to_error(frame))


# -- a real microVM -----------------------------------------------------------------------------


@pytest.mark.microvm
def test_root_is_uid_0_with_the_bounded_set(vsbx: Sandbox) -> None:
    out = vsbx.commands.run(
        "id -u; touch /tmp/owned; chown 123:456 /tmp/owned; stat -c %u:%g /tmp/owned; "
        "grep -E '^(Uid|Cap(Prm|Eff|Bnd|Amb)|NoNewPrivs)' /proc/self/status",
        user="root",
    ).stdout
    lines = out.splitlines()
    assert lines[:2] == ["0", "123:456"]  # positive control: root's chown works
    caps = _status("\n".join(lines[2:]))
    assert caps["Uid"].split() == ["0"] * 4 and caps["NoNewPrivs"] == "1"
    assert caps["CapPrm"] == caps["CapEff"] == caps["CapBnd"] == ROOT_MASK
    assert caps["CapAmb"] == "0" * 16
    # The user: uid 1000 throughout, no capability; also in a kernel the agent forked.
    user = _status(vsbx.commands.run("grep -E '^(Uid|CapPrm|CapEff)' /proc/self/status").stdout)
    assert user["Uid"].split() == ["1000"] * 4 and user["CapPrm"] == user["CapEff"] == "0" * 16
    e = vsbx.run_code(
        "print([l.split()[1] for l in open('/proc/self/status') "
        "if l.startswith(('CapInh', 'CapPrm', 'CapEff'))])"
    )
    assert e.logs.stdout == [f"{['0' * 16] * 3}\n"]
    # The agent (pid 1 of the sandbox) split as on gVisor: 999 real and saved, acting as
    # the user, root's set permitted only, CAP_KILL alone effective.
    agent = _status(vsbx.commands.run("grep -E '^(Uid|Cap(Prm|Eff))' /proc/1/status").stdout)
    assert agent["Uid"].split() == ["999", "1000", "999", "1000"]
    assert agent["CapPrm"] == ROOT_MASK and agent["CapEff"] == f"{1 << 5:016x}"


@pytest.mark.microvm
def test_root_cannot_reach_the_guest_kernels_host_facing_parts(vsbx: Sandbox) -> None:
    pwned = "/tmp/core-pattern-ran"
    out = vsbx.commands.run(
        # sysctls (uid 0 alone may write them): core_pattern would run code as full guest
        # root; a crash below would run it
        f"echo '|/bin/sh -c \"touch {pwned}\"' > /proc/sys/kernel/core_pattern; echo cp=$?; "
        "echo 5 > /proc/sys/user/max_user_namespaces; echo userns=$?; "
        "echo /tmp/x > /proc/sys/kernel/modprobe; echo modprobe=$?; "
        "echo s > /proc/sysrq-trigger; echo sysrq=$?; "
        # limits and cgroup membership (invariant 10)
        "echo max > /sys/fs/cgroup/sandbox/pids.max; echo pids=$?; "
        "echo $$ > /sys/fs/cgroup/cgroup.procs; echo cgmove=$?; "
        "echo x > /sys/bus/virtio/drivers/virtio_console/unbind; echo unbind=$?; "
        # the control port, block devices, kernel memory and log
        "for d in vport0p2 vda mem kmem port kmsg console ttyS0 tty0; do "
        "  (: </dev/$d) 2>/dev/null; echo dev_$d=$?; done; "  # open only: a tty's read blocks
        "echo blocks=$(find /dev -type b 2>/dev/null | wc -l); "
        "echo kcore=$(head -c 64 /proc/kcore | wc -c); "
        "mknod /tmp/disk b 254 0; echo mknod=$?; "
        "chmod 666 /dev/vport0p1; echo chmod=$?; "
        "mount -t tmpfs x /mnt; echo mount=$?; umount /dev; echo umount=$?; "
        "unshare -m true; echo mntns=$?; "
        "python3 -c 'import ctypes, sys; l = ctypes.CDLL(None, use_errno=True); "
        'sys.exit(0 if l.syscall(313, 0, b"", 0) == 0 else ctypes.get_errno())\'; '
        "echo finit_module=$?; "
        # the agent: its fds (the host channel), memory, signals
        "cat /proc/1/fd/3 </dev/null >/dev/null; echo agentfd=$?; "
        "head -c1 /proc/1/mem >/dev/null; echo agentmem=$?; "
        "kill -9 1; kill -STOP 1; echo signalled=1",
        user="root",
        timeout=60,
    ).stdout
    probes = _probes(out)
    names = (
        "cp", "userns", "modprobe", "sysrq", "pids", "cgmove", "unbind", "mknod", "chmod",
        "mount", "umount", "mntns", "finit_module", "agentfd", "agentmem",
        *(f"dev_{d}" for d in ("vport0p2", "vda", "mem", "kmem", "port", "kmsg", "console",
                               "ttyS0", "tty0")),
    )  # fmt: skip
    reached = [name for name in names if probes.get(name, "0") == "0"]
    reached += [name for name in ("blocks", "kcore") if probes.get(name) != "0"]
    assert not reached, (reached, out)
    assert probes["finit_module"] == "1", out  # EPERM: no CAP_SYS_MODULE (nor the filter)
    # The kernel's state, read back by another process: unchanged. (Positive control: the
    # files are there and readable.)
    state = vsbx.commands.run(
        "cat /proc/sys/kernel/core_pattern /proc/sys/user/max_user_namespaces "
        "/sys/fs/cgroup/sandbox/pids.max"
    ).stdout.split()
    assert state[0] == "core" and state[1] == "0" and state[2] != "max", state
    # A crash with a core dump asked for: the pattern root wrote never ran.
    vsbx.commands.run("ulimit -c unlimited; sh -c 'kill -SEGV $$'; true", user="root")
    assert not vsbx.files.exists(pwned, user="root")
    # The agent is unharmed, and root still works (positive control: its writes succeed
    # where the sandbox may write, its own tmpfs).
    assert vsbx.commands.run("echo alive").stdout == "alive\n"
    assert vsbx.commands.run("echo x > /tmp/r && echo ok", user="root").stdout == "ok\n"


@pytest.mark.microvm
def test_the_user_gains_nothing(vsbx: Sandbox) -> None:
    out = vsbx.commands.run(
        "head -c1 /dev/vport0p1 >/dev/null 2>&1; echo port=$?; "
        "head -c1 /dev/vport0p2 >/dev/null 2>&1; echo ctl=$?; "
        "su -c true root </dev/null >/dev/null 2>&1; echo su=$?; "
        "cat /proc/1/environ >/dev/null 2>&1; echo agentenv=$?; "
        "touch /dev/x 2>/dev/null; echo devw=$?; "
        "python3 -c 'import os; os.setuid(0)' 2>/dev/null; echo setuid=$?"
    ).stdout
    probes = _probes(out)
    for name in ("port", "ctl", "su", "agentenv", "devw", "setuid"):
        assert probes.get(name, "0") != "0", (name, out)
    # root's processes and 0700 files are out of the user's reach
    h = vsbx.commands.run("sleep 4242.5", user="root", background=True)
    assert vsbx.commands.run(f"kill {h.pid} 2>/dev/null; echo $?").stdout == "1\n"
    assert vsbx.commands.kill(h.pid) is True  # the agent's CAP_KILL (positive control)
    vsbx.commands.run("mkdir -m 700 /tmp/vault && echo s > /tmp/vault/k", user="root")
    with pytest.raises(SandboxError, match=r"(?i)permission denied"):
        vsbx.files.read("/tmp/vault/k")
    assert vsbx.files.read("/tmp/vault/k", user="root") == "s\n"


@pytest.mark.microvm
def test_files_and_pty_as_root(vsbx: Sandbox) -> None:
    assert vsbx.files.make_dir("/tmp/rootonly", user="root") is True
    vsbx.files.write("/tmp/rootonly/f.txt", "for root", user="root")
    assert vsbx.files.read("/tmp/rootonly/f.txt", user="root") == "for root"
    assert [e.name for e in vsbx.files.list("/tmp/rootonly", user="root")] == ["f.txt"]
    owner = vsbx.commands.run("stat -c %u:%g /tmp/rootonly/f.txt").stdout
    assert owner == "0:0\n"
    vsbx.files.remove("/tmp/rootonly", user="root")
    assert not vsbx.files.exists("/tmp/rootonly", user="root")
    screen = bytearray()
    h = vsbx.pty.create(80, 24, on_data=screen.extend, cmd="id -u; tty", user="root")
    h.wait()
    assert b"0\r\n/dev/pts/" in bytes(screen)
    with pytest.raises(MoatTimeout):
        vsbx.commands.run("sleep 4243.5", user="root", timeout=1)
    assert vsbx.commands.run("ps -eo args | grep -c '^sleep 4243' || true").stdout == "0\n"


@pytest.mark.microvm
@pytest.mark.slow
def test_root_after_pause_and_resume() -> None:
    """A restored guest (QEMU migration) keeps the agent's split and the confined mount
    namespace; guest root's control port served the restore although root inside went
    for it first (the host's fresh nonce reached the agent: the resume succeeded)."""
    require_tier("microvm")
    sbx = Sandbox.create(isolation="microvm", timeout=600)
    try:
        probe = "cat /dev/vport0p2 >/dev/null 2>&1; echo ctl=$?"
        assert sbx.commands.run(probe, user="root").stdout == "ctl=1\n"
        sbx.pause()
        sbx = Sandbox.connect(sbx.sandbox_id)
        out = sbx.commands.run(
            "id -u; grep CapEff /proc/self/status; ls /dev | grep -c vport", user="root"
        ).stdout.split()
        assert out == ["0", "CapEff:", ROOT_MASK, "1"], out
        assert sbx.commands.run("id -u").stdout == "1000\n"
    finally:
        sbx.kill()


@pytest.mark.microvm
@pytest.mark.slow
def test_a_root_fork_bomb_is_stopped_and_the_sandbox_recovers() -> None:
    """uid 0 is exempt from RLIMIT_NPROC, so root's fork bomb is held by the guest's pids
    cgroup (read-only to it) instead of the agent's reserve; the agent still stops it at
    the call's timeout and serves the next calls (this test: 20-35 s here under TCG)."""
    require_tier("microvm")
    sbx = Sandbox.create(isolation="microvm", timeout=300)
    try:
        bomb = "python3 -c 'import os\nwhile True:\n  try: os.fork()\n  except OSError: pass'"
        with pytest.raises((MoatTimeout, SandboxError)):
            sbx.commands.run(bomb, user="root", timeout=10)
        limit = sbx.commands.run("cat /sys/fs/cgroup/sandbox/pids.max", timeout=60).stdout
        assert limit.strip().isdigit()  # still the cap stage 2 set
        assert sbx.commands.run("id -u", user="root", timeout=60).stdout == "0\n"
        assert sbx.commands.run("ps -e --no-headers | wc -l").stdout.strip().isdigit()
    finally:
        sbx.kill()
