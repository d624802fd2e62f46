"""Tenant quotas and tenant policy through a real ``moat serve`` and the unmodified E2B SDK
(issue 16, "Tenants"; invariant 11). Every refusal has its positive control: the same request
under the quota (or within the policy, or by another tenant) passes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from e2b import AsyncSandbox
from e2b.exceptions import RateLimitException, SandboxException
from e2b_code_interpreter import Sandbox
from tests.conftest import require_tier
from tests.server_support import MOAT, Server, new_key, serving, tenant_name

pytestmark = [pytest.mark.container, pytest.mark.slow]

_ROLES = (
    "two", "race", "rate", "mem", "cpu", "picky", "egress", "floor", "free", "short", "gv",
)  # fmt: skip

_PROFILES = """
[profiles.noguard]
isolation = "container"
guard = { mode = "off" }
"""


def _policy(t: dict[str, str]) -> str:
    return f"""
version = 1
[tenants.{t["two"]}]
quotas = {{ sandboxes = 2 }}
[tenants.{t["race"]}]
quotas = {{ sandboxes = 2 }}
[tenants.{t["rate"]}]
quotas = {{ creates_per_minute = 2 }}
[tenants.{t["mem"]}]
quotas = {{ memory_mb = 1024 }}
[tenants.{t["cpu"]}]
quotas = {{ cpus = 1.5 }}
[tenants.{t["picky"]}]
allowed_tiers = ["gvisor"]
[tenants.{t["egress"]}]
egress = {{ allow_out = ["pypi.org", "*.pythonhosted.org"] }}
[tenants.{t["floor"]}]
guard_floor = "redact"
[tenants.{t["short"]}]
quotas = {{ sandboxes = 1 }}
[tenants.{t["gv"]}]
allowed_tiers = ["container", "gvisor"]
default_tier = "gvisor"
"""


@dataclass
class Ctx:
    server: Server
    keys: dict[str, str]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    require_tier("container")
    tmp = tmp_path_factory.mktemp("serve-quota")
    names = {role: tenant_name(role) for role in _ROLES}
    (tmp / "tenants.toml").write_text(_policy(names))
    (tmp / "profiles.toml").write_text(_PROFILES)
    saved = {k: os.environ.get(k) for k in ("MOAT_TENANTS_FILE", "MOAT_POLICY_FILE")}
    os.environ["MOAT_TENANTS_FILE"] = str(tmp / "tenants.toml")  # moat serve --policy
    os.environ["MOAT_POLICY_FILE"] = str(tmp / "profiles.toml")
    try:
        with serving(tmp / "server.log") as srv:
            yield Ctx(srv, {role: new_key(name) for role, name in names.items()})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _create(ctx: Ctx, role: str, body: dict[str, object] | None = None) -> httpx.Response:
    return httpx.post(
        ctx.server.url + "/v2/sandboxes",
        json={"templateID": "base", "timeout": 60, **(body or {})},
        headers={"X-API-Key": ctx.keys[role]},
        timeout=60,
    )


def _kill(ctx: Ctx, role: str, sid: str) -> None:
    r = httpx.delete(
        f"{ctx.server.url}/sandboxes/{sid}", headers={"X-API-Key": ctx.keys[role]}, timeout=60
    )
    assert r.status_code == 204, r.text


def _running(ctx: Ctx, role: str) -> list[str]:
    return [s.sandbox_id for s in Sandbox.list(api_key=ctx.keys[role]).next_items()]


# ------------------------------------------------------------------------------- quotas


def test_running_sandboxes_quota_is_429_with_retry_after(ctx: Ctx) -> None:
    key = ctx.keys["two"]
    a = Sandbox.create(api_key=key, timeout=60)
    b = Sandbox.create(api_key=key, timeout=60)
    try:
        with pytest.raises(RateLimitException, match="2 running sandboxes"):
            Sandbox.create(api_key=key, timeout=60)
        r = _create(ctx, "two")
        assert r.status_code == 429 and r.json() == {"code": 429, "message": r.json()["message"]}
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        # tenant B is unaffected while A is at its quota (positive control)
        other = Sandbox.create(api_key=ctx.keys["free"], timeout=60)
        assert other.run_code("1+1").text == "2"
        other.kill()
        a.kill()
        c = Sandbox.create(api_key=key, timeout=60)  # room again after a kill
        assert c.run_code("2+2").text == "4"
        c.kill()
    finally:
        for s in (a, b):
            s.kill()
    assert _running(ctx, "two") == []


def test_racing_creates_get_exactly_the_free_slots(ctx: Ctx) -> None:
    key = ctx.keys["race"]

    async def race() -> list[AsyncSandbox | BaseException]:
        return await asyncio.gather(
            *(AsyncSandbox.create(api_key=key, timeout=60) for _ in range(4)),
            return_exceptions=True,
        )

    results = asyncio.run(race())
    ok = [r for r in results if isinstance(r, AsyncSandbox)]
    try:
        assert len(ok) == 2, results
        assert sum(isinstance(r, RateLimitException) for r in results) == 2, results
    finally:
        for s in ok:
            _kill(ctx, "race", s.sandbox_id)


def test_creates_per_minute(ctx: Ctx) -> None:
    for _ in range(2):
        r = _create(ctx, "rate")
        assert r.status_code == 201, r.text
        _kill(ctx, "rate", str(r.json()["sandboxID"]))  # killing frees slots, not the window
    r = _create(ctx, "rate")
    assert r.status_code == 429 and "2 creates per minute" in r.json()["message"]
    assert 50 <= int(r.headers["Retry-After"]) <= 60
    with pytest.raises(RateLimitException):
        Sandbox.create(api_key=ctx.keys["rate"])


def test_memory_and_cpu_totals(ctx: Ctx) -> None:
    # Every E2B sandbox gets moat's default Limits: 512 MiB, 1 CPU.
    ids = [str(_create(ctx, "mem").json()["sandboxID"]) for _ in range(2)]
    r = _create(ctx, "mem")
    assert r.status_code == 429 and "memory quota" in r.json()["message"], r.text
    for sid in ids:
        _kill(ctx, "mem", sid)
    first = _create(ctx, "cpu")
    assert first.status_code == 201, first.text
    r = _create(ctx, "cpu")
    assert r.status_code == 429 and "CPU quota" in r.json()["message"], r.text
    _kill(ctx, "cpu", str(first.json()["sandboxID"]))


def test_slot_released_when_the_sandbox_times_out(ctx: Ctx) -> None:
    first = _create(ctx, "short", {"timeout": 2})
    assert first.status_code == 201, first.text
    assert _create(ctx, "short").status_code == 429
    deadline = time.monotonic() + 30
    while True:
        r = _create(ctx, "short")
        if r.status_code == 201 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 201, r.text
    _kill(ctx, "short", str(r.json()["sandboxID"]))


# ------------------------------------------------------------------------ tenant policy


def test_tier_not_allowed_is_refused_and_leaves_nothing(ctx: Ctx) -> None:
    with pytest.raises(SandboxException, match="tier 'container' is not allowed"):
        Sandbox.create(api_key=ctx.keys["picky"], timeout=60)
    r = _create(ctx, "picky")
    assert r.status_code == 400 and "not allowed for this tenant" in r.json()["message"]
    assert _running(ctx, "picky") == []


@pytest.mark.gvisor
def test_the_tenants_default_tier_wins_over_the_servers(ctx: Ctx) -> None:
    require_tier("gvisor")
    probe = "import platform; platform.release()"  # gVisor reports its own kernel, 4.4.0
    sbx = Sandbox.create(api_key=ctx.keys["gv"], timeout=60)  # the server's --tier: container
    try:
        gv = sbx.run_code(probe).text
    finally:
        sbx.kill()
    ref = Sandbox.create(api_key=ctx.keys["free"], timeout=60)  # no default: the server's
    try:
        host = ref.run_code(probe).text
    finally:
        ref.kill()
    assert gv == "4.4.0" and host != gv, (gv, host)


def test_egress_beyond_the_ceiling_on_create_and_put_network(ctx: Ctx) -> None:
    bodies: tuple[dict[str, object], ...] = (
        {"network": {"allowOut": ["evil.example"]}},
        {"network": {"allowOut": ["pypi.org:8443"]}},
        {"network": {"allowTcp": ["github.com:22"]}},  # no raw TCP under this ceiling
        {"allow_internet_access": True},
    )
    for body in bodies:
        r = _create(ctx, "egress", body)
        assert r.status_code == 400 and "egress ceiling" in r.json()["message"], (body, r.text)
    assert _running(ctx, "egress") == []
    r = _create(ctx, "egress", {"network": {"allowOut": ["pypi.org", "files.pythonhosted.org"]}})
    assert r.status_code == 201, r.text  # within the ceiling
    sid = str(r.json()["sandboxID"])
    url, h = f"{ctx.server.url}/sandboxes/{sid}/network", {"X-API-Key": ctx.keys["egress"]}
    r = httpx.put(url, json={"allowOut": ["evil.example"]}, headers=h, timeout=60)
    assert r.status_code == 400 and "egress ceiling" in r.json()["message"], r.text
    r = httpx.put(url, json={"allowOut": ["pypi.org"]}, headers=h, timeout=60)
    assert r.status_code == 204, r.text
    info = httpx.get(f"{ctx.server.url}/sandboxes/{sid}", headers=h, timeout=60).json()
    assert info["network"]["allowOut"] == ["pypi.org"]  # the refused update changed nothing
    _kill(ctx, "egress", sid)
    # another tenant has no ceiling
    r = _create(ctx, "free", {"network": {"allowOut": ["evil.example"]}})
    assert r.status_code == 201, r.text
    _kill(ctx, "free", str(r.json()["sandboxID"]))


def test_guard_floor(ctx: Ctx) -> None:
    r = _create(ctx, "floor", {"templateID": "noguard"})
    assert r.status_code == 400 and "weaker than this tenant's floor" in r.json()["message"]
    assert _running(ctx, "floor") == []
    r = _create(ctx, "free", {"templateID": "noguard"})  # no floor: the same profile passes
    assert r.status_code == 201, r.text
    _kill(ctx, "free", str(r.json()["sandboxID"]))
    r = _create(ctx, "floor")  # the default guard (redact) meets the floor
    assert r.status_code == 201, r.text
    _kill(ctx, "floor", str(r.json()["sandboxID"]))


# ------------------------------------------------------------------------- the file


def test_a_malformed_policy_file_stops_the_server(tmp_path: Path) -> None:
    bad = tmp_path / "tenants.toml"
    bad.write_text("[default.quotas]\nsandboxes = 2\nmemory_mb = -5\n")
    proc = subprocess.run(
        [*MOAT, "serve", "--port", "1", "--policy", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "tenants.toml:3: default.quotas.memory_mb: must be between" in proc.stderr
    assert "listening" not in proc.stderr
    bad.write_text("[tenants.x]\nquota = { sandboxes = 1 }\n")
    proc = subprocess.run(
        [*MOAT, "serve", "--port", "1", "--policy", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and "tenants.x.quota: unknown key" in proc.stderr


def test_the_state_dir_file_is_used(tmp_path: Path) -> None:
    """``<state dir>/tenants.toml`` applies without --policy; a bad one stops the start."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "tenants.toml").write_text("[default]\nguard_floor = 7\n")
    env = {**os.environ, "MOAT_STATE_DIR": str(state)}
    env.pop("MOAT_TENANTS_FILE", None)
    proc = subprocess.run(
        [*MOAT, "serve", "--port", "1"], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode != 0 and "default.guard_floor: must be a string" in proc.stderr
