"""``moat serve`` exposure: loopback by default, loud when bound elsewhere, and no sandbox can
reach the server's own port (invariants 1 and 2), checked from outside in the server's log.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from e2b_code_interpreter import Sandbox
from tests.conftest import TIER_PARAMS, require_tier
from tests.killcheck import eventually
from tests.server_support import MOAT, free_port, new_key, tenant_name

from moat.model import PROXY_PORT
from moat.server.serve import is_loopback, warn_if_exposed

# -- loopback by default; loud otherwise -----------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_loopback_binds_are_quiet(host: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert is_loopback(host)
    warn_if_exposed(host)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.2", "10.1.2.3", "example.org", ""])
def test_other_binds_warn_loudly(host: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert not is_loopback(host)
    warn_if_exposed(host)
    err = capsys.readouterr().err
    assert "PLAIN HTTP" in err and "TLS" in err and err.count("!") > 78


def test_the_default_bind_is_loopback() -> None:
    out = subprocess.run([*MOAT, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "127.0.0.1" in out.stdout


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MOAT_SERVE_LOG", "loud"),
        ("MOAT_SERVE_HEAD_TIMEOUT_S", "abc"),
        ("MOAT_SERVE_HEAD_TIMEOUT_S", "0"),
        ("MOAT_SERVE_HEAD_TIMEOUT_S", "nan"),
        ("MOAT_SERVE_HEAD_TIMEOUT_S", "1e9"),
        ("MOAT_SERVE_BODY_TIMEOUT_S", "-5"),
        ("MOAT_SERVE_BODY_TIMEOUT_S", "inf"),
    ],
)
def test_a_bad_setting_fails_before_starting(name: str, value: str) -> None:
    env = {**os.environ, name: value}
    out = subprocess.run(
        [*MOAT, "serve", "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert out.returncode == 2 and name in out.stderr
    assert "Traceback" not in out.stderr


# -- a sandbox can't reach the server --------------------------------------------------------

#: Run inside the sandbox: try the server's port directly, through the agent's proxy as a
#: plain-HTTP request, and through it as a CONNECT tunnel; print what each attempt got.
PROBE = r"""
import json, os, socket, urllib.request
for name in ("no_proxy", "NO_PROXY"):  # through the proxy even for loopback names
    os.environ.pop(name, None)
port, token, targets, proxy_port = {port}, {token!r}, {targets!r}, {proxy_port}
path = f"/health?from-sandbox-{{token}}"
out = {{}}
def request(sock, path):
    sock.sendall(f"GET {{path}} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    return sock.recv(200).decode("latin-1")
for addr in targets:
    try:
        with socket.create_connection((addr, port), timeout=3) as s:
            out["direct " + addr] = "CONNECTED " + request(s, path + "-direct")
    except OSError as exc:
        out["direct " + addr] = type(exc).__name__ + " " + str(exc)
    proxied = urllib.request.build_opener(urllib.request.ProxyHandler(
        {{"http": f"http://127.0.0.1:{{proxy_port}}"}}))
    try:
        r = proxied.open(f"http://{{addr}}:{{port}}{{path}}-proxy", timeout=15)
        out["proxy " + addr] = f"{{r.status}} " + r.read(200).decode("latin-1")
    except urllib.error.HTTPError as exc:
        out["proxy " + addr] = f"{{exc.code}} " + exc.read(200).decode("latin-1")
    except OSError as exc:
        out["proxy " + addr] = type(exc).__name__ + " " + str(exc)
    try:
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=3) as s:
            hostport = f"{{addr}}:{{port}}"
            s.sendall(f"CONNECT {{hostport}} HTTP/1.1\r\nHost: {{hostport}}\r\n\r\n".encode())
            head = s.recv(200).decode("latin-1")
            if head.startswith("HTTP/1.1 200") or head.startswith("HTTP/1.0 200"):
                head = "TUNNEL " + request(s, path + "-connect")
            out["connect " + addr] = head
    except OSError as exc:
        out["connect " + addr] = type(exc).__name__ + " " + str(exc)
print(json.dumps(out))
"""


def _host_addresses() -> tuple[list[str], list[str]]:
    """The host's own non-loopback IPv4 addresses, and its default gateways'."""
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True)
    mine = [f.split("/")[0] for line in out.stdout.splitlines() for f in line.split()[3:4]]
    route = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True)
    gateways = [line.split()[2] for line in route.stdout.splitlines() if line.startswith("default")]
    return [a for a in mine if not a.startswith("127.")], gateways


@pytest.mark.slow
@pytest.mark.parametrize("tier", TIER_PARAMS)
def test_a_sandbox_cannot_reach_the_servers_port(tier: str, tmp_path: Path) -> None:
    require_tier(tier)
    port = free_port()
    assert port != PROXY_PORT
    token = secrets.token_hex(8)
    log = tmp_path / "server.log"
    env = {**os.environ, "MOAT_SERVE_LOG": "info", "MOAT_WARM_POOL": "0",
           "MOAT_AUDIT_DB": str(tmp_path / "audit.db")}  # fmt: skip
    key = new_key(tenant_name("reach"))
    with log.open("wb") as out:
        # Bound on every address, only so that the host's positive control can reach it there.
        proc = subprocess.Popen(
            [*MOAT, "serve", "--host", "0.0.0.0", "--port", str(port), "--tier", tier],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(trust_env=False, timeout=30)
    try:

        def up() -> bool:
            try:
                return client.get(url + "/health").status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        assert eventually(up, 60) and proc.poll() is None, log.read_text()[-2000:]
        assert "PLAIN HTTP" in log.read_text()  # the loud warning, from the real CLI
        own, gateways = _host_addresses()
        # 10.0.2.2: the host as QEMU's user network would show it (the microVM has no NIC).
        targets = ["127.0.0.1", "localhost", *own, *gateways, "10.0.2.2"]
        # Positive control: the server answers the host on loopback and on its own addresses,
        # and the log shows each request.
        for addr in ["127.0.0.1", *own]:
            r = client.get(f"http://{addr}:{port}/health?from-host-{token}")
            assert r.status_code == 200 and r.json() == {"status": "ok"}
        assert eventually(lambda: log.read_text().count(f"from-host-{token}") >= 1 + len(own))

        # The widest policy a caller can ask for: each target's host:port named in allowOut
        # (the name check passes), so only the address check can refuse (invariant 2).
        sbx = Sandbox.create(api_key=key, api_url=url, sandbox_url=url, timeout=300,
                             allow_internet_access=True,
                             network={"allow_out": [f"{a}:{port}" for a in targets]})  # fmt: skip
        try:
            code = PROBE.format(port=port, token=token, targets=targets, proxy_port=PROXY_PORT)
            ex = sbx.run_code(code, timeout=240)
            assert ex.error is None, ex.error
            got = json.loads("".join(ex.logs.stdout))
        finally:
            sbx.kill()
        assert len(got) == 3 * len(targets), got
        for what, answer in got.items():
            assert not answer.startswith(("CONNECTED", "TUNNEL")), (what, answer)
            assert "status" not in answer, (what, answer)  # the server's /health reply
            if not what.startswith("direct "):
                # Refused by the gateway's address check, the name having passed (invariant 2).
                assert "blocked_address" in answer, (what, answer)
        # From outside: not one request of the sandbox's reached the server.
        assert f"from-sandbox-{token}" not in log.read_text()
    finally:
        client.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    assert "Traceback" not in log.read_text()
