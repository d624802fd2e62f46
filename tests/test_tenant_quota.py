"""Tenant policies and quotas in the front door (invariant 11), on the fake runtime: fast.

The server tests (test_server_quota.py) check the same rules through ``moat serve`` and the
real E2B SDK; here each rule is pinned with a positive control (the same request under the
quota, or within the policy, passes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from moat.engine.api import FrontDoor
from moat.engine.engine import Engine
from moat.engine.quota import Ledger
from moat.engine.tenants import Quotas, load_tenants, parse_tenants
from moat.errors import PolicyError, QuotaExceededError, SandboxDiedError
from moat.model import SandboxConfig
from moat.runtime.spec import SandboxSpec
from moat.sdk.async_ import AsyncSandbox
from moat.testing import local_transport
from moat.testing.fake import FakeProcess, FakeRuntime

pytestmark = pytest.mark.asyncio

POLICY = """
version = 1
[default]
quotas = { sandboxes = 2, memory_mb = 1024, cpus = 2 }
[tenants.small]
quotas = { sandboxes = 1 }
[tenants.rate]
quotas = { sandboxes = 100, memory_mb = 100000, cpus = 100, creates_per_minute = 3 }
[tenants.picky]
allowed_tiers = ["gvisor", "microvm"]
default_tier = "gvisor"
guard_floor = "redact"
egress = { allow_out = ["pypi.org", "*.pythonhosted.org"], allow_tcp = ["github.com:22"] }
[tenants.gvonly]
allowed_tiers = ["gvisor"]
default_tier = "gvisor"
"""


def _door(text: str = POLICY, runtime: Any = None) -> FrontDoor:
    rt = runtime or FakeRuntime(unsafe_no_isolation=True)
    return FrontDoor(Engine(pool={}, runtime=rt), parse_tenants(text))


@pytest_asyncio.fixture
async def door() -> AsyncIterator[FrontDoor]:
    d = _door()
    yield d
    for s in list(d.engine.sessions.values()):
        await s.kill()


def _cfg(**kw: Any) -> SandboxConfig:
    return FrontDoor.resolve(isolation="container", **kw)


# ------------------------------------------------------------------------------- quotas


async def test_running_sandboxes_quota_refuses_then_frees_on_kill(door: FrontDoor) -> None:
    a = await door.create("t1", _cfg(limits={"memory_mb": 256}))
    await door.create("t1", _cfg(limits={"memory_mb": 256}))
    with pytest.raises(QuotaExceededError, match="2 running sandboxes") as err:
        await door.create("t1", _cfg(limits={"memory_mb": 256}))
    assert err.value.retry_after is not None and 0 < err.value.retry_after <= 300
    await door.kill("t1", a.sandbox_id)
    await door.create("t1", _cfg(limits={"memory_mb": 256}))  # room again


async def test_other_tenants_are_unaffected(door: FrontDoor) -> None:
    await door.create("small", _cfg())
    with pytest.raises(QuotaExceededError):
        await door.create("small", _cfg())
    await door.create("other", _cfg())  # positive control: another tenant, same moment


async def test_memory_and_cpu_totals(door: FrontDoor) -> None:
    await door.create("m", _cfg(limits={"memory_mb": 768, "cpus": 0.5}))
    with pytest.raises(QuotaExceededError, match="memory quota"):
        await door.create("m", _cfg(limits={"memory_mb": 512, "cpus": 0.5}))
    await door.create("m", _cfg(limits={"memory_mb": 256, "cpus": 0.5}))  # fits exactly
    d2 = _door()
    await d2.create("c", _cfg(limits={"memory_mb": 64, "cpus": 1.5}))
    with pytest.raises(QuotaExceededError, match="CPU quota"):
        await d2.create("c", _cfg(limits={"memory_mb": 64, "cpus": 1.0}))
    await d2.create("c", _cfg(limits={"memory_mb": 64, "cpus": 0.5}))
    for s in list(d2.engine.sessions.values()):
        await s.kill()


async def test_one_sandbox_larger_than_the_whole_quota_is_policy(door: FrontDoor) -> None:
    with pytest.raises(PolicyError, match="whole memory quota"):
        await door.create("big", _cfg(limits={"memory_mb": 2048}))
    assert door.engine.quota.usage("big") == (0, 0.0, 0)


async def test_creates_per_minute_window() -> None:
    now = [1000.0]
    door = _door()
    door.engine.quota = Ledger(clock=lambda: now[0])
    ids = [(await door.create("rate", _cfg(limits={"memory_mb": 64}))).sandbox_id]
    now[0] += 10
    for _ in range(2):
        ids.append((await door.create("rate", _cfg(limits={"memory_mb": 64}))).sandbox_id)
    for sid in ids:  # killing frees slots, not the window
        await door.kill("rate", sid)
    with pytest.raises(QuotaExceededError, match="3 creates per minute") as err:
        await door.create("rate", _cfg(limits={"memory_mb": 64}))
    assert err.value.retry_after == pytest.approx(50.0)
    now[0] += 50.5  # the first create left the window
    s = await door.create("rate", _cfg(limits={"memory_mb": 64}))
    await door.kill("rate", s.sandbox_id)


async def test_racing_creates_get_exactly_the_free_slots(door: FrontDoor) -> None:
    results = await asyncio.gather(
        *(door.create("race", _cfg(limits={"memory_mb": 64})) for _ in range(4)),
        return_exceptions=True,
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, QuotaExceededError)]
    assert len(ok) == 2 and len(refused) == 2, results
    assert door.engine.quota.usage("race")[0] == 2


async def test_slot_released_when_the_sandbox_times_out(door: FrontDoor) -> None:
    await door.create("small", _cfg(timeout=1))
    with pytest.raises(QuotaExceededError):
        await door.create("small", _cfg())
    for _ in range(100):
        if door.engine.quota.usage("small")[0] == 0:
            break
        await asyncio.sleep(0.1)
    await door.create("small", _cfg())


class _Failing(FakeRuntime):
    async def start(self, spec: SandboxSpec) -> FakeProcess:
        raise SandboxDiedError("the agent did not start")


async def test_slot_released_when_the_start_fails() -> None:
    door = _door(runtime=_Failing(unsafe_no_isolation=True))
    for _ in range(3):  # more than the quota of 1: each failure gave its slot back
        with pytest.raises(SandboxDiedError):
            await door.create("small", _cfg())
    assert door.engine.quota.usage("small") == (0, 0.0, 0)


async def test_slot_released_when_the_sandbox_dies(door: FrontDoor) -> None:
    info = await door.create("small", _cfg())
    session = door.engine.get(info.sandbox_id)
    assert session is not None
    await session.kill("died: test")
    await door.create("small", _cfg())


async def test_no_policy_means_no_limits() -> None:
    door = FrontDoor(Engine(pool={}, runtime=FakeRuntime(unsafe_no_isolation=True)))
    assert door.policy.of("default").quotas == Quotas()
    infos = [await door.create("default", _cfg(limits={"memory_mb": 64})) for _ in range(4)]
    for i in infos:
        await door.kill("default", i.sandbox_id)


# ------------------------------------------------------------------------- tenant policy


async def test_tiers_not_allowed_are_refused_and_nothing_starts(door: FrontDoor) -> None:
    with pytest.raises(PolicyError, match="tier 'container' is not allowed"):
        await door.create("picky", _cfg())
    assert not door.engine.sessions
    assert door.engine.quota.usage("picky") == (0, 0.0, 0)
    assert door.default_tier("picky") == "gvisor"
    assert door.default_tier("anyone") is None
    await door.create("picky", FrontDoor.resolve(isolation="gvisor"))  # positive control


async def test_the_embedded_sdk_gets_the_tenants_default_tier(door: FrontDoor) -> None:
    sbx = await AsyncSandbox.create(transport=local_transport(door, "gvonly"))  # no tier named
    await sbx.kill()
    with pytest.raises(PolicyError, match="'microvm' is not allowed"):  # naming one: checked
        await AsyncSandbox.create(transport=local_transport(door, "gvonly"), trust="untrusted")


async def test_guard_floor_refuses_weaker_modes(door: FrontDoor) -> None:
    with pytest.raises(PolicyError, match="weaker than this tenant's floor"):
        await door.create("picky", FrontDoor.resolve(isolation="gvisor", guard={"mode": "off"}))
    # A stronger mode's name with fewer detectors, or values let through, catches less.
    for guard in ({"mode": "block", "detectors": ["exact"]}, {"mode": "block", "allow": ["x" * 8]}):
        with pytest.raises(PolicyError, match="guard floor needs the default detectors"):
            await door.create("picky", FrontDoor.resolve(isolation="gvisor", guard=guard))
    await door.create("picky", FrontDoor.resolve(isolation="gvisor", guard={"mode": "block"}))


async def test_egress_beyond_the_ceiling_is_refused(door: FrontDoor) -> None:
    for net in (
        {"allow_out": ["evil.example"]},
        {"allow_out": ["pypi.org:8443"]},
        {"allow_out": ["*.pypi.org"]},
        {"internet_access": True},
        {"allow_tcp": ["github.com:2222"]},  # raw TCP: only within the ceiling's allow_tcp
        {"allow_tcp": ["db.example.com:5432"]},
        {"allow_out": ["github.com:22"]},  # the TCP ceiling opens no HTTP(S) either
    ):
        with pytest.raises(PolicyError, match="egress ceiling"):
            await door.create("picky", FrontDoor.resolve(isolation="gvisor", network=net))
    assert not door.engine.sessions
    ok = {
        "allow_out": ["pypi.org", "files.pythonhosted.org", "*.a.pythonhosted.org"],
        "allow_tcp": ["github.com:22"],
    }
    info = await door.create("picky", FrontDoor.resolve(isolation="gvisor", network=ok))
    with pytest.raises(PolicyError, match="egress ceiling"):
        await door.update_network("picky", info.sandbox_id, {"allow_out": ["evil.example"]})
    with pytest.raises(PolicyError, match="egress ceiling"):
        await door.update_network("picky", info.sandbox_id, {"allow_tcp": ["evil.example:22"]})
    # another tenant has no ceiling
    await door.create("t9", _cfg(network={"allow_out": ["evil.example"]}))


# ----------------------------------------------------------------------------- the file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[default]\nquota = 1\n", r"tenants.toml:2: default.quota: unknown key"),
        ("[default.quotas]\nsandboxes = -1\n", r":2: default.quotas.sandboxes: must be between"),
        ('[default.quotas]\nsandboxes = "3"\n', r"sandboxes: must be an integer, not string"),
        ("[default.quotas]\ncpus = -0.5\n", r"default.quotas.cpus: must be between"),
        ('[tenants.a]\nallowed_tiers = ["vm"]\n', r"tenants.a.allowed_tiers\[0\]: must be"),
        ("[tenants.a]\nallowed_tiers = []\n", r"at least one tier"),
        (
            '[tenants.a]\nallowed_tiers = ["gvisor"]\ndefault_tier = "container"\n',
            r"tenants.a.default_tier: must be one of the tenant's allowed_tiers",
        ),
        ('[tenants.a]\nguard_floor = "strict"\n', r"tenants.a.guard_floor: must be one of"),
        ('[tenants.a.egress]\nallow_out = ["*"]\n', r"tenants.a.egress.allow_out\[0\]"),
        ("[tenants.a.egress]\ninternet_access = 1\n", r"internet_access: must be a boolean"),
        ('[tenants.a.egress]\nallow_tcp = ["github.com"]\n', r"allow_tcp\[0\]: .*explicit port"),
        ("version = 2\n", r"version: must be 1"),
        ("[default\n", r"invalid TOML"),
    ],
)
async def test_bad_files_name_the_key(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_tenants(text, "tenants.toml")


async def test_tenants_inherit_from_default_and_the_example_parses() -> None:
    p = parse_tenants(POLICY)
    assert p.of("small").quotas == Quotas(sandboxes=1, memory_mb=1024, cpus=2.0)
    assert p.of("nobody").quotas == Quotas(sandboxes=2, memory_mb=1024, cpus=2.0)
    assert p.of("picky").allowed_tiers == ("gvisor", "microvm")
    example = Path(__file__).resolve().parent.parent / "examples" / "tenants.toml"
    assert load_tenants(example).default.quotas.sandboxes is not None


async def test_state_dir_file_is_read_and_a_named_missing_file_fails(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        load_tenants(tmp_path / "nope.toml")
    (tmp_path / "t.toml").write_text("[default.quotas]\nsandboxes = 4\n")
    assert load_tenants(tmp_path / "t.toml").default.quotas.sandboxes == 4


async def test_wire_mappings_of_a_quota_error() -> None:
    from connectrpc.code import Code

    from moat.server import rpc, wire

    exc = QuotaExceededError("at quota", retry_after=2.2)
    reply = wire.moat_error(exc)
    assert reply.status_code == 429 and reply.headers["retry-after"] == "3"
    assert reply.body == b'{"code":429,"message":"at quota"}'
    assert wire.moat_error(QuotaExceededError("x")).headers["retry-after"] == "1"
    assert rpc.connect_error(exc).code is Code.RESOURCE_EXHAUSTED
