"""Directory watch latency: a write to the SDK's on_event callback.

    .venv/bin/python bench/bench_watch.py [--tier container] [--runs 50]

Two figures. In-sandbox: a program in the sandbox writes a file every 20 ms and prints the
wall-clock time just before each write; the host notes when each file's ``create`` event
reaches ``on_event`` (the container and gVisor tiers share the host's clock; a microVM guest's
clock drifts by seconds, so that figure means nothing there). Host-side, every tier: from
the start of a ``files.write`` call to its file's ``create`` at ``on_event``, beside the
write's own round trip. Medians and p90 in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

from moat import Sandbox
from moat.model import FilesystemEvent

_WRITER = """
import time
for i in range({runs}):
    time.sleep(0.02)
    print(i, repr(time.time()), flush=True)
    open(f"/home/user/bw/f{{i}}", "w").close()
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tier", default="container")
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    seen: dict[str, float] = {}

    def on_event(e: FilesystemEvent) -> None:
        if e.type == "create":
            seen.setdefault(e.name, time.time())

    with Sandbox.create(isolation=args.tier, timeout=300) as s:
        s.files.make_dir("bw")
        s.files.write("/tmp/writer.py", _WRITER.format(runs=args.runs))
        handle = s.files.watch_dir("bw", on_event)
        out = s.commands.run("python3 /tmp/writer.py", timeout=120).stdout
        deadline = time.monotonic() + 5
        while len(seen) < args.runs and time.monotonic() < deadline:
            time.sleep(0.05)
        host: list[float] = []
        trip: list[float] = []
        for i in range(args.runs // 2):
            t0 = time.time()
            s.files.write(f"bw/h{i}", "")
            trip.append((time.time() - t0) * 1000)
            while f"h{i}" not in seen and time.time() - t0 < 10:
                time.sleep(0.001)
            host.append((seen[f"h{i}"] - t0) * 1000)
        handle.stop()
    host.sort()
    print(
        f"{args.tier}: files.write call -> on_event: median {statistics.median(host):.2f} ms, "
        f"p90 {host[int(len(host) * 0.9)]:.2f} ms (the write's round trip: median "
        f"{statistics.median(trip):.2f} ms)"
    )
    lat = []
    for line in out.splitlines():
        i, t = line.split()
        if f"f{i}" in seen:
            lat.append((seen[f"f{i}"] - float(t)) * 1000)
    lat.sort()
    print(
        f"{args.tier}: in-sandbox write -> on_event, {len(lat)}/{args.runs} events: "
        f"median {statistics.median(lat):.2f} ms, p90 {lat[int(len(lat) * 0.9)]:.2f} ms"
    )


if __name__ == "__main__":
    main()
