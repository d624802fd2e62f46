"""Sandbox metrics (issue 10): samples read from the host's kernel, bounded, over every face.

The real-sandbox checks compare a busy sandbox with an idle one (the positive control: a
sampler that reported nothing, or the sandbox's own word, would not tell them apart) and
write a file the container tier's host-side disk figure must see.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox as E2BSandbox
from tests.server_support import new_key, serving, tenant_name

from moat import Sandbox
from moat.engine.metrics import RING_SIZE, MetricsRing, interval_s
from moat.errors import InvalidArgumentError, NotFoundError
from moat.model import Limits, SandboxMetrics

_MIB = 1 << 20


@pytest.fixture
def fast_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOAT_METRICS_INTERVAL_S", "0.3")


def _wait(sbx: Sandbox, n: int, timeout: float = 30) -> list[SandboxMetrics]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = sbx.get_metrics()
        if len(got) >= n:
            return got
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} samples after {timeout} s")


# -- the ring, with counters we control ------------------------------------------------------


def test_ring_computes_cpu_share_and_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    counters = {"cpu_ns": 0, "memory_bytes": 5 * _MIB, "memory_cache_bytes": _MIB}
    monkeypatch.setattr("moat.engine.metrics.time.monotonic", lambda: clock[0])
    ring = MetricsRing(Limits(cpus=1.5, memory_mb=256, disk_mb=64), lambda: dict(counters))
    assert ring.sample() is None  # the baseline only
    clock[0] += 2.0
    counters["cpu_ns"] += 2 * 10**9  # one CPU of two for 2 s: 50 %
    m = ring.sample()
    assert m is not None
    assert (m.cpu_count, m.cpu_used_pct) == (2, 50.0)
    assert (m.mem_used, m.mem_total, m.mem_cache) == (5 * _MIB, 256 * _MIB, _MIB)
    assert (m.disk_used, m.disk_total) == (None, 64 * _MIB)  # no host figure: none made up
    clock[0] += 1.0
    counters["cpu_ns"] -= 10**9  # an unreaped exit took its time away: never below zero
    m2 = ring.sample()
    assert m2 is not None and m2.cpu_used_pct == 0.0
    for _ in range(RING_SIZE + 50):
        clock[0] += 1.0
        ring.sample()
    assert len(ring.between()) == RING_SIZE
    later = ring.between(start=m2.timestamp + dt.timedelta(microseconds=1))
    assert m2 not in later and len(later) == RING_SIZE
    assert ring.between(end=m.timestamp - dt.timedelta(seconds=1)) == []


def test_ring_gives_nothing_for_a_gone_sandbox() -> None:
    ring = MetricsRing(Limits(), dict)
    assert ring.sample() is None and ring.between() == []


@pytest.mark.parametrize("raw", ["0", "nan", "x", "61", "-1"])
def test_bad_interval_is_refused(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("MOAT_METRICS_INTERVAL_S", raw)
    with pytest.raises(InvalidArgumentError, match="MOAT_METRICS_INTERVAL_S"):
        interval_s()


# -- real sandboxes ----------------------------------------------------------------------------


@pytest.mark.usefixtures("fast_sampling")
def test_busy_and_idle_sandboxes_differ(tier: str) -> None:
    with (
        Sandbox.create(isolation=tier, timeout=120) as busy,
        Sandbox.create(isolation=tier, timeout=120) as idle,
    ):
        _wait(busy, 2)
        _wait(idle, 2)
        t0 = dt.datetime.now(dt.UTC)
        # How much CPU the loop really got (the machine may be loaded: a share, not 100 %).
        r = busy.run_code(
            "import time\nt, c = time.time(), time.process_time()\n"
            "while time.time() - t < 3: pass\nprint(time.process_time() - c)"
        )
        used = float(r.logs.stdout[0])
        time.sleep(0.7)  # a sample after the loop ended
        hot = busy.get_metrics(start=t0)
        cold = idle.get_metrics(start=t0)
        assert hot and cold

        def cpu_seconds(samples: list[SandboxMetrics]) -> float:
            # each sample covers the interval since the one before it
            every = float(os.environ["MOAT_METRICS_INTERVAL_S"])
            return sum(m.cpu_used_pct / 100 * m.cpu_count * every for m in samples)

        # The host's counters saw the loop's CPU time (within sampling slack), and the idle
        # sandbox (the control) shows a small fraction of it.
        assert 0.5 * used <= cpu_seconds(hot) <= 1.5 * used + 0.5, (used, hot)
        assert cpu_seconds(cold) < 0.25 * used, (used, cold)
        for m in hot + cold:
            assert m.cpu_count == 1 and 0 <= m.cpu_used_pct <= 100
            assert m.mem_total == busy.get_info().limits.memory_mb * _MIB
            assert 0 < m.mem_used and 0 <= m.mem_cache
            assert m.disk_total > 0
        assert [m.timestamp for m in hot] == sorted(m.timestamp for m in hot)


@pytest.mark.usefixtures("fast_sampling")
def test_container_disk_figure_is_the_hosts_view() -> None:
    with Sandbox.create(isolation="container", timeout=120) as sbx:
        before = _wait(sbx, 1)[-1]
        assert before.disk_used is not None
        sbx.commands.run("head -c 8388608 /dev/zero > /home/user/blob && sync")
        time.sleep(1.0)
        after = sbx.get_metrics()[-1]
        assert after.disk_used is not None
        assert after.disk_used - before.disk_used >= 8 * _MIB
        assert after.disk_total >= sbx.get_info().limits.disk_mb * _MIB


@pytest.mark.usefixtures("fast_sampling")
@pytest.mark.parametrize("tier_name", ["gvisor", "microvm"])
def test_disk_inside_the_sandboxs_memory_is_not_made_up(tier_name: str) -> None:
    with Sandbox.create(isolation=tier_name, timeout=120) as sbx:
        m = _wait(sbx, 1)[-1]
        assert m.disk_used is None  # the host can't see it; moat doesn't take the guest's word
        assert m.disk_total == sbx.get_info().limits.disk_mb * _MIB
        assert m.mem_used > 0


def test_metrics_of_an_ended_sandbox_or_bad_range() -> None:
    sbx = Sandbox.create(isolation="container", timeout=60)
    with pytest.raises(InvalidArgumentError, match="timezone-aware"):
        sbx.get_metrics(start=dt.datetime(2026, 1, 1))
    sbx.kill()
    with pytest.raises(NotFoundError):
        sbx.get_metrics()


# -- over `moat serve`, with the unmodified e2b SDK ---------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    saved = os.environ.get("MOAT_METRICS_INTERVAL_S")
    os.environ["MOAT_METRICS_INTERVAL_S"] = "0.5"  # the server inherits it
    try:
        with serving(Path(tmp_path_factory.mktemp("serve-metrics")) / "server.log") as srv:
            yield srv.url
    finally:
        if saved is None:
            os.environ.pop("MOAT_METRICS_INTERVAL_S", None)
        else:
            os.environ["MOAT_METRICS_INTERVAL_S"] = saved


def test_e2b_sdk_gets_metrics_in_range_and_tenants_are_separate(server: str) -> None:
    key, other = new_key(tenant_name("metrics")), new_key(tenant_name("metrics-other"))
    t0 = dt.datetime.now(dt.UTC)
    sbx = E2BSandbox.create(api_key=key, timeout=60)
    try:
        got = []
        for _ in range(60):
            got = sbx.get_metrics(start=t0, end=dt.datetime.now(dt.UTC))
            if got:
                break
            time.sleep(0.25)
        assert got, "no samples"
        m = got[0]
        assert m.cpu_count == 1 and m.mem_total > 0 and m.mem_used > 0
        assert m.disk_used is not None and m.disk_total > 0  # the container tier
        assert t0.timestamp() - 1 <= m.timestamp.timestamp()
        before = sbx.get_metrics(
            start=t0 - dt.timedelta(hours=1), end=t0 - dt.timedelta(minutes=30)
        )
        assert before == []
        # Another tenant's key: exactly like an unknown id (invariant 11).
        replies = [
            httpx.get(f"{server}/sandboxes/{sid}/metrics", headers={"X-API-Key": other})
            for sid in (sbx.sandbox_id, "nosuchsandbox")
        ]
        assert [r.status_code for r in replies] == [404, 404]
        shown = [r.json()["message"] for r in replies]
        assert shown[0].replace(sbx.sandbox_id, "X") == shown[1].replace("nosuchsandbox", "X")
        bad = httpx.get(
            f"{server}/sandboxes/{sbx.sandbox_id}/metrics?start=yesterday",
            headers={"X-API-Key": key},
        )
        assert bad.status_code == 400 and "unix time" in bad.json()["message"]
        far = httpx.get(
            f"{server}/sandboxes/{sbx.sandbox_id}/metrics?end=999999999999",
            headers={"X-API-Key": key},
        )  # past year 9999 (fromtimestamp would raise): a 400, never a 500
        assert far.status_code == 400 and "unix time" in far.json()["message"]
    finally:
        sbx.kill()


def test_moat_sdk_over_http_and_moat_ps(server: str) -> None:
    key = new_key(tenant_name("ps"))
    with Sandbox.create(api_url=server, api_key=key, timeout=60) as sbx:
        samples = _wait(sbx, 1)
        assert samples[0].mem_used > 0 and samples[0].disk_used is not None
        env = {**os.environ, "MOAT_API_URL": server, "MOAT_API_KEY": key}
        out = subprocess.run(
            [sys.executable, "-m", "moat.cli", "ps", "--json"],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
        # its stderr in the message (CI once saw it die with SIGABRT, and nothing more)
        assert out.returncode == 0, (out.returncode, out.stderr[-4000:])
        (row,) = json.loads(out.stdout)
        assert row["sandbox_id"] == sbx.sandbox_id and row["tier"] == "container"
        assert row["mem_used"] > 0 and row["age_s"] >= 0 and row["cpu_pct"] is not None
        table = subprocess.run(
            [sys.executable, "-m", "moat.cli", "ps"],
            capture_output=True, text=True, timeout=60, env=env, check=True,
        ).stdout  # fmt: skip
        assert sbx.sandbox_id in table and "container" in table and "MiB" in table
    # Another tenant's key lists nothing of it.
    env = {**os.environ, "MOAT_API_URL": server, "MOAT_API_KEY": new_key(tenant_name("ps2"))}
    cmd = [sys.executable, "-m", "moat.cli", "ps", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=True)
    assert json.loads(out.stdout) == []
