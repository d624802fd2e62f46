"""``user="root"`` through a real ``moat serve`` on the container tier with the unmodified E2B
SDK (docs/users.md): root is uid 0 of the sandbox's own user namespace, also in a sandbox
taken from the warm pool; the user stays the user.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException
from tests.conftest import require_tier
from tests.server_support import Server, new_key, serving, tenant_name

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def cserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_tier("container")
    log = Path(tmp_path_factory.mktemp("server-users-ct")) / "serve.log"
    with serving(log, tier="container", pool="container=1") as srv:
        yield srv


def test_root_over_the_e2b_sdk(cserver: Server) -> None:
    key = new_key(tenant_name("ctroot"))
    for _ in range(2):  # the first may come from the warm pool, the second is made anew
        sbx = Sandbox.create(api_key=key, timeout=120)
        try:
            assert sbx.commands.run("id -u", user="root").stdout == "0\n"
            assert sbx.commands.run("id -u").stdout == "1000\n"
            sbx.commands.run("mkdir -m 700 /home/user/vault", user="root")
            info = sbx.files.write("/home/user/vault/key", "for root only", user="root")
            assert info.path == "/home/user/vault/key"
            owner = sbx.commands.run("stat -c %u:%g /home/user/vault/key", user="root").stdout
            assert owner == "0:0\n"  # a root write makes a root file
            assert sbx.files.read("/home/user/vault/key", user="root") == "for root only"
            with pytest.raises(SandboxException):
                sbx.files.read("/home/user/vault/key")  # the user is kept out
            handle = sbx.commands.run("sleep 30", user="root", background=True)
            assert sbx.commands.run(f"kill {handle.pid} 2>&1; echo $?").stdout != "0\n"
            assert sbx.commands.kill(handle.pid)
        finally:
            sbx.kill()
