"""Ingress (issue 10, E2B's ``get_host``): a port a sandbox process listens on, reached from
outside through a real ``moat serve`` and the agent's channel, on every tier.

Inside: Python's ``http.server`` and a small stdlib WebSocket echo server. Outside: curl
(which resolves ``*.localhost`` itself, as browsers do), httpx with E2B's header form, and a
wsproto client over a plain socket. Controls: without the traffic token, with another
sandbox's token, and to a port nobody listens on, nothing reaches the app.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox as E2BSandbox
from tests.conftest import TIER_PARAMS, require_tier
from tests.server_support import Server, new_key, start_server, tenant_name
from wsproto import ConnectionType, WSConnection
from wsproto import events as ws

WS_ECHO = (Path(__file__).parent / "sandbox_ws_echo.py").read_text()
HTTP_ECHO = (Path(__file__).parent / "sandbox_http_echo.py").read_text()


@pytest.fixture(scope="module", params=TIER_PARAMS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    require_tier(request.param)
    log = Path(tmp_path_factory.mktemp("ingress")) / "server.log"
    srv = start_server(log, tier=request.param)
    try:
        yield srv
    finally:
        assert srv.stop() == 0
        assert "Traceback" not in srv.log.read_text(), srv.log.read_text()[-3000:]


def _sandbox(server: Server, key: str, **kw: object) -> E2BSandbox:
    sbx = E2BSandbox.create(api_key=key, api_url=server.url, sandbox_url=server.url,
                            timeout=300, **kw)  # type: ignore[arg-type]  # fmt: skip
    sbx.files.write("/home/user/www/index.html", "hello from inside\n")
    sbx.files.write("/home/user/ws_echo.py", WS_ECHO)
    sbx.commands.run("cd /home/user/www && python3 -m http.server 8000 --bind 127.0.0.1",
                     background=True)  # fmt: skip
    sbx.commands.run("python3 /home/user/ws_echo.py 8765", background=True)
    sbx.files.write("/home/user/http_echo.py", HTTP_ECHO)
    sbx.commands.run("python3 /home/user/http_echo.py 8002", background=True)
    for _ in range(100):
        probe = "import socket; [socket.create_connection(('127.0.0.1', p)).close() for p in PORTS]"
        r = sbx.commands.run(f'python3 -c "PORTS = (8000, 8765, 8002); {probe}" && echo up || true')
        if "up" in r.stdout:
            return sbx
        time.sleep(0.1)
    raise AssertionError("the servers inside did not start")


def _curl(url: str, *args: str) -> tuple[int, str, str]:
    out = subprocess.run(["curl", "-s", "-i", "--max-time", "20", *args, url],
                         capture_output=True, timeout=30)  # fmt: skip
    head, _, body = out.stdout.decode().partition("\r\n\r\n")
    status = int(head.split(" ", 2)[1]) if head.startswith("HTTP/") else 0
    return status, head, body


def _ws_echo(server: Server, sid: str, token: str | None, port: int = 8765) -> list[str]:
    host, _, p = server.url.removeprefix("http://").partition(":")
    sock = socket.create_connection((host, int(p)), timeout=20)
    conn = WSConnection(ConnectionType.CLIENT)
    extra = [(b"e2b-sandbox-id", sid.encode()), (b"e2b-sandbox-port", str(port).encode())]
    if token is not None:
        extra.append((b"e2b-traffic-access-token", token.encode()))
    sock.sendall(conn.send(ws.Request(host="ws.example", target="/", extra_headers=extra)))
    got: list[str] = []
    accepted = False
    while True:
        data = sock.recv(65536)
        if not data:
            break
        conn.receive_data(data)
        for event in conn.events():
            if isinstance(event, ws.AcceptConnection):
                accepted = True
                sock.sendall(conn.send(ws.Message(data="one")))
                sock.sendall(conn.send(ws.Message(data="two" * 100)))
            elif isinstance(event, ws.RejectConnection):
                sock.close()
                return ["rejected"]
            elif isinstance(event, ws.TextMessage):
                got.append(event.data)
                if len(got) == 2:
                    sock.sendall(conn.send(ws.CloseConnection(code=1000)))
            elif isinstance(event, ws.CloseConnection):
                sock.close()
                return got
    sock.close()
    return got if accepted else ["rejected"]


def test_http_and_websocket_ingress_with_the_token_only(server: Server) -> None:
    key = new_key(tenant_name("ingress"))
    sbx = _sandbox(server, key)
    other = E2BSandbox.create(api_key=key, api_url=server.url, sandbox_url=server.url, timeout=120)
    try:
        token = sbx.traffic_access_token
        assert token and token != other.traffic_access_token
        host = sbx.get_host(8000)
        assert host == f"8000-{sbx.sandbox_id}.moat.localhost:{server.url.rsplit(':', 1)[1]}"
        # curl resolves *.localhost to loopback by itself, as browsers do.
        status, _, body = _curl(f"http://{host}/index.html", "-H",
                                f"E2B-Traffic-Access-Token: {token}")  # fmt: skip
        assert (status, body) == (200, "hello from inside\n")
        # Controls: no token, another sandbox's token, a port nobody listens on.
        assert _curl(f"http://{host}/index.html")[0] == 502
        wrong = f"E2B-Traffic-Access-Token: {other.traffic_access_token}"
        status, _, body = _curl(f"http://{host}/index.html", "-H", wrong)
        assert status == 502 and "hello" not in body
        status, _, body = _curl(f"http://{sbx.get_host(8001)}/", "-H",
                                f"E2B-Traffic-Access-Token: {token}")  # fmt: skip
        assert status == 502 and "port is not open" in body
        # A browser: the token in the query once, then a cookie for that host.
        jar = Path(f"/tmp/moat-ingress-jar-{sbx.sandbox_id}")
        status, head, _ = _curl(f"http://{host}/index.html?moat_traffic_token={token}", "-c",
                                str(jar))  # fmt: skip
        assert status == 200 and "moat_traffic_token=" in head.lower().replace("set-cookie", "")
        assert _curl(f"http://{host}/index.html", "-b", str(jar))[0] == 200
        jar.unlink()
        # E2B's header form, and a request body (its hash comes back).
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000",
                   "E2B-Traffic-Access-Token": token}  # fmt: skip
        r = httpx.get(f"{server.url}/index.html", headers=headers, timeout=20)
        assert r.status_code == 200 and r.text == "hello from inside\n"
        payload = bytes(range(256)) * 1000
        r = httpx.post(f"{server.url}/", headers={**headers, "E2b-Sandbox-Port": "8002"},
                       content=payload, timeout=20)  # fmt: skip
        assert r.status_code == 200
        assert r.text == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}"
        # The agent's egress proxy (3128) is no ingress target: from outside it would lend the
        # sandbox's gateway, and the secrets it brokers, to whoever holds the token.
        proxy = httpx.get(f"{server.url}/", headers={**headers, "E2b-Sandbox-Port": "3128"},
                          timeout=20)  # fmt: skip
        assert proxy.status_code == 403 and "egress proxy" in proxy.text, proxy.text
        assert "x-moat-reason" not in proxy.headers  # nothing of the gateway answered
        # WebSocket: echoed both ways, and refused without the token.
        assert _ws_echo(server, sbx.sandbox_id, token) == ["echo:one", "echo:" + "two" * 100]
        assert _ws_echo(server, sbx.sandbox_id, None) == ["rejected"]
    finally:
        sbx.kill()
        other.kill()
    # Every connection is an audit row (read from another process: never open a live store
    # in this one).
    rows = json.loads(subprocess.run(
        [sys.executable, "-c", "import json, sys; from moat.store import AuditLog; "
         "print(json.dumps(list(AuditLog(sys.argv[1]).query(kind='ingress', limit=100))))",
         str(server.log.parent / "audit.db")],
        capture_output=True, text=True, timeout=60, check=True).stdout)  # fmt: skip
    mine = [r for r in rows if r["sandbox_id"] == sbx.sandbox_id]
    assert any(r["result"] == "allow" and r["port"] == 8000 and r["bytes_down"] > 0 for r in mine)
    assert any(r["method"] == "WEBSOCKET" and r["port"] == 8765 for r in mine)
    assert any(r["result"] == "deny" and r["reason"] == "port_not_open" for r in mine)
    assert any(r["result"] == "deny" and r["reason"] == "port_refused" for r in mine)


def test_public_traffic_needs_no_token_and_tenants_stay_apart(server: Server) -> None:
    key, stranger = new_key(tenant_name("pub")), new_key(tenant_name("stranger"))
    sbx = _sandbox(server, key, network={"allow_public_traffic": True})
    try:
        status, _, body = _curl(f"http://{sbx.get_host(8000)}/index.html")
        assert (status, body) == (200, "hello from inside\n")
        # A public sandbox compares no token: attacker text in the parameter never becomes a
        # cookie (it could have set one for the parent domain every sandbox shares).
        bad = "x%3B%20Domain%3Dmoat.localhost"
        status, head, _ = _curl(f"http://{sbx.get_host(8000)}/index.html?moat_traffic_token={bad}")
        assert status == 200 and "set-cookie" not in head.lower()
        # Another tenant's key opens nothing over the control plane either.
        r = httpx.get(f"{server.url}/sandboxes/{sbx.sandbox_id}",
                      headers={"X-API-Key": stranger}, timeout=20)  # fmt: skip
        assert r.status_code == 404
    finally:
        sbx.kill()
    # A killed sandbox: its host name answers like an unknown one.
    assert _curl(f"http://{sbx.get_host(8000)}/index.html")[0] == 502


def test_routing_and_cookie_rules() -> None:
    """Pure rules of moat.server.ingress: moat's own ports are never an ingress target by
    host name; an app's cookie stays on its own host; every token cookie is a candidate."""
    from moat.server.ingress import _host_only, _matches, _token, target_of

    def scope(host: str, **headers: str) -> dict[str, object]:
        hs = [(b"host", host.encode())] + [(k.encode(), v.encode()) for k, v in headers.items()]
        return {"type": "http", "headers": hs, "query_string": b""}

    dom = "moat.localhost:49982"
    t = target_of(scope("8000-sbx-abcd.moat.localhost:49982"), dom)
    assert t is not None and (t.sandbox_id, t.port, t.by_host) == ("sbx-abcd", 8000, True)
    for own in (49983, 49999):  # envd and the code interpreter: the sandbox plane's, not user code
        assert target_of(scope(f"{own}-sbx-abcd.moat.localhost"), dom) is None
    assert target_of(scope("8000-sbx-abcd.evil.example"), dom) is None
    assert _host_only(b"a=1; Domain=moat.localhost; Path=/") == b"a=1; Path=/"
    assert _host_only(b"a=1; path=/; DOMAIN=.x") == b"a=1; path=/"
    planted = scope("h", cookie="moat_traffic_token=planted; moat_traffic_token=real")
    tokens, from_query = _token(planted)
    assert tokens == ["planted", "real"] and not from_query
    assert _matches("real", tokens) and not _matches("other", tokens)
