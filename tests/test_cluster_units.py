"""The cluster's pure parts (issue 13), without Ray: advertised resources, bundles, errors
across the node boundary, and what the wire answers for a lost sandbox or a full cluster."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from moat.cluster.node import pack_error, unpack_error
from moat.cluster.paused import MARKER, ClusterPaused, Held, read_store_id
from moat.cluster.raycfg import HEALTH, ray_env, start_argv
from moat.cluster.resources import (
    KVM,
    NODE,
    PAUSED,
    SLOT,
    advertise,
    bundle_for,
    tier_resource,
    tiers_of,
)
from moat.engine.resolve import resolve
from moat.errors import (
    CapacityError,
    LeakBlockedError,
    QuotaExceededError,
    SandboxDiedError,
    SandboxError,
    SandboxLostError,
)
from moat.server import wire


def test_only_tiers_whose_probe_passed_are_advertised() -> None:
    res = advertise({"container": None, "gvisor": "runsc missing", "microvm": None}, 8)
    assert res == {NODE: 1.0, SLOT: 8.0, tier_resource("container"): 8.0,
                   tier_resource("microvm"): 8.0}  # fmt: skip
    assert tiers_of(res) == ["container", "microvm"]
    assert KVM not in res  # not claimed unless usable
    assert advertise({"microvm": None}, 2, kvm=True)[KVM] == 2.0
    assert KVM not in advertise({"microvm": "no kernel"}, 2, kvm=True)  # no tier, no KVM flag
    assert tiers_of(advertise({}, 1)) == []  # an unprobed tier is not advertised
    with pytest.raises(ValueError, match="slot"):
        advertise({"container": None}, 0)


def test_a_bundle_is_a_slot_its_tier_and_its_memory() -> None:
    assert bundle_for("gvisor", 512) == {
        SLOT: 1.0, tier_resource("gvisor"): 1.0, "memory": float(512 << 20)
    }  # fmt: skip
    assert bundle_for("container", 1)["memory"] == float(32 << 20)  # never below the floor
    assert "CPU" not in bundle_for("container", 512)  # CPU limits are cgroup caps
    with pytest.raises(ValueError):
        tier_resource("docker")


def test_the_paused_store_is_advertised_and_asked_for_by_a_resume_only() -> None:
    assert advertise({"container": None}, 4, paused=True)[PAUSED] == 4.0
    assert PAUSED not in advertise({"container": None}, 4)
    assert bundle_for("container", 64, paused=True)[PAUSED] == 1.0
    assert PAUSED not in bundle_for("container", 64)  # a create goes anywhere


def _pause_into(store: ClusterPaused, sid: str, tenant: str) -> None:
    """A committed paused state as a node's engine writes it (moat.store.paused)."""
    pending = store.store.begin(sid)
    record: dict[str, Any] = {
        "sandbox_id": sid, "tenant": tenant, "tier": "container",
        "config": resolve(isolation="container").to_dict(), "network": None, "metadata": {"k": "v"},
        "max_output": 1024, "started_at": "2026-12-01T10:00:00+00:00",
        "paused_at": "2026-12-01T10:05:00+00:00", "memory": False, "secret_names": [],
        "sensitive": 0, "face": {},
    }  # fmt: skip
    (pending.checkpoint / "fs.tar.gz").write_bytes(b"x" * 100)
    store.store.commit(pending, record)


def test_the_servers_paused_view_keeps_tenants_apart_and_deletes(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    store = ClusterPaused(root)
    assert read_store_id(root) == store.store_id  # what a node reads: the same store
    assert ClusterPaused(root).store_id == store.store_id  # one id per store, kept
    assert read_store_id(tmp_path / "elsewhere") is None  # a node without it: no id
    _pause_into(store, "sbx-a1", "t-a")
    assert ClusterPaused(root).find("t-a", "sbx-a1") is not None  # loaded from disk
    assert store.find("t-b", "sbx-a1") is None  # invariant 11: another tenant's is unknown
    assert store.known("t-a", "sbx-a1") and not store.known("t-b", "sbx-a1")
    assert store.usage("t-a") >= 100 and store.usage("t-b") == 0
    entry = store.find("t-a", "sbx-a1")
    assert entry is not None and entry.info.state == "paused" and entry.info.metadata == {"k": "v"}
    store.add(entry, Held({"S": "v"}, ["x"], {"template_id": "base"}))
    assert entry.record["face"] == {"template_id": "base"}  # the face's names, kept
    assert store.delete("sbx-a1") is True
    assert not (root / "sbx-a1").exists() and store.find("t-a", "sbx-a1") is None
    assert "sbx-a1" not in store.held  # nothing held for a deleted one
    assert (root / MARKER).is_file()  # the store's scan leaves the marker alone
    assert ClusterPaused(root).loaded() == {}


def test_errors_cross_the_node_boundary_with_their_fields_and_no_host_detail() -> None:
    exc = unpack_error(pack_error(LeakBlockedError(["aws_key"], "stdout")))
    assert isinstance(exc, LeakBlockedError)
    assert (exc.labels, exc.channel) == (["aws_key"], "stdout")
    assert exc.__traceback__ is None
    quota = unpack_error(pack_error(QuotaExceededError("at quota", retry_after=3.0)))
    assert isinstance(quota, QuotaExceededError) and quota.retry_after == 3.0
    unknown = unpack_error(pack_error(QuotaExceededError("at quota")))
    assert isinstance(unknown, QuotaExceededError) and unknown.retry_after is None
    # a foreign error (a host path in its message) crosses as a bare, safe SandboxError
    other = unpack_error(pack_error(OSError("/var/lib/moat/secret: permission denied")))
    assert type(other) is SandboxError and "/var/lib" not in str(other)
    # a forged class name never instantiates anything but a moat error
    forged = unpack_error(("SystemExit", "bye", {}))
    assert type(forged) is SandboxError


def test_a_lost_sandbox_is_the_502_was_not_found_shape() -> None:
    exc = SandboxLostError("sandbox sbx-1 was not found: its cluster node was lost")
    assert isinstance(exc, SandboxDiedError)
    resp = wire.moat_error(exc)
    assert resp.status_code == 502
    assert "was not found" in json.loads(bytes(resp.body))["message"]  # what the SDKs key on


def test_a_full_cluster_is_a_retryable_503() -> None:
    resp = wire.moat_error(CapacityError("no cluster node has room", retry_after=4.2))
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "5"
    assert "should-retry" not in resp.headers  # the SDKs retry it with backoff


def test_ray_runs_without_usage_stats_and_with_tuned_health_checks() -> None:
    assert ray_env({})["RAY_USAGE_STATS_ENABLED"] == "0"
    head = start_argv(head=True, port=6379)
    assert "--disable-usage-stats" in head and "--include-dashboard=false" in head
    config = next(a for a in head if a.startswith("--system-config="))
    assert json.loads(config.split("=", 1)[1]) == dict(HEALTH)
    period, threshold = HEALTH["health_check_period_ms"], HEALTH["health_check_failure_threshold"]
    assert period * threshold <= 4000  # node loss declared well inside issue 13's 5 s
    node = start_argv(head=False, address="10.0.0.1:6379", resources={NODE: 1.0})
    assert "--address=10.0.0.1:6379" in node and not any("system-config" in a for a in node)
    with pytest.raises(ValueError):
        start_argv(head=False)


def test_a_local_head_keeps_ray_on_loopback_or_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray reads its one-machine switch at import: set before, or fail closed (a head that
    would listen on every interface is not started)."""
    import types

    from moat.cluster.launch import LOCAL_ONLY_ENV, keep_ray_on_loopback
    from moat.errors import IsolationUnavailableError

    fake = types.ModuleType("ray._private.ray_constants")
    fake.ENABLE_RAY_CLUSTER = True  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray._private.ray_constants", fake)
    monkeypatch.delenv(LOCAL_ONLY_ENV, raising=False)
    with pytest.raises(IsolationUnavailableError, match="before Ray is imported"):
        keep_ray_on_loopback()
    assert LOCAL_ONLY_ENV not in os.environ
    fake.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]
    keep_ray_on_loopback()
    assert os.environ[LOCAL_ONLY_ENV] == "0"
