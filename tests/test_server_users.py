"""``user="root"`` through a real ``moat serve`` on the gvisor tier with the unmodified E2B
SDKs (docs/users.md): commands, files and terminals as root inside; the user stays the user.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import AuthenticationException, SandboxException
from e2b.sandbox.commands.command_handle import PtySize
from tests.conftest import require_tier
from tests.server_support import Server, new_key, serving, tenant_name

from moat import Sandbox as MoatSandbox
from moat.errors import InvalidArgumentError as MoatInvalid

pytestmark = [pytest.mark.gvisor, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def gserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_tier("gvisor")
    log = Path(tmp_path_factory.mktemp("server-users")) / "serve.log"
    with serving(log, tier="gvisor") as srv:
        yield srv


@pytest.fixture(scope="module")
def sbx(gserver: Server) -> Iterator[Sandbox]:
    s = Sandbox.create(api_key=new_key(tenant_name("users")), timeout=300)
    yield s
    s.kill()


def test_commands_as_root_and_as_user(sbx: Sandbox) -> None:
    assert sbx.commands.run("id -u", user="root").stdout == "0\n"
    assert sbx.commands.run("id -u").stdout == "1000\n"
    assert sbx.commands.run("id -un", user="user").stdout == "user\n"
    # root inside can do root's work on the sandbox's own files (positive control)
    out = sbx.commands.run(
        "touch /tmp/own && chown 42:42 /tmp/own && stat -c %u /tmp/own", user="root"
    )
    assert out.stdout == "42\n"
    handle = sbx.commands.run("sleep 30", user="root", background=True)
    assert sbx.commands.run(f"kill {handle.pid} 2>&1; echo $?").stdout != "0\n"  # the user's
    assert sbx.commands.kill(handle.pid)


def test_files_as_root(sbx: Sandbox) -> None:
    sbx.commands.run("mkdir -m 700 /tmp/vault", user="root")
    info = sbx.files.write("/tmp/vault/key", "for root only", user="root")
    assert info.path == "/tmp/vault/key"
    assert sbx.files.read("/tmp/vault/key", user="root") == "for root only"
    assert [e.name for e in sbx.files.list("/tmp/vault", user="root")] == ["key"]
    assert sbx.files.exists("/tmp/vault/key", user="root")
    with pytest.raises(SandboxException):
        sbx.files.read("/tmp/vault/key")  # the user is kept out
    assert sbx.files.make_dir("/tmp/vault/sub", user="root")
    sbx.files.rename("/tmp/vault/key", "/tmp/vault/sub/key", user="root")
    sbx.files.remove("/tmp/vault/sub", user="root")
    assert not sbx.files.exists("/tmp/vault/sub", user="root")
    # signed URLs name the user too (download as root, no access token)
    sbx.files.write("/tmp/vault/dl", "signed", user="root")
    assert httpx.get(sbx.download_url("/tmp/vault/dl", "root"), timeout=30).text == "signed"
    with pytest.raises(AuthenticationException):
        sbx.files.read("/tmp/vault/dl", user="admin")


def test_pty_as_root(sbx: Sandbox) -> None:
    data = bytearray()
    h = sbx.pty.create(PtySize(rows=24, cols=80), user="root")
    sbx.pty.send_stdin(h.pid, b"echo uid=$(id -u); exit\n")
    h.wait(on_pty=data.extend)
    assert b"uid=0" in bytes(data)


def test_moat_http_transport_as_root(gserver: Server) -> None:
    """moat's own SDK over HTTP: the same user= surface as embedded use."""
    key = new_key(tenant_name("users-moat"))
    sbx = MoatSandbox.create(api_url=gserver.url, api_key=key, isolation="gvisor")
    try:
        assert sbx.commands.run("id -u", user="root").stdout == "0\n"
        sbx.files.write("/tmp/by-root", "r", user="root")
        assert sbx.commands.run("stat -c %u /tmp/by-root").stdout == "0\n"
        assert sbx.files.read("/tmp/by-root", user="root") == "r"
        assert sbx.files.make_dir("/tmp/rdir", user="root")
        with pytest.raises(MoatInvalid):
            sbx.commands.run("id -u", user="admin")
    finally:
        sbx.kill()
