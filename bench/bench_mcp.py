"""MCP benchmark (issue 14): `moat mcp` over stdio through the official MCP client, beside
the embedded SDK's same call in the same run.

    PYTHONPATH=src:. .venv/bin/python bench/bench_mcp.py [--runs 10]

Prints medians and ranges: the server's spawn + initialize, a one-shot ``run_code`` (a fresh
container sandbox per call, killed after), ``run_code`` in a session's sandbox, and the
embedded SDK's ``run_code`` in one sandbox as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from mcp import Client
from tests.mcp_support import new_sandbox, ok, stdio_params

from moat import Sandbox


def _line(name: str, xs: list[float]) -> str:
    ms = [x * 1000 for x in xs]
    return f"{name}: median {statistics.median(ms):.1f} ms (range {min(ms):.1f}-{max(ms):.1f})"


async def main(runs: int) -> None:
    t = time.monotonic()
    async with Client(stdio_params("--isolation", "container")) as c:
        print(_line("spawn + initialize", [time.monotonic() - t]))
        one, session = [], []
        for _ in range(runs):
            t = time.monotonic()
            await ok(c, "run_code", code="6*7")
            one.append(time.monotonic() - t)
        sid = await new_sandbox(c)
        for _ in range(runs):
            t = time.monotonic()
            await ok(c, "run_code", sandbox=sid, code="6*7")
            session.append(time.monotonic() - t)
    embedded = []
    with Sandbox.create(isolation="container") as sbx:
        for _ in range(runs):
            t = time.monotonic()
            sbx.run_code("6*7")
            embedded.append(time.monotonic() - t)
    print(f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(_line("one-shot run_code (fresh sandbox)", one))
    print(_line("run_code in a session's sandbox", session))
    print(_line("embedded SDK run_code (baseline)", embedded))
    print(f"ratio session/embedded: {statistics.median(session) / statistics.median(embedded):.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    asyncio.run(main(ap.parse_args().runs))
