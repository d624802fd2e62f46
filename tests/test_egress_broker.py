"""Credential broker: secret validation, placeholders, scrubbing, the name-constrained CA."""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path

import pytest

from moat.egress import Secret
from moat.egress.broker import CertificateAuthority, Scrubber, SecretBroker
from moat.egress.policy import HostPattern
from moat.errors import InvalidArgumentError

VALUE = "sk-live-THE-REAL-VALUE-0123456789"


def test_secret_repr_hides_value() -> None:
    s = Secret(VALUE, hosts=["api.example.test"])
    assert VALUE not in repr(s) and VALUE not in str(s)


@pytest.mark.parametrize(
    ("value", "hosts", "header", "template"),
    [
        ("short", ["a.example.test"], "Authorization", "{value}"),
        ("has\nnewline-123", ["a.example.test"], "Authorization", "{value}"),
        (" leading-space", ["a.example.test"], "Authorization", "{value}"),
        (VALUE, [], "Authorization", "{value}"),
        (VALUE, "a.example.test", "Authorization", "{value}"),
        (VALUE, ["*.com"], "Authorization", "{value}"),
        (VALUE, ["127.0.0.1"], "Authorization", "{value}"),
        (VALUE, ["a.example.test"], "Bad Header", "{value}"),
        (VALUE, ["a.example.test"], "Authorization", "Bearer"),
        (VALUE, ["a.example.test"], "Authorization", "{value}{value}"),
        (VALUE, ["a.example.test"], "Authorization", "Bearer\r\n{value}"),
    ],
)
def test_secret_validation(value: str, hosts: object, header: str, template: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        Secret(value, hosts=hosts, header=header, template=template)  # type: ignore[arg-type]
    assert VALUE not in str(info.value)


def test_placeholders_random_and_substituted_only_for_bound_host() -> None:
    b1 = SecretBroker({"KEY": Secret(VALUE, hosts=["api.example.test"], template="Bearer {value}")})
    b2 = SecretBroker({"KEY": Secret(VALUE, hosts=["api.example.test"])})
    ph = b1.placeholders()["KEY"]
    assert ph != b2.placeholders()["KEY"] and VALUE not in ph
    hdrs = [(b"authorization", b"Bearer " + ph.encode()), (b"x-other", ph.encode())]
    out, used = b1.substitute(hdrs, "api.example.test")
    assert out[0] == (b"authorization", b"Bearer " + VALUE.encode())
    assert out[1] == (b"x-other", ph.encode())  # only the configured header
    assert used == ["KEY"]
    out, used = b1.substitute(hdrs, "other.example.test")
    assert out == hdrs and used == []
    # only in the template's exact shape: the value can't be smuggled into other text
    odd = [(b"authorization", b"Bearer junk " + ph.encode())]
    assert b1.substitute(odd, "api.example.test") == (odd, [])
    assert b1.foreign_placeholders(b"x" + ph.encode(), "other.example.test") == ["KEY"]
    assert b1.foreign_placeholders(ph.encode(), "api.example.test") == []
    assert b1.foreign_placeholders(ph.encode(), None) == ["KEY"]


def test_any_header_when_header_is_none() -> None:
    b = SecretBroker({"K": Secret(VALUE, hosts=["*.example.test"], header=None)})
    ph = b.placeholders()["K"].encode()
    out, used = b.substitute([(b"x-api-key", ph)], "a.example.test")
    assert out == [(b"x-api-key", VALUE.encode())] and used == ["K"]


def test_scrubber_catches_values_split_across_chunks() -> None:
    v = VALUE.encode()
    for cut in range(1, len(v)):
        s = Scrubber([v])
        chunks = [b"head " + v[:cut], v[cut:] + b" middle " + v[:3], v[3:] + b" tail"]
        out = b"".join(s.feed(c) for c in chunks) + s.flush()
        assert v not in out
        assert len(out) == sum(len(c) for c in chunks)  # same length: Content-Length holds
        assert s.hits == 2


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host: str) -> None:
    """An in-memory TLS handshake (no sockets) between two contexts."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=host)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (client, server):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    client.do_handshake()


def test_ca_name_constraints_limit_it_to_bound_hosts(tmp_path: Path) -> None:
    ca = CertificateAuthority("moat test", [HostPattern.parse("api.example.test")])
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem())
    assert b"PRIVATE" not in ca.cert_pem()
    client = ssl.create_default_context(cafile=str(ca_file))
    _handshake(ca.server_context("api.example.test"), client, "api.example.test")  # control
    _handshake(ca.server_context("v1.api.example.test"), client, "v1.api.example.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ca.server_context("bank.example"), client, "bank.example")


def test_server_context_leaves_no_temp_files() -> None:
    before = set(Path(tempfile.gettempdir()).glob("moat-ca-*"))
    ca = CertificateAuthority("moat test", [HostPattern.parse("api.example.test")])
    ca.server_context("api.example.test")
    assert set(Path(tempfile.gettempdir()).glob("moat-ca-*")) == before
