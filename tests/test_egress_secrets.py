"""Credential broker end to end: placeholders in, values out, never seen or logged.

A real local HTTPS server (test CA) records what it receives; the client trusts only the
gateway's per-sandbox CA, as a sandbox would.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.rawfile import raw_bytes

from moat.egress import NetworkPolicy, Secret
from test_egress_support import GatewayFactory, LocalPKI, Upstream, make_pki

VALUE = "sk-live-REAL-SECRET-VALUE-7f3a9c"
OTHER_VALUE = "ghp-OTHER-REAL-VALUE-0042xyz"

pytest_plugins = ["test_egress_support"]  # shared fixtures (servers, PKI, gateway)


def _setup(gateway: GatewayFactory, port: int, plain_port: int | None = None):  # type: ignore[no-untyped-def]
    allow = [f"api.example.test:{port}", f"other.example.test:{port}"]
    if plain_port:
        allow += [f"api.example.test:{plain_port}", f"other.example.test:{plain_port}"]
    h = gateway(
        NetworkPolicy(allow_out=allow),
        secrets={
            "OPENAI_API_KEY": Secret(VALUE, hosts=["api.example.test"], template="Bearer {value}"),
            "GH_TOKEN": Secret(OTHER_VALUE, hosts=["other.example.test"], header="X-Token"),
        },
    )
    ctx = ssl.create_default_context(cadata=h.gw.ca_cert_pem().decode())
    return h, ctx


def _no_value_anywhere(h, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    for value in (VALUE, OTHER_VALUE):
        assert value not in caplog.text
        for suffix in ("", "-wal", "-shm"):
            f = Path(str(h.audit.path) + suffix)
            if f.exists():
                assert value.encode() not in raw_bytes(f)  # see tests/rawfile.py
        assert all(value not in str(r) for r in h.audit.query())


def test_placeholder_swapped_for_bound_host_and_scrubbed_back(
    gateway: GatewayFactory, https_upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="moat.egress")
    p = https_upstream.port
    h, ctx = _setup(gateway, p)
    ph = h.gw.placeholders()["OPENAI_API_KEY"]
    assert VALUE not in ph and VALUE.encode() not in h.gw.ca_cert_pem()
    with httpx.Client(proxy=h.proxy, verify=ctx, timeout=10) as c:
        r = c.get(f"https://api.example.test:{p}/echo", headers={"Authorization": f"Bearer {ph}"})
        # keep-alive: a second request on the same intercepted connection
        r2 = c.get(f"https://api.example.test:{p}/echo", headers={"Authorization": f"Bearer {ph}"})
    assert r.status_code == 200 and r2.status_code == 200
    got = [rec["headers"]["authorization"] for rec in https_upstream.records[-2:]]
    assert got == [f"Bearer {VALUE}"] * 2  # the server received the real value
    # ... and the sandbox never sees it: body and headers come back scrubbed
    assert VALUE not in r.text and VALUE not in str(r.headers)
    assert r.json()["auth"] == "Bearer " + "*" * len(VALUE)
    rows = h.audit.query(kind="egress")
    assert rows[0]["secret"] == "OPENAI_API_KEY" and rows[0]["reason"] == "intercepted"
    _no_value_anywhere(h, caplog)


def test_placeholder_to_another_host_refused_and_audited(
    gateway: GatewayFactory,
    https_upstream: Upstream,
    http_upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="moat.egress")
    p, pp = https_upstream.port, http_upstream.port
    h, ctx = _setup(gateway, p, pp)
    ph = h.gw.placeholders()["OPENAI_API_KEY"]
    before = (len(https_upstream.records), len(http_upstream.records))
    with httpx.Client(proxy=h.proxy, verify=ctx, timeout=10) as c:
        # to a host bound to another secret (intercepted), in the other secret's header
        r = c.get(f"https://other.example.test:{p}/echo", headers={"X-Token": ph})
        assert r.status_code == 403 and r.headers["x-moat-reason"] == "secret_exfiltration"
        # in the URL
        r = c.get(f"https://other.example.test:{p}/echo?k={ph}")
        assert r.status_code == 403

        # in a body, split over chunks
        def body() -> Iterator[bytes]:
            yield b"x" * 70000 + ph[:10].encode()
            yield ph[10:].encode() + b"tail"

        try:
            r = c.post(f"https://other.example.test:{p}/echo", content=body())
            assert r.status_code == 403
        except httpx.HTTPError:
            pass  # cut mid-body: also a refusal
        # over plain HTTP, even to its own bound host (never sent in clear)
        r = c.get(f"http://api.example.test:{pp}/echo", headers={"Authorization": f"Bearer {ph}"})
        assert r.status_code == 403 and r.headers["x-moat-reason"] == "secret_over_plaintext"
        r = c.get(f"http://other.example.test:{pp}/echo", headers={"X-Anything": ph})
        assert r.status_code == 403 and r.headers["x-moat-reason"] == "secret_exfiltration"
        # control: the other secret works on its own host
        gh = h.gw.placeholders()["GH_TOKEN"]
        r = c.get(f"https://other.example.test:{p}/echo", headers={"X-Token": gh})
        assert r.status_code == 200
    assert https_upstream.records[-1]["headers"]["x-token"] == OTHER_VALUE
    # Only the control and the head of the cut POST reached the server, never the placeholder
    # (the body was cut before its last byte; its head left before the body was seen).
    new = https_upstream.records[before[0] :]
    assert [r["method"] for r in new] == ["POST", "GET"]
    assert all(ph not in str(r) for r in new)
    assert len(http_upstream.records) == before[1]
    denied = h.audit.query(denied_only=True)
    assert {r["secret"] for r in denied} == {"OPENAI_API_KEY"}
    assert sum(r["reason"] == "secret_exfiltration" for r in denied) >= 4
    assert any("secret_exfiltration" in m for m in caplog.messages)
    _no_value_anywhere(h, caplog)


def test_unbound_host_is_not_intercepted(gateway: GatewayFactory, https_upstream: Upstream) -> None:
    p = https_upstream.port
    h = gateway(
        NetworkPolicy(allow_out=[f"api.example.test:{p}", f"other.example.test:{p}"]),
        secrets={"K": Secret(VALUE, hosts=["api.example.test"])},
    )
    # The gateway CA is name-constrained to api.example.test; other hosts keep the real chain.
    gw_ca = ssl.create_default_context(cadata=h.gw.ca_cert_pem().decode())
    with (
        httpx.Client(proxy=h.proxy, verify=gw_ca, timeout=10) as c,
        pytest.raises(httpx.ConnectError),
    ):
        c.get(f"https://other.example.test:{p}/echo")


def test_upstream_verified_against_configured_roots(
    gateway: GatewayFactory,
    https_upstream: Upstream,
    pki: LocalPKI,
    tmp_path: Path,
) -> None:

    wrong = make_pki(tmp_path)  # a CA that did not sign the upstream's certificate
    p = https_upstream.port
    h = gateway(NetworkPolicy(allow_out=[f"api.example.test:{p}"]),
                secrets={"K": Secret(VALUE, hosts=["api.example.test"])},
                upstream_ca_file=str(wrong.ca_file))  # fmt: skip
    ctx = ssl.create_default_context(cadata=h.gw.ca_cert_pem().decode())
    before = len(https_upstream.records)
    with httpx.Client(proxy=h.proxy, verify=ctx, timeout=10) as c:
        r = c.get(f"https://api.example.test:{p}/echo", headers={"Authorization": "x"})
    assert r.status_code == 502 and r.headers["x-moat-reason"] == "upstream_tls_failed"
    assert len(https_upstream.records) == before


def test_intercepted_host_header_must_match(
    gateway: GatewayFactory, https_upstream: Upstream
) -> None:
    p = https_upstream.port
    h, ctx = _setup(gateway, p)
    with httpx.Client(proxy=h.proxy, verify=ctx, timeout=10) as c:
        r = c.get(f"https://api.example.test:{p}/echo", headers={"Host": f"other.example.test:{p}"})
    assert r.status_code == 403 and r.headers["x-moat-reason"] == "host_mismatch"
