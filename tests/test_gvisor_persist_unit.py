"""Pure parts of gVisor checkpoints: the manifest's config comparison, its refusals, and the
``runsc exec`` process of files-only saves. No runsc needed (a stand-in prints a version)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moat.errors import InvalidArgumentError, PolicyError
from moat.protocol import PROTOCOL_VERSION
from moat.runtime.gvisor.checkpoint import IMAGE, MANIFEST, _normalise, load_image
from moat.runtime.gvisor.fscopy import process_json
from moat.runtime.gvisor.oci import Bundle, build_config, cgroup_name
from moat.runtime.spec import Limits, SandboxSpec


def _config(sandbox_id: str, base: Path, **kw: object) -> tuple[dict[str, object], Path, str]:
    spec = SandboxSpec(sandbox_id=sandbox_id, tier="gvisor", **kw)  # type: ignore[arg-type]
    workdir = base / sandbox_id
    bundle = Bundle(
        rootfs=str(workdir / "bundle" / "rootfs"),
        agent_dir="/state/agent/0123456789abcdef",
        argv=("/usr/bin/python3", "-c", "pass"),
    )
    return build_config(spec, bundle), workdir, "/" + cgroup_name(spec)


def test_a_fork_config_equals_its_source_and_other_settings_do_not(tmp_path: Path) -> None:
    a = _normalise(*_config("src-1234", tmp_path))
    b = _normalise(*_config("fork-5678", tmp_path))
    assert a == b
    assert "src-1234" not in json.dumps(a)
    assert a != _normalise(*_config("fork-9999", tmp_path, limits=Limits(memory_mb=1024)))
    assert a != _normalise(*_config("fork-9998", tmp_path, envs=(("K", "v"),)))
    assert a != _normalise(*_config("fork-9997", tmp_path, hostname="other"))


def test_the_files_only_process_has_the_users_rights_and_nothing_more() -> None:
    p = process_json(["/usr/bin/tar", "-cf", "-", "home/user"])
    assert p["user"] == {"uid": 1000, "gid": 1000}
    assert all(v == [] for v in p["capabilities"].values())
    assert set(p["capabilities"]) == {
        "bounding",
        "effective",
        "inheritable",
        "permitted",
        "ambient",
    }
    assert p["noNewPrivileges"] is True and p["terminal"] is False
    assert p["env"] == ["PATH=/usr/bin:/bin", "LC_ALL=C.UTF-8"]  # nothing of the host's


def _fake_runsc(tmp_path: Path, version: str) -> str:
    exe = tmp_path / "runsc"
    exe.write_text(f"#!/bin/sh\necho '{version}'\n")
    exe.chmod(0o755)
    return str(exe)


def _checkpoint(tmp_path: Path, **over: object) -> Path:
    src = tmp_path / "ck"
    src.mkdir()
    (src / IMAGE).write_bytes(b"x" * 100)
    manifest = {
        "format": 1,
        "tier": "gvisor",
        "memory": True,
        "runsc": "runsc version 0.0~1",
        "platform": "ptrace",
        "protocol": PROTOCOL_VERSION,
        "agent": "0123456789abcdef",
        "image_bytes": 100,
        "config": {},
    }
    (src / MANIFEST).write_text(json.dumps({**manifest, **over}))
    return src


@pytest.mark.parametrize(
    ("over", "error"),
    [
        ({"runsc": "runsc version 0.0~2"}, PolicyError),
        ({"platform": "kvm"}, PolicyError),
        ({"protocol": PROTOCOL_VERSION + 1}, PolicyError),
        ({"image_bytes": 99}, InvalidArgumentError),
        ({"format": 2}, InvalidArgumentError),
        ({"tier": "microvm"}, InvalidArgumentError),
        ({"agent": "../../etc"}, PolicyError),
    ],
)
def test_a_manifest_that_does_not_match_is_refused(
    tmp_path: Path, over: dict[str, object], error: type[Exception]
) -> None:
    exe = _fake_runsc(tmp_path, "runsc version 0.0~1")
    src = _checkpoint(tmp_path, **over)
    with pytest.raises(error) as info:
        load_image(src, exe, "ptrace")
    assert str(tmp_path) not in str(info.value)  # invariant 8


def test_a_missing_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    exe = _fake_runsc(tmp_path, "runsc version 0.0~1")
    src = _checkpoint(tmp_path)
    (src / MANIFEST).unlink()
    with pytest.raises(InvalidArgumentError):
        load_image(src, exe, "ptrace")


def test_a_matching_manifest_is_accepted(tmp_path: Path) -> None:
    """The positive control of the refusals above."""
    from moat.runtime.agentdir import prepare

    exe = _fake_runsc(tmp_path, "runsc version 0.0~1")
    image = load_image(_checkpoint(tmp_path, agent=prepare().name), exe, "ptrace")
    assert image.memory and image.agent_dir == prepare()
