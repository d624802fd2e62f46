"""The bubblewrap argv builder is pure: golden files pin what a sandbox gets.

Regenerate after an intended change with ``MOAT_UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moat.protocol.contract import ROOT_CAPS
from moat.runtime.container.bwrap import HostLayout, build_argv
from moat.runtime.spec import Limits, Mount, SandboxSpec

GOLDEN = Path(__file__).parent / "golden"
HOST = HostLayout(agent_dir="/state/agent/abc", etc_dir="/state/etc", seccomp_fd=9)
CASES = {
    "default": SandboxSpec(sandbox_id="sbx-0001", tier="container"),
    "limits_mounts_envs": SandboxSpec(
        sandbox_id="sbx-0002",
        tier="container",
        envs=(("GREETING", "hi there"),),
        mounts=(Mount("/srv/data", "/data"), Mount("/srv/out", "/out", read_only=False)),
        limits=Limits(cpus=2, memory_mb=1024, pids=128, disk_mb=256),
    ),
}


#: Cases built as a root-capable sandbox (the driver's choice for one without mounts).
ROOT_CASES = {"root_default": CASES["default"]}


@pytest.mark.parametrize("name", sorted([*CASES, *ROOT_CASES]))
def test_golden(name: str) -> None:
    spec, root = (ROOT_CASES[name], True) if name in ROOT_CASES else (CASES[name], False)
    argv = build_argv(spec, HOST, ["/usr/bin/python3", "-I", "-c", "agent"], root=root)
    text = "\n".join(argv) + "\n"
    path = GOLDEN / f"bwrap_{name}.txt"
    if os.environ.get("MOAT_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} differs; regenerate if intended"


def test_invariants_hold_whatever_the_spec() -> None:
    argv = build_argv(CASES["limits_mounts_envs"], HOST, ["agent"])
    for flag in ("--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
                 "--unshare-uts", "--unshare-cgroup", "--die-with-parent", "--new-session",
                 "--clearenv", "--disable-userns"):  # fmt: skip
        assert flag in argv
    assert argv[argv.index("--seccomp") + 1] == "9"
    assert ("--bind", "/srv/out", "/out") == tuple(argv[argv.index("/srv/out") - 1 :][:3])
    assert argv[argv.index("/srv/data") - 1] == "--ro-bind"
    # the host's /etc is never bound wholesale, nor /root, /home, /var or /run
    binds = {argv[i + 1] for i, a in enumerate(argv) if a in ("--bind", "--ro-bind")}
    assert not binds & {"/etc", "/root", "/home", "/var", "/run", "/"}
    assert argv.index("--remount-ro") < argv.index("--")


def test_root_capable_sandbox_runs_in_the_drivers_namespace_with_roots_set() -> None:
    """No user namespace of bwrap's own (the driver's holder made it: ``--uid`` and
    ``--disable-userns`` need ``--unshare-user``); every other namespace as always; the
    capabilities are ROOT_CAPS and CAP_SETPCAP (for the agent to drop the bounding set)."""
    argv = build_argv(CASES["default"], HOST, ["agent"], root=True)
    for flag in ("--unshare-user", "--disable-userns", "--uid", "--gid"):
        assert flag not in argv
    for flag in ("--unshare-pid", "--as-pid-1", "--unshare-net", "--unshare-ipc",
                 "--unshare-uts", "--unshare-cgroup", "--die-with-parent", "--new-session",
                 "--clearenv", "--seccomp"):  # fmt: skip
        assert flag in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    added = {argv[i + 1] for i, a in enumerate(argv) if a == "--cap-add"}
    assert added == {*ROOT_CAPS, "CAP_SETPCAP"}
    assert not added & {"CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_SYS_RESOURCE", "CAP_NET_RAW"}
    assert argv.index("--cap-drop") < argv.index("--cap-add") < argv.index("--")
