"""Ingress bodies (issue 10's throughput work): every framing an app answers with reaches
the client intact, and a slow client never makes the host buffer without bound.

A Content-Length body is relayed piece by piece with the app's own Content-Length (no h11
re-framing); a chunked one still goes through h11; an app that breaks off before its declared
length gives the client a broken response, never a short one that looks whole. The slow
client: a download of 8 GB the client stops reading after 1 MB; the server's RSS (read from
outside, /proc) stays within a few MiB, held by the stream's credit window.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox as E2BSandbox
from tests.conftest import TIER_PARAMS, require_tier
from tests.server_support import Server, new_key, start_server, tenant_name

SHAPES = (Path(__file__).parent / "sandbox_http_shapes.py").read_text()
PORT = 8003
#: The most the server's RSS may grow while a client holds a download unread. The credit
#: window (1 MiB) plus uvicorn's write buffer and allocator slack are well under it; without
#: flow control the app inside writes hundreds of MB a second.
RSS_SLACK = 48 * 1024 * 1024


@pytest.fixture(scope="module", params=TIER_PARAMS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, E2BSandbox]]:
    require_tier(request.param)
    log = Path(tmp_path_factory.mktemp("ingress-stream")) / "server.log"
    srv = start_server(log, tier=request.param)
    try:
        key = new_key(tenant_name("ingress-stream"))
        sbx = E2BSandbox.create(api_key=key, api_url=srv.url, sandbox_url=srv.url, timeout=300)
        try:
            sbx.files.write("/home/user/shapes.py", SHAPES)
            sbx.commands.run(f"python3 /home/user/shapes.py {PORT}", background=True)
            probe = f"import socket; socket.create_connection(('127.0.0.1', {PORT})).close()"
            for _ in range(100):
                if "up" in sbx.commands.run(f'python3 -c "{probe}" && echo up || true').stdout:
                    break
                time.sleep(0.1)
            yield srv, sbx
        finally:
            sbx.kill()
    finally:
        assert srv.stop() == 0
        assert "Traceback" not in srv.log.read_text(), srv.log.read_text()[-3000:]


def _headers(sbx: E2BSandbox) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(PORT),
            "E2B-Traffic-Access-Token": sbx.traffic_access_token or ""}  # fmt: skip


def test_every_framing_arrives_intact(served: tuple[Server, E2BSandbox]) -> None:
    srv, sbx = served
    headers = _headers(sbx)
    with httpx.Client(timeout=60) as client:
        for n in (0, 1, 65535, 3 * 1024 * 1024 + 17):
            r = client.get(f"{srv.url}/big?n={n}", headers=headers)
            assert r.status_code == 200 and len(r.content) == n
            assert r.headers["content-length"] == str(n)  # the app's own framing
            assert "transfer-encoding" not in r.headers
            assert hashlib.sha256(r.content).hexdigest() == r.headers["x-sha256"]
        head = client.head(f"{srv.url}/big?n=5000", headers=headers)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == "5000"
        r = client.get(f"{srv.url}/chunked", headers=headers)
        assert r.status_code == 200 and r.content == b"one," + b"two," * 1000 + b"three"
        # The app breaks off: the client must see a broken body, not a short "complete" one.
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(f"{srv.url}/short", headers=headers)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_stops_reading_holds_the_host_to_the_window(
    served: tuple[Server, E2BSandbox],
) -> None:
    srv, sbx = served
    host, _, port = srv.url.removeprefix("http://").partition(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        lines = [f"{k}: {v}" for k, v in _headers(sbx).items()]
        request = "\r\n".join(["GET /endless HTTP/1.1", f"Host: {host}", *lines, "", ""])
        sock.sendall(request.encode())
        got = 0
        while got < 1 << 20:
            data = sock.recv(1 << 16)
            assert data, "the download ended early"
            got += len(data)
        before = _rss(srv.proc.pid)
        time.sleep(4)  # the app inside keeps writing; nobody reads here
        grown = _rss(srv.proc.pid) - before
        assert grown < RSS_SLACK, f"the server buffered {grown / 2**20:.0f} MiB for a slow client"
        # The stream still flows once the client reads again.
        while got < 8 << 20:
            data = sock.recv(1 << 16)
            assert data
            got += len(data)
    finally:
        sock.close()
    assert srv.healthy()
