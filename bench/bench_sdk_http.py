"""moat's SDK through its HTTP transport to a live ``moat serve``, beside the embedded SDK in
the same run (container tier).

    .venv/bin/python bench/bench_sdk_http.py [--runs 15] [--warm 200] [--url URL --key KEY]

Without ``--url`` it starts ``moat serve`` on a free loopback port (same warm-pool setting as
the embedded engine: ``MOAT_WARM_POOL``) and makes a key. Prints medians and ranges of:
create -> first ``run_code("1+1")`` result, warm ``run_code("1+1")`` round trips (target:
<= 2 ms added over embedded, issue 16), and ``commands.run("true")``. Embedded and HTTP runs
alternate, so both see the same load on a shared host. ``measure()`` is the function a server
benchmark can call with its own server.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from moat import Sandbox

MOAT = [sys.executable, "-m", "moat.cli"]


def ms(xs: list[float]) -> str:
    return (
        f"median {statistics.median(xs) * 1000:8.2f} ms  "
        f"range {min(xs) * 1000:.2f}-{max(xs) * 1000:.2f} ms  (n={len(xs)})"
    )


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _create_first(**kw: Any) -> float:
    t0 = time.perf_counter()
    s = Sandbox.create(isolation="container", timeout=120, **kw)
    try:
        assert s.run_code("1+1").text == "2"
        return time.perf_counter() - t0
    finally:
        s.kill()


def measure(url: str, key: str, runs: int = 15, warm: int = 200) -> dict[str, list[float]]:
    """Seconds per operation, embedded (``local_*``) and through ``url`` (``http_*``)."""
    remote = {"api_url": url, "api_key": key}
    out: dict[str, list[float]] = {
        k: [] for k in ("local_create", "http_create", "local_code", "http_code",
                        "local_cmd", "http_cmd")
    }  # fmt: skip
    _create_first(), _create_first(**remote)  # warm caches and connections
    for _ in range(runs):
        out["local_create"].append(_create_first())
        out["http_create"].append(_create_first(**remote))
    with (
        Sandbox.create(isolation="container", timeout=600) as local,
        Sandbox.create(isolation="container", timeout=600, **remote) as http,
    ):
        for s in (local, http):
            s.run_code("1+1"), s.commands.run("true")
        for _ in range(warm):
            out["local_code"].append(_timed(lambda: local.run_code("1+1")))
            out["http_code"].append(_timed(lambda: http.run_code("1+1")))
        for _ in range(max(warm // 4, 5)):
            out["local_cmd"].append(_timed(lambda: local.commands.run("true")))
            out["http_cmd"].append(_timed(lambda: http.commands.run("true")))
    return out


def _serve() -> tuple[subprocess.Popen[bytes], str, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    key = subprocess.run(
        [*MOAT, "keys", "create", "--tenant", f"bench-{os.getpid()}"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()[-1]  # fmt: skip
    proc = subprocess.Popen(
        [*MOAT, "serve", "--host", "127.0.0.1", "--port", str(port), "--tier", "container"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, key
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("moat serve did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warm", type=int, default=200)
    ap.add_argument("--url")
    ap.add_argument("--key")
    args = ap.parse_args()
    proc = None
    if args.url:
        url, key = args.url, args.key or os.environ.get("MOAT_API_KEY", "")
    else:
        proc, url, key = _serve()
    try:
        r = measure(url, key, args.runs, args.warm)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(f"pool: MOAT_WARM_POOL={os.environ.get('MOAT_WARM_POOL', '(default)')}")
    for what, name in (("create", "create -> first result"), ("code", "warm run_code('1+1')"),
                       ("cmd", "commands.run('true')")):  # fmt: skip
        local, http = r[f"local_{what}"], r[f"http_{what}"]
        added = (statistics.median(http) - statistics.median(local)) * 1000
        print(f"{name}")
        print(f"  embedded  {ms(local)}")
        print(f"  http      {ms(http)}   added {added:+.2f} ms")


if __name__ == "__main__":
    main()
