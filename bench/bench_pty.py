"""PTY keystroke echo round trip: one byte typed, until its echo is back (guard included).

    .venv/bin/python bench/bench_pty.py [--keys 60] [--tier container]

Through the embedded SDK (the engine in this process), and through ``moat serve`` with the
unmodified e2b SDK (SendInput, then the echo on the Start stream). Prints medians and p90
(ms). Target (issue 10): <= 5 ms median on the container tier through the server.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Echo:
    def __init__(self) -> None:
        self.data = bytearray()
        self.cond = threading.Condition()

    def __call__(self, chunk: bytes) -> None:
        with self.cond:
            self.data += chunk
            self.cond.notify_all()

    def wait_for(self, needle: bytes, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while needle not in self.data:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{needle!r} not echoed")
                self.cond.wait(left)


def _trips(echo: Echo, send: Callable[[bytes], Any], keys: int) -> list[float]:
    send(b"stty -icanon; cat\n")  # the kernel echoes each byte as it is typed
    time.sleep(0.5)
    out = []
    for i in range(keys):
        key = bytes([ord("a") + i % 26])
        with echo.cond:
            echo.data.clear()
        t0 = time.perf_counter()
        send(key)
        echo.wait_for(key)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _report(name: str, trips: list[float]) -> None:
    trips.sort()
    p90 = trips[int(len(trips) * 0.9) - 1]
    print(f"{name:38} median {statistics.median(trips):6.2f} ms   p90 {p90:6.2f} ms")


def embedded(tier: str, keys: int) -> None:
    from moat import Sandbox

    with Sandbox.create(isolation=tier, timeout=300) as sbx:
        echo = Echo()
        h = sbx.pty.create(80, 24, on_data=echo)
        echo.wait_for(b"$ ")
        _report(f"embedded SDK ({tier})", _trips(echo, h.send_stdin, keys))
        h.kill()


def served(tier: str, keys: int) -> None:
    from e2b import Sandbox as E2BSandbox
    from e2b.sandbox.commands.command_handle import PtySize
    from tests.server_support import new_key, start_server, tenant_name

    log = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-pty-serve.log"
    srv = start_server(log, tier)
    try:
        key = new_key(tenant_name("bench"))
        os.environ["E2B_API_URL"] = os.environ["E2B_SANDBOX_URL"] = srv.url
        sbx = E2BSandbox.create(api_key=key, timeout=300)
        echo = Echo()
        t = sbx.pty.create(PtySize(rows=24, cols=80), timeout=0)

        def drain() -> None:
            try:
                t.wait(on_pty=echo)
            except Exception:  # noqa: BLE001 - the sandbox is killed at the end
                pass

        threading.Thread(target=drain, daemon=True).start()
        echo.wait_for(b"$ ")
        _report(
            f"e2b SDK via moat serve ({tier})",
            _trips(echo, lambda b: sbx.pty.send_stdin(t.pid, b), keys),
        )
        sbx.kill()
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=60)
    ap.add_argument("--tier", default="container")
    args = ap.parse_args()
    os.environ.setdefault("MOAT_WARM_POOL", "0")
    embedded(args.tier, args.keys)
    served(args.tier, args.keys)


if __name__ == "__main__":
    main()
