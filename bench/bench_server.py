"""``moat serve`` benchmark: the E2B Python SDK against a live server, beside the embedded SDK.

    .venv/bin/python bench/bench_server.py [--runs 10] [--tiers container,gvisor,microvm]
        [--concurrent 50] [--duration 60] [--sustain 20] [--pool container=1] [--only-sustain]
        [--only-warm]

The script starts its own ``moat serve`` on 127.0.0.1 (one per tier: ``--tier``), makes a key,
and measures, each beside the embedded SDK (``moat.Sandbox``) in this same process:

- create -> first ``run_code("1+1")`` result per tier (E2B ``e2b-code-interpreter`` vs
  embedded, runs interleaved so both see the same load), and through moat's own HTTP
  transport where it exists (``moat_transport_first_result``, a slot until it is built);
- warm ``run_code("1+1")`` and ``commands.run("true")`` round trips (target: <= 2 ms added);
- sustained creates per second on the container tier (create -> kill by ``--workers`` clients
  for ``--sustain`` seconds, each way; target >= 20/s), with the warm pool as ``--pool`` sets
  it (the embedded pool is per event loop: a fresh one at its resting size for this part);
- ``--concurrent`` sandboxes each running code for ``--duration`` seconds (``--think`` between
  calls): failures (target 0) and p50/p99 of their round trips;
- server memory per idle sandbox: the RSS of the serve process before and after
  ``--concurrent`` idle sandboxes.

Prints medians and ranges, then a summary table. The host's load average is printed: on a
shared machine every figure moves with it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from e2b_code_interpreter import AsyncSandbox as E2BAsyncSandbox
from e2b_code_interpreter import Sandbox as E2BSandbox

from moat import AsyncSandbox, Sandbox

MOAT = [sys.executable, "-m", "moat.cli"]

# -- a server of our own --------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    key: str
    log: Path

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def serving(tier: str, pool: str | None, workdir: Path) -> Iterator[Server]:
    """``moat serve --tier TIER`` on loopback with its own audit store, and a fresh key."""
    env = dict(os.environ)
    env["MOAT_AUDIT_DB"] = str(workdir / f"audit-{tier}.db")
    if pool is not None:
        env["MOAT_WARM_POOL"] = pool
    key = subprocess.run(
        [*MOAT, "keys", "create", "--tenant", "bench-" + secrets.token_hex(4)],
        capture_output=True, text=True, timeout=60, check=True, env=env,
    ).stdout.splitlines()[-1]  # fmt: skip
    port = _free_port()
    log = workdir / f"serve-{tier}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*MOAT, "serve", "--host", "127.0.0.1", "--port", str(port), "--tier", tier],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    srv = Server(proc, f"http://127.0.0.1:{port}", key, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(srv.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moat serve did not start: " + log.read_text()[-2000:])
            time.sleep(0.2)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def e2b_create(srv: Server, timeout: int = 300) -> E2BSandbox:
    return E2BSandbox.create(api_key=srv.key, api_url=srv.url, sandbox_url=srv.url, timeout=timeout)


async def e2b_acreate(srv: Server, timeout: int = 300) -> E2BAsyncSandbox:
    return await E2BAsyncSandbox.create(
        api_key=srv.key, api_url=srv.url, sandbox_url=srv.url, timeout=timeout
    )


# -- figures --------------------------------------------------------------------------------


def ms(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    return (
        f"median {statistics.median(xs) * 1000:8.2f} ms  "
        f"range {min(xs) * 1000:.1f}-{max(xs) * 1000:.1f} ms  (n={len(xs)})"
    )


def med_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000 if xs else float("nan")


def pct_ms(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] * 1000


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- measurements ---------------------------------------------------------------------------


def first_result(srv: Server, tier: str, runs: int) -> tuple[list[float], list[float]]:
    """create -> first run_code('1+1') result: E2B SDK over the server, embedded; A-B-A."""
    served: list[float] = []
    embedded: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s = e2b_create(srv, timeout=120)
        assert s.run_code("1+1").text == "2"
        served.append(time.perf_counter() - t0)
        s.kill()
        t0 = time.perf_counter()
        e = Sandbox.create(isolation=tier, timeout=120)
        assert e.run_code("1+1").text == "2"
        embedded.append(time.perf_counter() - t0)
        e.kill()
        time.sleep(0.2)  # both pools refill between two creates
    return served, embedded


def moat_transport_first_result(srv: Server, tier: str, runs: int) -> list[float] | None:
    """SLOT for moat's own HTTP transport (``moat.sdk.transport.http``, built by another
    helper): create -> first run_code('1+1') through ``moat.Sandbox`` pointed at the server.
    Returns None while the transport does not exist, so the table says "not built"."""
    try:
        import moat.sdk.transport.http  # noqa: F401  (only whether it exists)
    except ImportError:
        return None
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s = Sandbox.create(isolation=tier, timeout=120, api_url=srv.url, api_key=srv.key)  # type: ignore[call-arg]
        assert s.run_code("1+1").text == "2"
        out.append(time.perf_counter() - t0)
        s.kill()
    return out


def round_trips(srv: Server, tier: str, n: int) -> dict[str, list[float]]:
    """Warm run_code('1+1') and commands.run('true'), both ways, interleaved; and a bare
    HTTP client's POST /execute (what the server adds, without the SDK's own cost)."""
    names = ("srv_code", "raw_code", "emb_code", "srv_cmd", "emb_cmd")
    out: dict[str, list[float]] = {k: [] for k in names}
    s = e2b_create(srv)
    e = Sandbox.create(isolation=tier, timeout=300)
    raw = httpx.Client(base_url=srv.url, timeout=60, trust_env=False)
    headers = {
        "E2b-Sandbox-Id": s.sandbox_id,
        "E2b-Sandbox-Port": "49999",
        "X-Access-Token": str(s._envd_access_token),
        "E2B-Traffic-Access-Token": s.traffic_access_token or "",
    }

    def bare() -> None:
        r = raw.post("/execute", json={"code": "1+1"}, headers=headers)
        assert r.status_code == 200 and b'"text":"2"' in r.content.replace(b" ", b"")

    try:
        for _ in range(3):  # warm both (first calls import, open connections)
            s.run_code("1+1"), e.run_code("1+1"), s.commands.run("true"), e.commands.run("true")
            bare()
        for _ in range(n):
            out["srv_code"].append(timed(lambda: s.run_code("1+1")))
            out["raw_code"].append(timed(bare))
            out["emb_code"].append(timed(lambda: e.run_code("1+1")))
            out["srv_cmd"].append(timed(lambda: s.commands.run("true")))
            out["emb_cmd"].append(timed(lambda: e.commands.run("true")))
    finally:
        raw.close()
        s.kill()
        e.kill()
    return out


async def sustained_creates(
    create: Callable[[], Awaitable[Any]], seconds: float, workers: int
) -> tuple[int, float, int]:
    """create -> kill by ``workers`` clients for ``seconds``: (creates, elapsed, failures)."""
    done = failed = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, failed
        while time.perf_counter() < stop:
            try:
                s = await create()
            except Exception as exc:  # noqa: BLE001  (any failure counts; the first is shown)
                failed += 1
                if failed == 1:
                    print(f"  sustained create failed: {exc!r}"[:300])
                continue
            done += 1
            await s.kill()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return done, time.perf_counter() - t0, failed


async def concurrent_load(
    srv: Server, n: int, seconds: float, think: float
) -> tuple[list[float], int, int, float]:
    """``n`` sandboxes each running code for ``seconds``: (round trips, failures,
    RSS KiB before the sandboxes, RSS KiB with them idle)."""
    await asyncio.sleep(2)  # the pool settles
    rss0 = srv.rss_kib()
    gate = asyncio.Semaphore(8)

    async def make() -> E2BAsyncSandbox:
        async with gate:
            return await e2b_acreate(srv, timeout=int(seconds) + 600)

    sandboxes = await asyncio.gather(*(make() for _ in range(n)))
    await asyncio.sleep(3)  # idle: what the server holds per sandbox at rest
    rss_idle = srv.rss_kib()
    trips: list[float] = []
    failures = 0

    async def run(s: E2BAsyncSandbox, i: int) -> None:
        nonlocal failures
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                ex = await s.run_code(f"sum(range({i}, {i} + 1000))")
                if ex.error is not None or ex.text != str(sum(range(i, i + 1000))):
                    failures += 1
                else:
                    trips.append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001  (any failure counts; the first is shown)
                failures += 1
                if failures == 1:
                    print(f"  concurrent run failed: {exc!r}"[:300])
            if think:
                await asyncio.sleep(think)

    try:
        await asyncio.gather(*(run(s, i) for i, s in enumerate(sandboxes)))
    finally:
        await asyncio.gather(*(s.kill() for s in sandboxes), return_exceptions=True)
    return trips, failures, rss0, rss_idle


# -- main -----------------------------------------------------------------------------------

Row = tuple[str, str, str, str]


def vs(
    name: str, served: list[float], embedded: list[float], note: str = "", f: str = ".1f"
) -> Row:
    added = med_ms(served) - med_ms(embedded)
    return (
        name,
        f"{med_ms(served):{f}}",
        f"{med_ms(embedded):{f}}",
        f"{added:+{f}} {note}".rstrip(),
    )


def bench_first_results(srv: Server, tier: str, runs: int) -> list[Row]:
    served, embedded = first_result(srv, tier, runs)
    print(f"[{tier}] create -> first result, E2B SDK  {ms(served)}")
    print(f"[{tier}] create -> first result, embedded {ms(embedded)}")
    rows = [vs(f"{tier}: create -> first result", served, embedded)]
    mine = moat_transport_first_result(srv, tier, runs)
    if mine is None:
        print(f"[{tier}] create -> first result, moat HTTP transport: not built yet")
        rows.append((f"{tier}: same, moat HTTP transport", "not built", "", ""))
    else:
        print(f"[{tier}] create -> first result, moat HTTP transport {ms(mine)}")
        rows.append(vs(f"{tier}: same, moat HTTP transport", mine, embedded))
    return rows


def bench_warm(srv: Server, tier: str, trips: int) -> list[Row]:
    """Warm round trips: run_code and commands.run both ways, and a bare POST /execute."""
    rows = []
    rt = round_trips(srv, tier, trips)
    for what, a, b in (
        ("run_code('1+1')", "srv_code", "emb_code"),
        ("commands.run('true')", "srv_cmd", "emb_cmd"),
    ):
        print(f"[{tier}] warm {what}, E2B SDK  {ms(rt[a])}")
        print(f"[{tier}] warm {what}, embedded {ms(rt[b])}")
        rows.append(vs(f"{tier}: warm {what}", rt[a], rt[b], "(target <= 2)", ".2f"))
    print(f"[{tier}] warm POST /execute '1+1', bare httpx {ms(rt['raw_code'])}")
    rows.append(vs(f"{tier}: warm POST /execute, bare httpx", rt["raw_code"], rt["emb_code"],
                   "(the server's share)", ".2f"))  # fmt: skip
    return rows


def bench_container(srv: Server, args: argparse.Namespace) -> list[Row]:
    """Round trips, concurrent load with the server's memory, sustained creates."""
    tier = "container"
    rows = bench_warm(srv, tier, args.trips)
    n, seconds = args.concurrent, args.duration
    trips, failures, rss0, rss_idle = asyncio.run(concurrent_load(srv, n, seconds, args.think))
    p50, p99 = pct_ms(trips, 50), pct_ms(trips, 99)
    print(
        f"[{tier}] {n} sandboxes x {seconds:g} s: {len(trips)} round trips, {failures} "
        f"failures, p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )
    per = (rss_idle - rss0) / n / 1024
    print(
        f"[{tier}] server RSS {rss0 / 1024:.1f} MiB -> {rss_idle / 1024:.1f} MiB with {n} "
        f"idle sandboxes: {per:.2f} MiB each"
    )
    rows.append((f"{tier}: {n} x {seconds:g}s p50 / p99", f"{p50:.1f} / {p99:.1f}", "",
                 f"{failures} failures of {len(trips) + failures}"))  # fmt: skip
    rows.append((f"{tier}: server RSS per idle sandbox", f"{per:.2f} MiB", "", ""))
    # after a pause: the load's kills are reaped in the background
    time.sleep(5)
    return rows + bench_sustained(srv, args)


def bench_sustained(srv: Server, args: argparse.Namespace) -> list[Row]:
    """Sustained creates, interleaved halves (server, embedded, embedded, server): a shared
    host's load drifts."""
    tier, rows = "container", []
    ways = {
        "E2B SDK": lambda: e2b_acreate(srv, timeout=60),
        "embedded": lambda: AsyncSandbox.create(isolation=tier, timeout=60),
    }
    totals: dict[str, tuple[int, float, int]] = {way: (0, 0.0, 0) for way in ways}
    for way in ("E2B SDK", "embedded", "embedded", "E2B SDK"):
        made, took, bad = asyncio.run(sustained_creates(ways[way], args.sustain / 2, args.workers))
        n0, t0, b0 = totals[way]
        totals[way] = (n0 + made, t0 + took, b0 + bad)
    rates = []
    for way, (made, took, bad) in totals.items():
        rates.append(made / took)
        print(
            f"[{tier}] sustained creates, {way}: {made} in {took:.1f} s = {made / took:.1f}/s "
            f"({args.workers} clients, {bad} failed)"
        )
    rows.append((f"{tier}: sustained creates/s", f"{rates[0]:.1f}", f"{rates[1]:.1f}",
                 "target >= 20"))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10, help="creates per tier and way")
    ap.add_argument("--trips", type=int, default=50, help="warm round trips per way")
    ap.add_argument("--tiers", default="container,gvisor,microvm")
    ap.add_argument("--pool", default=None, help="MOAT_WARM_POOL for both (default: moat's)")
    ap.add_argument("--sustain", type=float, default=20.0, help="seconds of sustained creates")
    ap.add_argument("--workers", type=int, default=4, help="clients creating at once")
    ap.add_argument("--concurrent", type=int, default=50)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of concurrent load")
    ap.add_argument("--think", type=float, default=0.1, help="seconds between two calls")
    ap.add_argument(
        "--only-sustain", action="store_true",
        help="the container tier's sustained creates only (bench_creates.py adds CPU per cycle)",
    )  # fmt: skip
    ap.add_argument(
        "--only-warm", action="store_true",
        help="the container tier's warm round trips only (run_code, commands.run, bare POST)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.pool is not None:
        os.environ["MOAT_WARM_POOL"] = args.pool
    load0 = os.getloadavg()
    print(
        f"host: {os.cpu_count()} cpus, load average {load0[0]:.1f} {load0[1]:.1f} "
        f"{load0[2]:.1f} (shared machine: other work runs beside this); warm pool "
        f"{os.environ.get('MOAT_WARM_POOL', 'default (container=1)')}"
    )
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="moat-bench-server-"))
    for tier in [t for t in args.tiers.split(",") if t]:
        with Sandbox.create(isolation=tier) as s:  # warm the embedded path (page cache, probes)
            s.run_code("1+1")
        with serving(tier, args.pool, work) as srv:
            e2b_create(srv, timeout=60).kill()  # and the served one
            if args.only_sustain:
                rows += bench_sustained(srv, args) if tier == "container" else []
                continue
            if args.only_warm:
                rows += bench_warm(srv, tier, args.trips)
                continue
            rows += bench_first_results(srv, tier, args.runs)
            if tier == "container":
                rows += bench_container(srv, args)
    load1 = os.getloadavg()
    print(
        f"\nsummary (ms unless named; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end)"
    )
    print(f"{'measure':<44}{'server':>16}{'embedded':>10}  note")
    for name, served, embedded, note in rows:
        print(f"{name:<44}{served:>16}{embedded:>10}  {note}")


if __name__ == "__main__":
    main()
