"""``moat serve --tls-cert/--tls-key``: HTTPS on the one listener, ingress host names included.

A test CA and a certificate for ``moat.localhost``, ``*.moat.localhost`` and 127.0.0.1 (made
with cryptography); the server's control plane, sandbox plane and ingress answer over TLS
only; a missing or mismatched key stops the start (never plain HTTP by mistake).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tests.conftest import require_tier
from tests.server_support import MOAT, free_port, new_key, tenant_name

pytestmark = [pytest.mark.container, pytest.mark.slow]


def _pki(d: Path) -> tuple[Path, Path, Path]:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "moat test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("moat.localhost"), x509.DNSName("*.moat.localhost"),
             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]  # fmt: skip
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "moat.localhost")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = (d / "ca.pem", d / "cert.pem", d / "key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return paths


def _trust(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


@dataclass
class TlsServer:
    url: str
    ca: Path
    port: int


def _serve(args: list[str], log: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MOAT_WARM_POOL": "0", "MOAT_AUDIT_DB": str(log.parent / "audit.db")}
    with log.open("wb") as out:
        return subprocess.Popen(
            [*MOAT, "serve", "--host", "127.0.0.1", "--port", str(port), "--tier", "container",
             *args], stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    require_tier("container")
    d = tmp_path_factory.mktemp("tls")
    ca, cert, key = _pki(d)
    port = free_port()
    proc = _serve(["--tls-cert", str(cert), "--tls-key", str(key)], d / "server.log", port)
    url = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", verify=_trust(ca), timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (d / "server.log").read_text()
        time.sleep(0.2)
    try:
        yield TlsServer(url, ca, port)
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
        assert "Traceback" not in (d / "server.log").read_text()


def test_control_plane_sandbox_plane_and_ingress_over_tls(tls_server: TlsServer) -> None:
    ca = _trust(tls_server.ca)
    # Plain HTTP on the same port gets nowhere.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_server.port}/health", timeout=5)
    key = {"X-API-Key": new_key(tenant_name("tls"))}
    body = {"templateID": "base", "network": {"allowPublicTraffic": True}}
    r = httpx.post(tls_server.url + "/v2/sandboxes", headers=key, verify=ca, timeout=60, json=body)
    assert r.status_code == 201, r.text
    box = r.json()
    sid = box["sandboxID"]
    try:
        plane = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49999",
                 "X-Access-Token": box["envdAccessToken"]}  # fmt: skip
        code = ("import subprocess, time; subprocess.Popen(['python3', '-m', 'http.server', "
                "'8000', '--bind', '127.0.0.1'], cwd='/tmp'); open('/tmp/hi.txt', 'w')"
                ".write('over tls'); time.sleep(1); print('up')")  # fmt: skip
        r = httpx.post(tls_server.url + "/execute", headers=plane, verify=ca, timeout=60,
                       json={"code": code})  # fmt: skip
        lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
        assert any(x.get("type") == "stdout" and "up" in x.get("text", "") for x in lines), lines
        # Ingress by host name, over TLS (SNI and certificate for *.moat.localhost).
        host = f"8000-{sid}.moat.localhost"
        at = f"{host}:{tls_server.port}"
        out = subprocess.run(
            ["curl", "-s", "--cacert", str(tls_server.ca), "--resolve", f"{at}:127.0.0.1",
             f"https://{at}/hi.txt"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.stdout == "over tls", out.stderr
    finally:
        httpx.delete(f"{tls_server.url}/sandboxes/{sid}", headers=key, verify=ca, timeout=30)


@pytest.mark.parametrize("which", ["cert-only", "mismatched", "missing"])
def test_bad_tls_settings_stop_the_start(tmp_path: Path, which: str) -> None:
    _ca, cert, key = _pki(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _ca2, _cert2, key2 = _pki(other)
    args = {
        "cert-only": ["--tls-cert", str(cert)],
        "mismatched": ["--tls-cert", str(cert), "--tls-key", str(key2)],
        "missing": ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(key)],
    }[which]
    proc = _serve(args, tmp_path / "server.log", free_port())
    assert proc.wait(60) == 2
    text = (tmp_path / "server.log").read_text()
    assert "moat serve:" in text and "Traceback" not in text and "listening" not in text


def test_no_plain_http_warning_with_tls(capsys: pytest.CaptureFixture[str]) -> None:
    from moat.server.serve import warn_if_exposed

    warn_if_exposed("0.0.0.0", tls=True)
    assert capsys.readouterr().err == ""
    warn_if_exposed("0.0.0.0")
    assert "PLAIN HTTP" in capsys.readouterr().err


def test_dashboard_cookie_is_secure_over_tls(tls_server: TlsServer) -> None:
    """The dashboard's session cookie carries Secure where the server speaks TLS
    (docs/dashboard.md); over plain HTTP it can't (tests/test_dashboard.py)."""
    import re

    key = new_key(tenant_name("tlsdash"))
    with httpx.Client(base_url=tls_server.url, verify=_trust(tls_server.ca), timeout=30) as c:
        form = c.get("/ui/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
        assert nonce is not None
        r = c.post("/ui/login", data={"api_key": key, "nonce": nonce.group(1)},
                   headers={"origin": tls_server.url})  # fmt: skip
        assert r.status_code == 303, r.text
        cookies = [v for k, v in r.headers.multi_items() if k == "set-cookie"]
        session = next(v for v in cookies if v.startswith("moat_session="))
        assert "Secure" in session and "HttpOnly" in session and "SameSite=strict" in session
