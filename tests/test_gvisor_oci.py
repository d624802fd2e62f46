"""The pure spec -> OCI config builder of the gvisor tier, against golden files.

Regenerate after an intended change with ``MOAT_UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from moat.agent import shield
from moat.protocol.contract import ROOT_CAPS
from moat.runtime.gvisor.oci import AGENT_UID, NODEV_FILE, SENTRY_OVERHEAD_MB, Bundle, build_config
from moat.runtime.spec import Limits, Mount, SandboxSpec

GOLDEN = Path(__file__).parent / "golden"
BUNDLE = Bundle(
    rootfs="/state/gvisor/sb-1/bundle/rootfs",
    agent_dir="/state/agent/0123456789abcdef",
    argv=("/usr/bin/python3", "-I", "-c", "boot"),
    etc_binds=("/etc/ld.so.cache", "/etc/alternatives"),
)

CASES: dict[str, SandboxSpec] = {
    "default": SandboxSpec(sandbox_id="sb-1", tier="gvisor"),
    "limits_mounts": SandboxSpec(
        sandbox_id="sb-2",
        tier="gvisor",
        envs=(("FOO", "bar"), ("PATH", "/custom/bin")),
        mounts=(
            Mount("/data/in", "/data"),
            Mount("/data/out", "/home/user/out", read_only=False),
        ),
        limits=Limits(cpus=0.5, memory_mb=256, pids=64, disk_mb=100),
        hostname="box",
    ),
}


def _check(name: str, got: dict[str, Any]) -> None:
    path = GOLDEN / f"gvisor_{name}.json"
    text = json.dumps(got, indent=1, sort_keys=True) + "\n"
    if os.environ.get("MOAT_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} differs; regenerate if intended"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    _check(name, build_config(CASES[name], BUNDLE))


def test_pure_and_deterministic() -> None:
    spec = CASES["limits_mounts"]
    assert build_config(spec, BUNDLE) == build_config(spec, BUNDLE)


def test_process_has_no_privilege() -> None:
    proc = build_config(CASES["default"], BUNDLE)["process"]
    # the agent's own uid with root's bounded set (the sentry's), which the agent keeps
    # permitted only, for user="root" calls (moat.agent.shield; test_containment's
    # test_privileges_inside and test_users check what remains, from inside and outside)
    assert proc["user"]["uid"] == AGENT_UID == shield.AGENT_UID == 999
    assert proc["user"]["gid"] == 1000
    assert shield.USER_UID == 1000
    caps = proc["capabilities"]
    assert caps["inheritable"] == caps["ambient"] == []
    assert caps["bounding"] == caps["effective"] == caps["permitted"] == sorted(ROOT_CAPS)
    for never in ("CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_SYS_RESOURCE", "CAP_NET_RAW",
                  "CAP_NET_ADMIN", "CAP_SYS_MODULE", "CAP_MKNOD", "CAP_SETFCAP"):  # fmt: skip
        assert never not in caps["bounding"]
    assert proc["noNewPrivileges"] is True
    assert proc["terminal"] is False
    limits = {r["type"]: r["hard"] for r in proc["rlimits"]}
    assert limits["RLIMIT_CORE"] == 0
    assert limits["RLIMIT_NPROC"] == 256


def test_env_is_exactly_spec_env() -> None:
    spec = CASES["limits_mounts"]
    env = build_config(spec, BUNDLE)["process"]["env"]
    assert env == [f"{k}={v}" for k, v in spec.env().items()]
    assert "PATH=/custom/bin" in env


def test_only_named_host_paths_are_bound() -> None:
    cfg = build_config(CASES["limits_mounts"], BUNDLE)
    binds = {m["source"]: m for m in cfg["mounts"] if m["type"] == "bind"}
    assert set(binds) == {
        "/usr",
        "/etc/ld.so.cache",
        "/etc/alternatives",
        BUNDLE.agent_dir,
        "/data/in",
        "/data/out",
        f"{BUNDLE.rootfs}/{NODEV_FILE}",  # the bundle's own empty file over /dev/fuse
    }
    for src, m in binds.items():
        assert ("rw" if src == "/data/out" else "ro") in m["options"], src
    assert cfg["root"] == {"path": BUNDLE.rootfs, "readonly": True}


def test_limits_reach_the_cgroup_and_tmpfs() -> None:
    cfg = build_config(CASES["limits_mounts"], BUNDLE)
    res = cfg["linux"]["resources"]
    assert res["memory"]["limit"] == (256 + SENTRY_OVERHEAD_MB) << 20
    assert res["cpu"] == {"quota": 50_000, "period": 100_000}
    tmpfs = {m["destination"]: m["options"] for m in cfg["mounts"] if m["type"] == "tmpfs"}
    assert "size=100m" in tmpfs["/home/user"] and "size=100m" in tmpfs["/tmp"]
    assert cfg["linux"]["cgroupsPath"] == "/moat-gvisor-sb-2"


def test_seccomp_denies_namespaces_but_not_clone3() -> None:
    rules = build_config(CASES["default"], BUNDLE)["linux"]["seccomp"]["syscalls"]
    names = {n for r in rules for n in r["names"]}
    assert {"unshare", "setns", "bpf", "ptrace"} <= names
    assert "clone3" not in names  # the sentry answers ENOSYS itself; see oci._SECCOMP_SKIP


def test_skeleton_preloads_the_statx_library(tmp_path: Path) -> None:
    from moat.runtime.gvisor.rootfs import write_skeleton

    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\x7fELF-ish")
    write_skeleton(tmp_path / "with", "h", preload=lib)
    inside = tmp_path / "with" / ".moat" / "statx_compat.so"
    assert inside.read_bytes() == lib.read_bytes() and (inside.stat().st_mode & 0o777) == 0o644
    assert (tmp_path / "with" / "etc" / "ld.so.preload").read_text() == "/.moat/statx_compat.so\n"
    write_skeleton(tmp_path / "without", "h")
    assert not (tmp_path / "without" / "etc" / "ld.so.preload").exists()


def test_statx_library_build_without_a_compiler_is_skipped_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moat.runtime.gvisor import compat

    monkeypatch.setenv("MOAT_STATE_DIR", str(tmp_path))
    monkeypatch.setattr("moat.runtime.gvisor.compat.shutil.which", lambda _name: None)
    assert compat.build() is None
    assert compat.problem() is not None
    assert not compat.library_path().exists()


def test_statx_library_builds_with_the_host_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import require

    from moat.runtime.gvisor import compat

    require(None if shutil.which("cc") else "no cc", "a C compiler (make install adds gcc)")
    monkeypatch.setenv("MOAT_STATE_DIR", str(tmp_path))
    built = compat.build()
    assert built is not None and built == compat.library_path()
    assert built.read_bytes()[:4] == b"\x7fELF"
    assert compat.build() == built  # cached
