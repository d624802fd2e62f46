"""moat's layer over a template's root on the container tier (toplayer.py, mountns.py).

The template's root reaches bubblewrap as one read-only overlay at ``/`` with moat's own layer
over it (not a bind per template entry). A hostile template plants files where moat's own
paths are (the agent's directory, /etc/passwd, /etc/ssh/ssh_config, /tmp, /home/user, /sys,
/proc, /dev); from a sandbox of it, none of them shows and moat's own files are there. Positive
controls: the template's other files under the same parents (/etc, /opt) do show, and a caller's
mounts land on the root. The plan itself is checked without a sandbox.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from tests import template_support
from tests.conftest import require_tier

from moat import InvalidArgumentError, Mount, Sandbox
from moat.runtime.container import toplayer
from moat.runtime.container.toplayer import TopOp

NAME = "tt-hostile-top"


def test_plan_without_mounts() -> None:
    ops = toplayer.plan_top()
    assert ops == (
        TopOp("opaque", "proc"),
        TopOp("opaque", "dev"),
        TopOp("opaque", "tmp"),
        TopOp("dir", "home"),
        TopOp("opaque", "home/user"),
        TopOp("whiteout", "sys"),
        TopOp("dir", "opt"),
        TopOp("tree", "opt/moat", "agent"),
        TopOp("dir", "etc"),
        TopOp("file", "etc/passwd", "passwd"),
        TopOp("file", "etc/group", "group"),
        TopOp("file", "etc/hostname", "hostname"),
        TopOp("file", "etc/hosts", "hosts"),
        TopOp("file", "etc/resolv.conf", "resolv.conf"),
        TopOp("file", "etc/nsswitch.conf", "nsswitch.conf"),
        TopOp("dir", "etc/ssh"),
        TopOp("file", "etc/ssh/ssh_config", "ssh_config"),
    )


def test_plan_makes_mount_points_once_and_leaves_tmpfs_ones_to_bwrap() -> None:
    ops = toplayer.plan_top(
        (("/data/sub", True), ("/data", True), ("/opt/tool/", False), ("/tmp/x", True))
    )
    extra = ops[len(toplayer.plan_top()) :]
    assert extra == (
        TopOp("dir", "data"),
        TopOp("dir", "data/sub"),
        TopOp("point", "opt/tool"),
    )


@pytest.mark.parametrize(
    "mounts",
    [
        (("/etc/passwd", False),),  # on one of moat's files
        (("/etc/passwd/x", True),),  # below one
        (("/opt/moat", True),),  # the agent's directory
        (("/sys/x", True),),  # below a path that is not there at all
        (("/data", False), ("/data/x", True)),  # below a caller's file mount
    ],
)
def test_plan_refuses_mounts_on_or_below_moats_own_paths(
    mounts: tuple[tuple[str, bool], ...],
) -> None:
    with pytest.raises(InvalidArgumentError):
        toplayer.plan_top(mounts)


PLANTED = "planted-" + secrets.token_hex(4)
#: Where a hostile template puts files under paths moat owns.
HIDDEN = (
    "/opt/moat/planted.txt",
    "/opt/moat/moat/agent/planted.py",
    "/tmp/planted.txt",
    "/home/user/planted.txt",
    "/sys/planted.txt",
    "/proc/planted.txt",
    "/dev/planted.txt",
)
#: The template's own files beside them: these show (positive controls).
SHOWN = ("/etc/planted-ok.conf", "/opt/planted-ok.txt", "/home/other/planted-ok.txt")

PROBE = """
import json, os
paths = %r
out = {p: os.path.exists(p) for p in paths}
out["/sys"] = os.path.exists("/sys")
out["passwd"] = open("/etc/passwd").read()
out["hosts"] = open("/etc/hosts").read()
out["ssh"] = open("/etc/ssh/ssh_config").read()
out["agent"] = sorted(os.listdir("/opt/moat"))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hostile() -> str:
    require_tier("container")
    files = {p: PLANTED for p in (*HIDDEN, *SHOWN)}
    files |= {"/etc/passwd": f"root:x:0:0:{PLANTED}:/:/bin/sh\n"}
    files |= {"/etc/hosts": f"10.9.9.9 {PLANTED}\n"}
    files |= {"/etc/ssh/ssh_config": f"Host *\n  ProxyCommand {PLANTED}\n"}
    template_support.install(NAME, files=files)
    return NAME


@pytest.mark.container
def test_moats_paths_hide_the_templates(hostile: str) -> None:
    with Sandbox.create(template=hostile, isolation="container", timeout=120) as s:
        ex = s.run_code(PROBE % ((*HIDDEN, *SHOWN),))
        assert ex.error is None, ex.error
        got = json.loads("".join(ex.logs.stdout))
        r = s.commands.run("cat /proc/self/mountinfo; touch /etc/x /opt/x 2>&1 || echo read-only")
    for path in SHOWN:  # positive controls: the template's root is there, merged
        assert got[path] is True, path
    for path in HIDDEN:  # invariant 1: moat's own paths are never the template's
        assert got[path] is False, path
    assert got["/sys"] is False
    assert PLANTED not in got["passwd"] and "user:x:1000:1000:" in got["passwd"]
    assert PLANTED not in got["hosts"] and PLANTED not in got["ssh"]
    assert "ProxyCommand" in got["ssh"]
    assert got["agent"] == ["moat"]
    assert r.stdout.rstrip().endswith("read-only")
    root = [line for line in r.stdout.splitlines() if " / / " in line]
    assert len(root) == 1 and " overlay moat " in root[0] and " ro," in root[0]


@pytest.mark.container
def test_mounts_land_on_the_merged_root(hostile: str, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("in-dir")
    (tmp_path / "file").write_text("a-file")
    for p in (tmp_path, tmp_path / "d"):
        p.chmod(0o755)
    for p in (tmp_path / "d" / "f", tmp_path / "file"):
        p.chmod(0o644)
    mounts = [
        Mount(str(tmp_path / "d"), "/srv/deep/dir"),
        Mount(str(tmp_path / "file"), "/etc-like/one.conf"),
        Mount(str(tmp_path / "d"), "/home/user/proj", read_only=False),
    ]
    with Sandbox.create(template=hostile, isolation="container", timeout=120, mounts=mounts) as s:
        r = s.commands.run(
            "cat /srv/deep/dir/f /etc-like/one.conf /home/user/proj/f /etc/planted-ok.conf"
        )
    assert r.stdout == f"in-dira-filein-dir{PLANTED}"
