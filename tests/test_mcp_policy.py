"""The operator's policy reaches MCP tool calls through the front door: the MCP profile
(``MOAT_MCP_PROFILE``: tier, envs, timeout) and the tenant's quotas, on a real ``moat serve``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
from tests.conftest import require_tier
from tests.mcp_support import failed, http_client, new_sandbox, ok
from tests.server_support import Server, new_key, serving, tenant_name

from moat.engine.api import FrontDoor
from moat.engine.tenants import parse_tenants
from moat.mcp import Settings

pytestmark = [pytest.mark.asyncio, pytest.mark.container]

PROFILES = """
[profiles.mcp-agent]
isolation = "container"
timeout = 120
envs = { PROFILE_MARK = "from-the-profile" }
"""


@pytest.fixture(scope="module")
def tenants() -> dict[str, str]:
    return {"one": tenant_name("one"), "free": tenant_name("free")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tenants: dict[str, str]) -> Iterator[Server]:
    require_tier("container")
    tmp = tmp_path_factory.mktemp("serve-mcp-policy")
    (tmp / "tenants.toml").write_text(
        f"version = 1\n[tenants.{tenants['one']}]\nquotas = {{ sandboxes = 1 }}\n"
    )
    (tmp / "profiles.toml").write_text(PROFILES)
    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as mp:  # the server's environment, not the tests'
            mp.setenv("MOAT_TENANTS_FILE", str(tmp / "tenants.toml"))
            mp.setenv("MOAT_POLICY_FILE", str(tmp / "profiles.toml"))
            mp.setenv("MOAT_MCP_PROFILE", "mcp-agent")
            srv = stack.enter_context(serving(tmp / "server.log"))
        yield srv


async def test_profile_applies(server: Server, tenants: dict[str, str]) -> None:
    key = new_key(tenants["free"])
    async with http_client(server.url, key) as client:
        shown = await ok(client, "run_code", code="import os\nos.environ['PROFILE_MARK']")
        assert "from-the-profile" in shown
        await new_sandbox(client, "p")
        assert "tier=container" in await ok(client, "list_sandboxes")
        await ok(client, "kill_sandbox", sandbox="p")


async def test_quota_applies(server: Server, tenants: dict[str, str]) -> None:
    key = new_key(tenants["one"])
    async with http_client(server.url, key) as client:
        await new_sandbox(client, "only")
        shown = await failed(client, "create_sandbox", {"name": "second"})
        assert shown.startswith("QuotaExceededError:"), shown
        shown = await failed(client, "run_code", {"code": "1"})  # a one-shot needs room too
        assert shown.startswith("QuotaExceededError:"), shown
        await ok(client, "kill_sandbox", sandbox="only")
        assert "2" in await ok(client, "run_code", code="1 + 1")  # room again


async def test_tenant_default_tier_without_a_setting() -> None:
    policy = parse_tenants(
        'version = 1\n[tenants.gv]\nallowed_tiers = ["container", "gvisor"]\n'
        'default_tier = "gvisor"\n'
    )
    front = FrontDoor(engine=object(), policy=policy)  # type: ignore[arg-type]
    assert Settings().config(front, "gv", None, {}).tier == "gvisor"
    assert Settings().config(front, "other", None, {}).tier == "microvm"  # trust untrusted
    assert Settings(isolation="container").config(front, "gv", None, {}).tier == "container"
    assert os.environ.get("MOAT_MCP_PROFILE") is None  # the module's server's, not ours
