"""Address classification: boundary table, just inside and just outside every range."""

from __future__ import annotations

import pytest

from moat.egress.addr import AddrClass, classify

P = AddrClass.PUBLIC
BOUNDARIES = [
    # (just outside below, first, last, just outside above, class)
    ("9.255.255.255", "10.0.0.0", "10.255.255.255", "11.0.0.0", AddrClass.PRIVATE),
    ("172.15.255.255", "172.16.0.0", "172.31.255.255", "172.32.0.0", AddrClass.PRIVATE),
    ("192.167.255.255", "192.168.0.0", "192.168.255.255", "192.169.0.0", AddrClass.PRIVATE),
    ("100.63.255.255", "100.64.0.0", "100.127.255.255", "100.128.0.0", AddrClass.CGNAT),
    ("169.253.255.255", "169.254.0.0", "169.254.255.255", "169.255.0.0", AddrClass.LINK_LOCAL),
    ("126.255.255.255", "127.0.0.0", "127.255.255.255", "128.0.0.0", AddrClass.LOOPBACK),
    ("223.255.255.255", "224.0.0.0", "239.255.255.255", None, AddrClass.MULTICAST),
    (None, "0.0.0.0", "0.255.255.255", "1.0.0.0", AddrClass.UNSPECIFIED),
    ("198.17.255.255", "198.18.0.0", "198.19.255.255", "198.20.0.0", AddrClass.RESERVED),
    ("192.0.1.255", "192.0.2.0", "192.0.2.255", "192.0.3.0", AddrClass.RESERVED),
    ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "fc00::", "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
     None, AddrClass.ULA),
    (None, "fe80::", "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None, AddrClass.LINK_LOCAL),
    (None, "ff00::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None, AddrClass.MULTICAST),
]  # fmt: skip


@pytest.mark.parametrize(("below", "first", "last", "above", "cls"), BOUNDARIES)
def test_boundaries(
    below: str | None, first: str, last: str, above: str | None, cls: AddrClass
) -> None:
    assert classify(first) is cls
    assert classify(last) is cls
    if below is not None:
        assert classify(below) is not cls
    if above is not None:
        assert classify(above) is not cls


SINGLE = [
    ("255.255.255.255", AddrClass.BROADCAST),
    ("255.255.255.254", AddrClass.RESERVED),  # 240/4
    ("239.255.255.255", AddrClass.MULTICAST),
    ("240.0.0.0", AddrClass.RESERVED),
    ("169.254.169.254", AddrClass.LINK_LOCAL),
    ("8.8.8.8", P),
    ("1.1.1.1", P),
    ("93.184.216.34", P),
    ("::", AddrClass.UNSPECIFIED),
    ("::1", AddrClass.LOOPBACK),
    ("::2", AddrClass.UNSPECIFIED),  # IPv4-compatible ::0.0.0.2
    ("2606:4700:4700::1111", P),
    ("2001:db8::1", AddrClass.RESERVED),
    ("1::", AddrClass.RESERVED),  # outside 2000::/3
    # IPv4-embedded IPv6 forms
    ("::ffff:127.0.0.1", AddrClass.LOOPBACK),
    ("::ffff:169.254.169.254", AddrClass.LINK_LOCAL),
    ("::ffff:10.0.0.1", AddrClass.PRIVATE),
    ("::ffff:8.8.8.8", P),
    ("::127.0.0.1", AddrClass.LOOPBACK),  # IPv4-compatible
    ("::ffff:0:10.1.2.3", AddrClass.PRIVATE),  # IPv4-translated
    ("64:ff9b::7f00:1", AddrClass.LOOPBACK),  # NAT64
    ("64:ff9b::a9fe:a9fe", AddrClass.LINK_LOCAL),
    ("64:ff9b::808:808", P),
    ("64:ff9b:1::c0a8:1", AddrClass.PRIVATE),  # local-use NAT64
    ("2002:7f00:1::", AddrClass.LOOPBACK),  # 6to4
    ("2002:a9fe:a9fe::1", AddrClass.LINK_LOCAL),
    ("2002:c0a8:0101::", AddrClass.PRIVATE),
    ("2002:0808:0808::", P),
    # Teredo: server 65.54.227.120; client 127.0.0.1 stored inverted (80ff:fffe)
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", AddrClass.LOOPBACK),
    ("2001:0:0a00:0001:8000:63bf:f7f7:f7f7", AddrClass.PRIVATE),  # server 10.0.0.1
    ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", P),  # 8.8.8.8 both
    ("fe80::1%eth0", AddrClass.LINK_LOCAL),
]


@pytest.mark.parametrize(("addr", "cls"), SINGLE)
def test_single_addresses(addr: str, cls: AddrClass) -> None:
    assert classify(addr) is cls
