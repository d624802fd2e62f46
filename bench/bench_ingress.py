"""Ingress benchmark (issue 10): a port inside a sandbox, reached through ``moat serve``.

    PYTHONPATH=src:bench .venv/bin/python bench/bench_ingress.py [--tier container] [--mb 100]
        [--requests 200]

The script starts its own ``moat serve`` (``bench_server.serving``), creates a sandbox through
the E2B SDK and starts Python's ``http.server`` inside it, serving a ``--mb`` MB file. Then,
in the same run:

- latency: median of ``--requests`` small GETs through ingress (``E2b-Sandbox-Port`` header
  form, one connection per request, as ingress forwards one request per upstream stream)
  against the same GET made from inside the sandbox (a loop in the sandbox timing its own
  requests to 127.0.0.1): the added latency (target <= 3 ms);
- throughput: the ``--mb`` MB download through ingress against the same download inside the
  sandbox (target >= 50%).

Prints medians, ranges and ratios; the host's load average goes with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from bench_server import serving
from e2b import Sandbox as E2BSandbox

INSIDE = r"""
import json, time, urllib.request
url = "http://127.0.0.1:8000/"
small, big = [], []
for _ in range(N):
    t = time.perf_counter()
    urllib.request.urlopen(url + "small.txt").read()
    small.append((time.perf_counter() - t) * 1000)
for _ in range(3):
    t = time.perf_counter()
    n = len(urllib.request.urlopen(url + "big.bin").read())
    big.append(n / (time.perf_counter() - t) / 1e6)
print(json.dumps({"small": small, "big": big}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tier", default="container")
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--requests", type=int, default=200)
    a = ap.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="moat-bench-ingress-") as tmp,
        serving(a.tier, None, Path(tmp)) as srv,
    ):
        sbx = E2BSandbox.create(api_key=srv.key, api_url=srv.url, sandbox_url=srv.url,
                                timeout=600)  # fmt: skip
        try:
            sbx.commands.run(
                f"mkdir -p ~/www && cd ~/www && echo hello > small.txt && "
                f"head -c {a.mb * 1_000_000} /dev/zero > big.bin"
            )
            sbx.commands.run("cd ~/www && python3 -m http.server 8000 --bind 127.0.0.1",
                             background=True)  # fmt: skip
            time.sleep(1.0)
            sbx.files.write(
                "/home/user/inside.py", INSIDE.replace("range(N)", f"range({a.requests})")
            )
            inside = json.loads(sbx.commands.run("python3 ~/inside.py", timeout=600).stdout)
            headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000",
                       "E2B-Traffic-Access-Token": sbx.traffic_access_token or ""}  # fmt: skip
            small: list[float] = []
            big: list[float] = []
            # One client (a fresh httpx client costs ~20 ms of TLS set-up by itself); the
            # connection to the server is kept, each request is a new stream into the sandbox.
            with httpx.Client(timeout=120) as client:
                for _ in range(a.requests + 5):
                    t = time.perf_counter()
                    r = client.get(srv.url + "/small.txt", headers=headers)
                    elapsed = (time.perf_counter() - t) * 1000
                    assert r.status_code == 200, r.text
                    small.append(elapsed)
                small = small[5:]
                for _ in range(3):
                    t = time.perf_counter()
                    n = 0
                    with client.stream("GET", srv.url + "/big.bin", headers=headers) as r:
                        for chunk in r.iter_bytes(1 << 20):
                            n += len(chunk)
                    big.append(n / (time.perf_counter() - t) / 1e6)
        finally:
            sbx.kill()
    li, lo = statistics.median(inside["small"]), statistics.median(small)
    ti, to = statistics.median(inside["big"]), statistics.median(big)
    print(f"tier {a.tier}; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rng = f"{min(small):.2f}-{max(small):.2f}"
    print(f"small GET, median of {a.requests}: inside the sandbox {li:.2f} ms, through ingress "
          f"{lo:.2f} ms (+{lo - li:.2f} ms, target <= 3; range {rng})")  # fmt: skip
    runs = f"{min(big):.0f}-{max(big):.0f}"
    print(f"{a.mb} MB download, median of 3: inside {ti:.0f} MB/s, through ingress {to:.0f} "
          f"MB/s, ratio {to / ti:.2f} (target >= 0.50; runs {runs})")  # fmt: skip


if __name__ == "__main__":
    main()
