"""``user="root"`` through a real ``moat serve`` on the microVM tier with the unmodified E2B
SDK (docs/users.md): one sandbox, commands, files and a terminal as root; the user stays the
user. Containment of root on this tier: tests/test_users_microvm.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException
from e2b.sandbox.commands.command_handle import PtySize
from tests.conftest import require_tier
from tests.server_support import new_key, serving, tenant_name

pytestmark = [pytest.mark.microvm, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def sbx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    require_tier("microvm")
    log = Path(tmp_path_factory.mktemp("server-users-vm")) / "serve.log"
    with serving(log, tier="microvm"):
        s = Sandbox.create(api_key=new_key(tenant_name("vmroot")), timeout=300)
        try:
            yield s
        finally:
            s.kill()


def test_root_over_the_e2b_wire(sbx: Sandbox) -> None:
    assert sbx.commands.run("id -u", user="root").stdout == "0\n"
    assert sbx.commands.run("id -u").stdout == "1000\n"
    out = sbx.commands.run(
        "touch /tmp/own && chown 42:42 /tmp/own && stat -c %u /tmp/own", user="root"
    )
    assert out.stdout == "42\n"  # root's work on the sandbox's own files
    sbx.commands.run("mkdir -m 700 /tmp/vault", user="root")
    sbx.files.write("/tmp/vault/key", "for root only", user="root")
    assert sbx.files.read("/tmp/vault/key", user="root") == "for root only"
    with pytest.raises(SandboxException):
        sbx.files.read("/tmp/vault/key")  # the user is kept out
    data = bytearray()
    h = sbx.pty.create(PtySize(rows=24, cols=80), user="root")
    sbx.pty.send_stdin(h.pid, b"echo uid=$(id -u); exit\n")
    h.wait(on_pty=data.extend)
    assert b"uid=0" in bytes(data)
