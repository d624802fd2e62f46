"""The bubblewrap argv builder is pure: golden files pin what a sandbox gets.

Regenerate after an intended change with ``MOAT_UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    argv = build_argv(CASES[name], HOST, ["/usr/bin/python3", "-I", "-c", "agent"])
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
