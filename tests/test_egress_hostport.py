"""Canonicalisation table: every bypass spelling lands on one canonical destination."""

from __future__ import annotations

import pytest

from moat.egress.hostport import HostKind, HostPort, parse_absolute_url, parse_authority
from moat.errors import InvalidArgumentError

V4, V6, NAME = HostKind.IPV4, HostKind.IPV6, HostKind.NAME

CANONICAL = [
    # names: case, trailing dot, IDNA
    ("Example.COM:443", HostPort("example.com", 443, NAME)),
    ("example.com.:443", HostPort("example.com", 443, NAME)),
    ("EXAMPLE.com.", HostPort("example.com", 443, NAME)),
    ("b\u00fccher.example:443", HostPort("xn--bcher-kva.example", 443, NAME)),
    ("xn--bcher-kva.example:443", HostPort("xn--bcher-kva.example", 443, NAME)),
    ("B\u00dcCHER.example", HostPort("xn--bcher-kva.example", 443, NAME)),
    ("localhost", HostPort("localhost", 443, NAME)),
    # IPv4 in every inet_aton spelling
    ("127.0.0.1:443", HostPort("127.0.0.1", 443, V4)),
    ("2130706433:443", HostPort("127.0.0.1", 443, V4)),
    ("0x7f000001:443", HostPort("127.0.0.1", 443, V4)),
    ("0X7F000001", HostPort("127.0.0.1", 443, V4)),
    ("0177.0.0.1", HostPort("127.0.0.1", 443, V4)),
    ("0177.0.0.01", HostPort("127.0.0.1", 443, V4)),
    ("127.1", HostPort("127.0.0.1", 443, V4)),
    ("127.0.1", HostPort("127.0.0.1", 443, V4)),
    ("0x7f.1", HostPort("127.0.0.1", 443, V4)),
    ("0xa9.0xfe.0xa9.0xfe", HostPort("169.254.169.254", 443, V4)),
    ("2852039166", HostPort("169.254.169.254", 443, V4)),
    ("169.254.169.254.", HostPort("169.254.169.254", 443, V4)),
    ("0", HostPort("0.0.0.0", 443, V4)),
    ("1.2.3.0x", HostPort("1.2.3.0", 443, V4)),  # WHATWG: a bare "0x" part is 0
    (
        "\uff11\uff12\uff17.\uff10.\uff10.\uff11",
        HostPort("127.0.0.1", 443, V4),
    ),  # full-width digits
    ("127\u30020\u30020\u30021", HostPort("127.0.0.1", 443, V4)),  # ideographic full stops
    # IPv6 in brackets, RFC 5952 output
    ("[::1]:443", HostPort("::1", 443, V6)),
    ("[0:0:0:0:0:0:0:1]", HostPort("::1", 443, V6)),
    ("[::FFFF:127.0.0.1]:443", HostPort("::ffff:7f00:1", 443, V6)),
    ("[::ffff:7f00:1]", HostPort("::ffff:7f00:1", 443, V6)),
    ("[2001:DB8::1]:8443", HostPort("2001:db8::1", 8443, V6)),
]


@pytest.mark.parametrize(("raw", "want"), CANONICAL)
def test_canonical_forms(raw: str, want: HostPort) -> None:
    assert parse_authority(raw, 443) == want


REFUSED = [
    "",
    "allowed.example@127.0.0.1:443",  # userinfo in an authority
    "example.com:0",
    "example.com:65536",
    "example.com:+443",
    "example.com:44 3",
    "::1",  # IPv6 without brackets
    "[::1",
    "[fe80::1%25eth0]:443",  # zone id
    "[::1]x",
    "exa mple.com",
    "exa_mple.com",
    "example.com%2e",
    "a..b",
    ".example.com",
    "example\\.com",
    "-bad-.example",
    "256.0.0.1",  # numeric last label but not an address: refused, never resolved
    "1.2.3.4.5",
    "0x100000000",
    "09.0.0.1",  # not octal
    "a" * 64 + ".example",
    ".".join(["a" * 60] * 5),
    "example.com\x00.evil",
]


@pytest.mark.parametrize("raw", REFUSED)
def test_refused_forms(raw: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_authority(raw, 443)


def test_port_required_for_connect() -> None:
    with pytest.raises(InvalidArgumentError):
        parse_authority("example.com", None)


URLS = [
    ("http://Example.com/a?b=1", ("http", HostPort("example.com", 80, NAME), "/a?b=1")),
    ("http://example.com", ("http", HostPort("example.com", 80, NAME), "/")),
    ("http://example.com?x", ("http", HostPort("example.com", 80, NAME), "/?x")),
    ("http://allowed.test@127.0.0.1/", ("http", HostPort("127.0.0.1", 80, V4), "/")),
    ("http://a@b@evil.test:8080/x", ("http", HostPort("evil.test", 8080, NAME), "/x")),
    ("HTTPS://[::1]/", ("https", HostPort("::1", 443, V6), "/")),
    ("http://0x7f.1:80/#frag", ("http", HostPort("127.0.0.1", 80, V4), "/")),
]


@pytest.mark.parametrize(("url", "want"), URLS)
def test_absolute_urls(url: str, want: tuple[str, HostPort, str]) -> None:
    assert parse_absolute_url(url) == want


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/", "example.com/", "//example.com/", "http://exa mple.com/",
     "http://allowed.test\\@evil.test/", "http:///x", "http://example.com:99999/"],
)  # fmt: skip
def test_absolute_urls_refused(url: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_absolute_url(url)


def test_error_text_does_not_echo_input() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse_authority("secret-looking-thing@127.0.0.1:443", 443)
    assert "secret-looking" not in str(info.value)
