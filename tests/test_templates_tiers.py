"""Sandboxes on a built template's root, on every tier (issue 12).

A real Debian bookworm root (mmdebstrap, cached per machine: tests/template_support.py) is
installed as a template with a marker file, an environment and a working directory. Inside a
sandbox of it, on each tier: the template's files are there, a file that exists only on the
host's /usr is not (a canary planted in the host's /usr/local/share for the test, checked from
inside; positive control: the ``host`` template does see it), run_code and commands work and
the template's env and workdir apply (the caller's env over the template's), moat's own /etc
files win. An unknown template, a root with a device node or without python3, and a template
naming another user are refused.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests import template_support
from tests.conftest import require_tier

from moat import InvalidArgumentError, Sandbox
from moat.paths import state_dir
from moat.templates import ref

NAME = "tt-debian"
MARKER = "/usr/share/moat-test/marker.txt"
WORKDIR = "/srv/app"
#: On the host's /usr (busybox-static: the microVM tier's setup needs it), not in the template.
#: The microVM's host /usr is an image taken at setup, which a canary planted now is not in.
HOST_ONLY = "/usr/bin/busybox"


@pytest.fixture(scope="module")
def template() -> tuple[ref.TemplateRef, str]:
    """The Debian template, with a marker whose content is new per run."""
    content = "marker-" + secrets.token_hex(8)
    found = template_support.install(
        NAME,
        env={"TT_GREETING": "hello-from-template", "TT_BOTH": "template"},
        workdir=WORKDIR,
        files={MARKER: content, f"{WORKDIR}/README": "app dir\n"},
    )
    return found, content


@pytest.fixture
def host_canary() -> Iterator[str]:
    """A file that exists only on the host's /usr (removed after the test)."""
    path = Path("/usr/local/share") / f"moat-tt-canary-{secrets.token_hex(6)}"
    path.write_text("host only\n")
    path.chmod(0o644)
    try:
        yield str(path)
    finally:
        path.unlink(missing_ok=True)


PROBE = """
import os, json
print(json.dumps({
    "cwd": os.getcwd(),
    "greeting": os.environ.get("TT_GREETING"),
    "both": os.environ.get("TT_BOTH"),
    "canary": os.path.exists(%r),
    "host_only": os.path.exists(%r),
    "marker": open(%r).read() if os.path.exists(%r) else None,
}))
"""


def _probe(s: Sandbox, canary: str) -> dict[str, object]:
    import json

    ex = s.run_code(PROBE % (canary, HOST_ONLY, MARKER, MARKER))
    assert ex.error is None, ex.error
    out: dict[str, object] = json.loads("".join(ex.logs.stdout))
    return out


def test_sandbox_runs_on_the_template_root(
    tier: str, template: tuple[ref.TemplateRef, str], host_canary: str
) -> None:
    _, content = template
    with Sandbox.create(
        template=NAME, isolation=tier, timeout=300, envs={"TT_BOTH": "caller"}
    ) as s:
        got = _probe(s, host_canary)
        assert got == {
            "cwd": WORKDIR,
            "greeting": "hello-from-template",
            "both": "caller",  # the caller's env over the template's
            "canary": False,  # the host's /usr is not there (invariant 1)
            "host_only": False,
            "marker": content,  # the template's files are
        }
        r = s.commands.run(f"pwd; cat {MARKER}; echo; test ! -e {host_canary} && echo no-canary")
        assert r.stdout.split() == [WORKDIR, content, "no-canary"]
        assert s.files.read(MARKER) == content
        # moat's own /etc entries win over the template's
        passwd = s.files.read("/etc/passwd")
        assert "user:x:1000:1000:" in passwd and passwd.count("\n") == 3
        assert "ProxyCommand" in s.files.read("/etc/ssh/ssh_config")
        # the root is read-only, home and /tmp are writable
        r = s.commands.run(
            "touch /usr/x 2>/dev/null && echo usr-writable; "
            "touch /etc/x 2>/dev/null && echo etc-writable; "
            "touch /home/user/x /tmp/x && echo ok"
        )
        assert r.stdout.split() == ["ok"]
        # issue 17 §4: no host path of the template's root in the mount table inside
        table = s.files.read("/proc/self/mountinfo")
        # positive control: the sandbox's real table (the container tier shows the template's
        # root as one overlay at /, moat's layer over it; the other tiers mount /usr)
        assert " /proc " in table and (" /usr " in table or " / / " in table)
        assert str(state_dir()) not in table and "/templates/" not in table


def test_host_template_sees_the_host_usr(
    tier: str, template: tuple[ref.TemplateRef, str], host_canary: str
) -> None:
    """Positive control: the same probe on the ``host`` template sees the host's canary."""
    with Sandbox.create(template="host", isolation=tier, timeout=300) as s:
        got = _probe(s, host_canary)
    assert got["host_only"] is True and got["marker"] is None
    if tier != "microvm":  # its /usr is the image taken at setup, before the canary
        assert got["canary"] is True
    assert got["cwd"] == "/home/user" and got["greeting"] is None


def test_unknown_template_is_refused_on_every_tier(tier: str) -> None:
    with pytest.raises(InvalidArgumentError, match="template 'tt-no-such' was not found"):
        Sandbox.create(template="tt-no-such", isolation=tier, timeout=60)
    with pytest.raises(InvalidArgumentError, match="bad template name"):
        Sandbox.create(template="../etc", isolation=tier, timeout=60)


def _small_root(tmp_path: Path, python: bool) -> Path:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    if python:
        (root / "usr/bin/python3.11").write_text("")
        os.symlink("python3.11", root / "usr/bin/python3")
    return root


def test_root_without_python_is_refused(tmp_path: Path) -> None:
    template_support.install("tt-nopython", src=_small_root(tmp_path, python=False))
    with pytest.raises(InvalidArgumentError, match="no /usr/bin/python3"):
        Sandbox.create(template="tt-nopython", isolation="container", timeout=60)


def test_root_with_a_device_node_is_refused(tmp_path: Path) -> None:
    found = template_support.install(
        "tt-devnode", src=_small_root(tmp_path, python=True), files={"/dev/.keep": ""}
    )
    node = found.rootfs / "dev" / "null"
    if not node.exists():
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with pytest.raises(InvalidArgumentError, match=r"device node.* at /dev/null"):
        Sandbox.create(template="tt-devnode", isolation="container", timeout=60)


def test_template_of_another_user_is_refused(tmp_path: Path) -> None:
    template_support.install("tt-root-user", src=_small_root(tmp_path, python=True), user="root")
    with pytest.raises(InvalidArgumentError, match="only the sandbox user"):
        Sandbox.create(template="tt-root-user", isolation="container", timeout=60)


def test_e2b_sdk_creates_a_sandbox_of_a_built_template(
    template: tuple[ref.TemplateRef, str], tmp_path: Path
) -> None:
    """Over the wire: ``templateID`` names a built template; an unknown one is a 400."""
    import httpx
    from e2b import Sandbox as E2BSandbox
    from tests.server_support import new_key, serving, tenant_name

    require_tier("container")
    _, content = template
    with serving(tmp_path / "serve.log") as srv:
        key = new_key(tenant_name("tt"))
        s = E2BSandbox.create(template=NAME, api_key=key, timeout=120)
        try:
            assert s.files.read(MARKER) == content
            r = s.commands.run("pwd; echo $TT_GREETING")
            assert r.stdout.split() == [WORKDIR, "hello-from-template"]
        finally:
            s.kill()
        raw = httpx.post(
            srv.url + "/v2/sandboxes", json={"templateID": "tt-no-such"}, headers={"X-API-Key": key}
        )
        assert raw.status_code == 400 and "was not found" in raw.json()["message"]


def test_mounts_on_a_template_root(
    tier: str, template: tuple[ref.TemplateRef, str], tmp_path: Path
) -> None:
    """A caller's mounts land on the template's root: at a new path and inside one of its
    directories (/opt, beside the agent); the host's mount table is unchanged after."""
    from moat import Mount

    _, content = template
    (tmp_path / "f").write_text("hello-data")
    os.chmod(tmp_path, 0o755)
    os.chmod(tmp_path / "f", 0o644)
    before = Path("/proc/self/mountinfo").read_text()
    mounts = [Mount(str(tmp_path), "/data"), Mount(str(tmp_path), "/opt/tool")]
    with Sandbox.create(template=NAME, isolation=tier, timeout=300, mounts=mounts) as s:
        r = s.commands.run(f"cat /data/f; echo; cat /opt/tool/f; echo; ls /opt; cat {MARKER}")
    assert r.stdout.split() == ["hello-data", "hello-data", "moat", "tool", content]
    assert Path("/proc/self/mountinfo").read_text() == before  # staged in the child only
