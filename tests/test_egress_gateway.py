"""The gateway end to end: real gateway, real clients, real servers on loopback only.

Positive paths run with ``unsafe_allow_private_ranges=True`` and a resolver mapping test
names to 127.0.0.1; every positive path has a twin proving that without the unsafe flag the
same request is refused.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
import requests

from moat.egress import NetworkPolicy
from test_egress_support import (
    CountingResolver,
    GatewayFactory,
    LocalPKI,
    Upstream,
    raw_connect,
    raw_request,
    start_upstream,
)

pytest_plugins = ["test_egress_support"]  # shared fixtures (servers, PKI, gateway)


def _allow(*ports: int) -> NetworkPolicy:
    return NetworkPolicy(allow_out=[f"api.example.test:{p}" for p in ports])


def _reasons(h, denied_only: bool = False) -> list[str]:  # type: ignore[no-untyped-def]
    return [r["reason"] for r in h.audit.query(denied_only=denied_only)]


# -- plain HTTP ------------------------------------------------------------------------------


def test_plain_http_allowed_and_not_allowed(
    gateway: GatewayFactory, http_upstream: Upstream
) -> None:
    h = gateway(_allow(http_upstream.port))
    with httpx.Client(proxy=h.proxy, timeout=10) as c:
        r = c.get(f"http://api.example.test:{http_upstream.port}/echo")
        assert r.status_code == 200 and r.json()["ident"] == "plain"
        r = c.get(f"http://other.example.test:{http_upstream.port}/echo")
        assert r.status_code == 403 and r.headers["x-moat-reason"] == "not_allowed"
    rows = h.audit.query(kind="egress")
    assert rows[0]["result"] == "deny" and rows[0]["host"] == "other.example.test"
    assert rows[1]["result"] == "allow" and rows[1]["resolved_ip"] == "127.0.0.1"
    assert rows[1]["bytes_down"] > 0 and rows[1]["method"] == "GET"


def test_same_request_refused_without_unsafe_flag(
    gateway: GatewayFactory, http_upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="moat.egress")
    h = gateway(_allow(http_upstream.port), unsafe=False)
    before = len(http_upstream.records)
    with httpx.Client(proxy=h.proxy, timeout=10) as c:
        r = c.get(f"http://api.example.test:{http_upstream.port}/echo")
    assert r.status_code == 403 and r.headers["x-moat-reason"] == "blocked_address:loopback"
    assert len(http_upstream.records) == before  # nothing reached the server
    assert not any("UNSAFE" in m for m in caplog.messages)


def test_unsafe_flag_warns_at_every_start(
    gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="moat.egress")
    gateway(None)
    gateway(None)
    assert sum("UNSAFE" in m for m in caplog.messages) == 2


def test_host_header_must_match_target(gateway: GatewayFactory, http_upstream: Upstream) -> None:
    p = http_upstream.port
    h = gateway(NetworkPolicy(allow_out=[f"api.example.test:{p}", f"other.example.test:{p}"]))
    out = raw_request(h.port, f"GET http://api.example.test:{p}/ HTTP/1.1\r\n"
                      f"Host: other.example.test:{p}\r\n\r\n".encode())  # fmt: skip
    assert out.startswith(b"HTTP/1.1 403") and b"X-Moat-Reason: host_mismatch" in out
    ok = raw_request(h.port, f"GET http://api.example.test:{p}/ HTTP/1.1\r\n"
                     f"Host: API.example.test.:{p}\r\n\r\n".encode())  # fmt: skip
    assert ok.startswith(b"HTTP/1.1 200")  # control: same host, other spelling


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n", b"not_a_proxy_request"),
        (b"GET https://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
         b"https_needs_connect"),
        (b"GET ftp://api.example.test/ HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
         b"not_a_proxy_request"),
        (b"\x16\x03\x01\x00\x05hello\r\n\r\n", b"bad_request"),
        (b"CONNECT api.example.test HTTP/1.1\r\nHost: x\r\n\r\n", b"bad_target"),
        (b"GET http://api.example.test/ HTTP/1.1\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n",
         b"bad_request"),
    ],
)  # fmt: skip
def test_not_a_proxy_request_refused(gateway: GatewayFactory, data: bytes, reason: bytes) -> None:
    h = gateway(NetworkPolicy.allow_internet())
    out = raw_request(h.port, data)
    assert out.startswith(b"HTTP/1.1 4") and b"X-Moat-Reason: " + reason in out


# -- CONNECT tunnels with every client ----------------------------------------------------------


def test_https_through_curl_urllib_requests_httpx(
    gateway: GatewayFactory, https_upstream: Upstream, pki: LocalPKI
) -> None:
    url = f"https://api.example.test:{https_upstream.port}/echo"
    h = gateway(_allow(https_upstream.port))
    ca = str(pki.ca_file)
    # curl
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "--proxy", h.proxy, "--cacert", ca,
                          url], capture_output=True, timeout=30, check=True)  # fmt: skip
    assert json.loads(out.stdout)["ident"] == "tls"
    # urllib
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"https": h.proxy}),
        urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca)),
    )
    with opener.open(url, timeout=20) as resp:
        assert json.load(resp)["ident"] == "tls"
    # requests
    r = requests.get(url, proxies={"https": h.proxy}, verify=ca, timeout=20)
    assert r.json()["ident"] == "tls"
    # httpx
    with httpx.Client(proxy=h.proxy, verify=ssl.create_default_context(cafile=ca), timeout=20) as c:
        assert c.get(url).json()["ident"] == "tls"
    # not allowed: refused before any byte leaves
    s, head = raw_connect(h.port, f"other.example.test:{https_upstream.port}")
    s.close()
    assert head.startswith(b"HTTP/1.1 403") and b"not_allowed" in head
    rows = h.audit.query(kind="egress")
    assert sum(r["result"] == "allow" and r["reason"] == "tunnel" for r in rows) == 4


@pytest.mark.slow
def test_pip_download_from_local_https_index(
    gateway: GatewayFactory, https_upstream: Upstream, pki: LocalPKI, tmp_path: Path
) -> None:
    h = gateway(NetworkPolicy(allow_out=[f"pypi.example.test:{https_upstream.port}"]))
    index = f"https://pypi.example.test:{https_upstream.port}/simple/"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--isolated", "--no-deps", "--no-cache-dir",
         "--disable-pip-version-check", "--index-url", index, "--proxy", h.proxy,
         "--cert", str(pki.ca_file), "-d", str(tmp_path / "dl"), "demo-pkg==0.1"],
        capture_output=True, timeout=120, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "dl" / "demo_pkg-0.1-py3-none-any.whl").is_file()


# -- bypass spellings, blocked ranges, rebinding -----------------------------------------------

BYPASS = [
    "127.0.0.1:{p}", "2130706433:{p}", "0x7f000001:{p}", "0177.0.0.1:{p}", "127.1:{p}",
    "0x7f.1:{p}", "[::1]:{p}", "[::ffff:127.0.0.1]:{p}", "[::ffff:7f00:1]:{p}",
    "[64:ff9b::7f00:1]:{p}", "[2002:7f00:1::]:{p}", "localhost:{p}", "LOCALHOST.:{p}",
    "169.254.169.254:80", "[::ffff:a9fe:a9fe]:80", "0.0.0.0:{p}", "0:{p}",
    "api.example.test@127.0.0.1:{p}", "meta.example.test:80", "lo.example.test:{p}",
    "mixed.example.test:{p}", "\uff11\uff12\uff17.0.0.1:{p}",
]  # fmt: skip


def test_every_bypass_spelling_refused(gateway: GatewayFactory, https_upstream: Upstream) -> None:
    resolver = CountingResolver({
        "meta.example.test": [["169.254.169.254"]], "lo.example.test": [["127.0.0.1"]],
        "mixed.example.test": [["93.184.216.34", "127.0.0.1"]],
        "localhost": [["127.0.0.1"]], "api.example.test": [["127.0.0.1"]],
    })  # fmt: skip
    h = gateway(NetworkPolicy.allow_internet(), unsafe=False, resolver=resolver)
    p = https_upstream.port
    before = len(https_upstream.records)
    for spelling in BYPASS:
        s, head = raw_connect(h.port, spelling.format(p=443 if "{p}" in spelling else p))
        s.close()
        assert head.startswith((b"HTTP/1.1 403", b"HTTP/1.1 400")), (spelling, head)
    assert len(https_upstream.records) == before
    reasons = _reasons(h, denied_only=True)
    assert "blocked_address:loopback" in reasons and "blocked_address:link_local" in reasons
    assert "blocked_address:unspecified" in reasons and "bad_target" in reasons


def test_allowed_name_resolving_to_metadata_refused(gateway: GatewayFactory) -> None:
    resolver = CountingResolver({"api.example.test": [["169.254.169.254"]]})
    h = gateway(NetworkPolicy(allow_out=["api.example.test"]), unsafe=False, resolver=resolver)
    s, head = raw_connect(h.port, "api.example.test:443")
    s.close()
    assert b"403" in head.split(b"\r\n")[0] and b"blocked_address:link_local" in head


def test_dns_rebinding_dials_the_checked_address(gateway: GatewayFactory, pki: LocalPKI) -> None:
    # Two servers on one port: 127.0.0.2 (first answer) and 127.0.0.1 (the rebind).
    first = start_upstream("127.0.0.2", None, "first")
    second = start_upstream("127.0.0.1", None, "second", port=first.port)
    try:
        resolver = CountingResolver({"rebind.example.test": [["127.0.0.2"], ["127.0.0.1"]]})
        h = gateway(NetworkPolicy(allow_out=[f"rebind.example.test:{first.port}"]),
                    resolver=resolver)  # fmt: skip
        with httpx.Client(proxy=h.proxy, timeout=10) as c:
            r = c.get(f"http://rebind.example.test:{first.port}/echo")
        assert r.json()["ident"] == "first"
        assert resolver.calls == ["rebind.example.test"]  # resolved exactly once
        assert second.records == []
    finally:
        first.stop()
        second.stop()


def test_name_not_resolved_when_denied(gateway: GatewayFactory) -> None:
    resolver = CountingResolver({"api.example.test": [["127.0.0.1"]]})
    h = gateway(NetworkPolicy(), resolver=resolver)
    s, head = raw_connect(h.port, "exfil-data-in-a-label.example.test:443")
    s.close()
    assert b"not_allowed" in head and resolver.calls == []


# -- SNI -------------------------------------------------------------------------------------


def _tls_through(port: int, target: str, sni: str | None, ca: str) -> bytes:
    s, head = raw_connect(port, target)
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=ca)
    if sni is None:
        ctx.check_hostname = False
    with ctx.wrap_socket(s, server_hostname=sni) as tls:
        tls.sendall(f"GET /echo HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
        return tls.recv(65536)


def test_sni_must_equal_connect_host(
    gateway: GatewayFactory, https_upstream: Upstream, pki: LocalPKI
) -> None:
    p = https_upstream.port
    h = gateway(NetworkPolicy(allow_out=[f"api.example.test:{p}", f"other.example.test:{p}"]))
    ca = str(pki.ca_file)
    assert b"200 OK" in _tls_through(h.port, f"api.example.test:{p}", "api.example.test", ca)
    for sni in ("other.example.test", None):
        with pytest.raises((ssl.SSLError, OSError)):
            _tls_through(h.port, f"api.example.test:{p}", sni, ca)
    denied = _reasons(h, denied_only=True)
    assert denied.count("sni_mismatch") == 1 and denied.count("sni_missing") == 1


def test_non_tls_bytes_to_443_refused(gateway: GatewayFactory) -> None:
    h = gateway(NetworkPolicy(allow_out=["api.example.test"]))
    s, head = raw_connect(h.port, "api.example.test:443")
    assert head.startswith(b"HTTP/1.1 200")
    s.sendall(b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
    assert s.recv(100) == b""
    s.close()
    assert _reasons(h, denied_only=True) == ["not_tls"]


# -- update_policy, caps ------------------------------------------------------------------------


def _get(sock: socket.socket, target: str) -> bytes:
    """One keep-alive GET /echo on an open socket; returns the whole response."""
    sock.sendall(f"GET /echo HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _open_tls(port: int, target: str, ca: str) -> ssl.SSLSocket:
    s, head = raw_connect(port, target)
    assert head.startswith(b"HTTP/1.1 200"), head
    tls = ssl.create_default_context(cafile=ca).wrap_socket(s, server_hostname=target.split(":")[0])
    assert b"200 OK" in _get(tls, target)
    return tls


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(100) == b""
    except (ssl.SSLError, ConnectionError):
        return True
    except TimeoutError:
        return False


def test_update_policy_cuts_open_tunnel(
    gateway: GatewayFactory, https_upstream: Upstream, pki: LocalPKI
) -> None:
    p = https_upstream.port
    h = gateway(NetworkPolicy(allow_out=[f"api.example.test:{p}", f"other.example.test:{p}"]))
    keep = _open_tls(h.port, f"other.example.test:{p}", str(pki.ca_file))
    cut = _open_tls(h.port, f"api.example.test:{p}", str(pki.ca_file))
    assert not _closed_within(cut, 0.3)  # control: open while allowed
    h.call(h.gw.update_policy({"allow_out": [f"other.example.test:{p}"]}))
    assert _closed_within(cut, 5)
    assert b"200 OK" in _get(keep, f"other.example.test:{p}")  # the allowed tunnel lives on
    keep.close()
    cut.close()
    time.sleep(0.2)
    assert any(r.endswith("closed:policy_updated") for r in _reasons(h))


def test_cap_concurrent_tunnels_under_flood(
    gateway: GatewayFactory, https_upstream: Upstream, pki: LocalPKI
) -> None:
    p = https_upstream.port
    h = gateway(_allow(p), max_tunnels=3, request_burst=1000, max_requests_per_second=1000.0)
    held = [_open_tls(h.port, f"api.example.test:{p}", str(pki.ca_file)) for _ in range(3)]
    refused = 0
    for _ in range(30):  # bounded flood
        s, head = raw_connect(h.port, f"api.example.test:{p}")
        s.close()
        refused += head.startswith(b"HTTP/1.1 429")
    assert refused == 30
    assert h.gw.stats()["open"] == 3
    for t in held:
        t.close()
    deadline = time.monotonic() + 5
    while h.gw.stats()["open"] and time.monotonic() < deadline:
        time.sleep(0.05)
    again = _open_tls(h.port, f"api.example.test:{p}", str(pki.ca_file))  # admitted again
    again.close()
    # flood refusals are audited, but rate-limited
    assert 1 <= _reasons(h).count("too_many_tunnels") <= 10


def test_cap_requests_per_second(gateway: GatewayFactory, http_upstream: Upstream) -> None:
    h = gateway(_allow(http_upstream.port), max_requests_per_second=1.0, request_burst=3)
    codes = []
    with httpx.Client(proxy=h.proxy, timeout=10) as c:
        for _ in range(8):
            codes.append(c.get(f"http://api.example.test:{http_upstream.port}/echo").status_code)
    assert codes[:3] == [200, 200, 200] and codes.count(429) >= 4


def test_cap_total_bytes(gateway: GatewayFactory, https_upstream: Upstream, pki: LocalPKI) -> None:
    p = https_upstream.port
    h = gateway(_allow(p), max_total_bytes=1 << 20)
    with (
        httpx.Client(proxy=h.proxy, verify=ssl.create_default_context(cafile=str(pki.ca_file)),
                     timeout=10) as c,
        pytest.raises(httpx.HTTPError),
    ):  # fmt: skip
        c.get(f"https://api.example.test:{p}/bytes/{8 << 20}")
    s, head = raw_connect(h.port, f"api.example.test:{p}")
    s.close()
    assert b"429" in head and b"byte_budget_exhausted" in head
    assert h.gw.stats()["bytes"] < 4 << 20


def test_cap_idle_and_total_time(
    gateway: GatewayFactory, https_upstream: Upstream, pki: LocalPKI
) -> None:
    p = https_upstream.port
    h = gateway(_allow(p), idle_timeout=0.5)
    t = _open_tls(h.port, f"api.example.test:{p}", str(pki.ca_file))
    start = time.monotonic()
    assert _closed_within(t, 5)
    assert 0.4 < time.monotonic() - start < 3
    t.close()
    h2 = gateway(_allow(p), max_tunnel_seconds=1.0)
    t = _open_tls(h2.port, f"api.example.test:{p}", str(pki.ca_file))
    start = time.monotonic()
    closed = False
    while time.monotonic() - start < 5 and not closed:  # busy tunnel: never idle
        try:
            closed = _get(t, f"api.example.test:{p}") == b""
        except (ssl.SSLError, OSError):
            closed = True
        time.sleep(0.1)
    assert closed and time.monotonic() - start < 3
    t.close()
    time.sleep(0.2)
    assert any("closed:idle_timeout" in r for r in _reasons(h))
    assert any("closed:tunnel_time_limit" in r for r in _reasons(h2))


def test_slowloris_head_times_out(gateway: GatewayFactory) -> None:
    h = gateway(NetworkPolicy(), handshake_timeout=0.5)
    with socket.create_connection(("127.0.0.1", h.port), timeout=5) as s:
        s.sendall(b"CONNECT api.example")
        start = time.monotonic()
        out = s.recv(1000)
        assert b"400" in out and time.monotonic() - start < 3
