"""A real ``moat serve`` process on 127.0.0.1 for the server tests, and its keys."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

MOAT = [sys.executable, "-m", "moat.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def new_key(tenant: str) -> str:
    out = subprocess.run(
        [*MOAT, "keys", "create", "--tenant", tenant],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout.splitlines()[-1]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False


def start_server(
    log: Path, tier: str = "container", pool: str = "0", env: dict[str, str] | None = None
) -> Server:
    """``pool``: its ``MOAT_WARM_POOL`` (none by default); ``env``: more of its environment."""
    port = free_port()
    # Its own audit store: the server's log must show no failure of anything shared.
    env = {
        **os.environ,
        "MOAT_WARM_POOL": pool,
        "MOAT_AUDIT_DB": str(log.parent / "audit.db"),
        **(env or {}),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*MOAT, "serve", "--host", "127.0.0.1", "--port", str(port), "--tier", tier],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 60
    while not server.healthy():
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError("moat serve did not start: " + log.read_text()[-2000:])
        time.sleep(0.2)
    return server


def tenant_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@contextmanager
def serving(
    log: Path, tier: str = "container", pool: str = "0", env: dict[str, str] | None = None
) -> Iterator[Server]:
    """A running ``moat serve`` (default tier ``tier``; ``pool``: its ``MOAT_WARM_POOL``;
    ``env``: more of its environment) with the E2B SDKs pointed at it (``E2B_API_URL`` and
    ``E2B_SANDBOX_URL``; no default key); on exit it must stop cleanly with no traceback."""
    srv = start_server(log, tier, pool=pool, env=env)
    names = ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["E2B_API_URL"] = os.environ["E2B_SANDBOX_URL"] = srv.url
    os.environ.pop("E2B_API_KEY", None)
    try:
        yield srv
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        assert srv.stop() == 0
        text = srv.log.read_text()
        assert "Traceback" not in text, text[-3000:]
