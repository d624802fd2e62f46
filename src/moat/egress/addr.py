"""Classify IP addresses: may the gateway dial this one?

Trust domain: host engine, pure. The classifier is the last line of invariant 2: whatever
the policy says about a *name*, an address in any of these ranges is never dialled (unless
the gateway runs with ``unsafe_allow_private_ranges``). IPv6 forms that embed an IPv4
address (IPv4-mapped ``::ffff:0:0/96``, IPv4-compatible ``::/96``, IPv4-translated
``::ffff:0:0:0/96``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``, 6to4 ``2002::/16``,
Teredo ``2001::/32``) are classified by the IPv4 address they carry, so ``::ffff:127.0.0.1``
is LOOPBACK and ``2002:a9fe:a9fe::`` is LINK_LOCAL.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum

__all__ = ["AddrClass", "IPAddress", "classify", "embedded_ipv4"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddrClass(StrEnum):
    """The class of an address. Only PUBLIC is dialled by default."""

    PUBLIC = "public"
    LOOPBACK = "loopback"
    PRIVATE = "private"  # RFC 1918
    CGNAT = "cgnat"  # 100.64.0.0/10
    LINK_LOCAL = "link_local"  # 169.254/16 (cloud metadata), fe80::/10
    ULA = "ula"  # fc00::/7
    MULTICAST = "multicast"
    UNSPECIFIED = "unspecified"  # 0.0.0.0/8, ::
    BROADCAST = "broadcast"  # 255.255.255.255
    RESERVED = "reserved"  # documentation, benchmarking, 240/4, protocol assignments, ...


def _nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Order matters: the first matching row wins (broadcast before 240/4).
_V4_TABLE: tuple[
    tuple[AddrClass, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]], ...
] = (
    (AddrClass.BROADCAST, _nets("255.255.255.255/32")),
    (AddrClass.UNSPECIFIED, _nets("0.0.0.0/8")),
    (AddrClass.LOOPBACK, _nets("127.0.0.0/8")),
    (AddrClass.PRIVATE, _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")),
    (AddrClass.CGNAT, _nets("100.64.0.0/10")),
    (AddrClass.LINK_LOCAL, _nets("169.254.0.0/16")),
    (AddrClass.MULTICAST, _nets("224.0.0.0/4")),
    (
        AddrClass.RESERVED,
        _nets(
            "192.0.0.0/24",  # IETF protocol assignments (incl. DS-Lite 192.0.0.0/29)
            "192.0.2.0/24",  # TEST-NET-1
            "198.51.100.0/24",  # TEST-NET-2
            "203.0.113.0/24",  # TEST-NET-3
            "198.18.0.0/15",  # benchmarking
            "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
            "240.0.0.0/4",  # reserved for future use
        ),
    ),
)

_V6_TABLE: tuple[
    tuple[AddrClass, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]], ...
] = (
    (AddrClass.UNSPECIFIED, _nets("::/128")),
    (AddrClass.LOOPBACK, _nets("::1/128")),
    (AddrClass.LINK_LOCAL, _nets("fe80::/10")),
    (AddrClass.ULA, _nets("fc00::/7")),
    (AddrClass.MULTICAST, _nets("ff00::/8")),
    (
        AddrClass.RESERVED,
        _nets(
            "fec0::/10",  # deprecated site-local
            "100::/64",  # discard-only
            "2001:db8::/32",  # documentation
            "2001:10::/28",  # ORCHID
            "2001:20::/28",  # ORCHIDv2
            "3fff::/20",  # documentation (RFC 9637)
            "5f00::/16",  # SRv6 SIDs
            "2001:2::/48",  # benchmarking
        ),
    ),
)

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPAT = ipaddress.IPv6Network("::/96")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_6TO4 = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (empty if it is not an embedding form)."""
    value = int(addr)
    low32 = ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if addr in _MAPPED or addr in _TRANSLATED or addr in _NAT64 or addr in _NAT64_LOCAL:
        return [low32]
    if addr in _COMPAT and value > 1:  # ::/128 and ::1 are not embeddings
        return [low32]
    if addr in _6TO4:
        return [ipaddress.IPv4Address((value >> 80) & 0xFFFFFFFF)]
    if addr in _TEREDO:
        server = ipaddress.IPv4Address((value >> 64) & 0xFFFFFFFF)
        client = ipaddress.IPv4Address(~value & 0xFFFFFFFF)  # stored inverted (RFC 4380)
        return [server, client]
    return []


def _lookup(addr: IPAddress) -> AddrClass | None:
    table = _V4_TABLE if isinstance(addr, ipaddress.IPv4Address) else _V6_TABLE
    for cls, nets in table:
        if any(addr in net for net in nets):
            return cls
    return None


def classify(addr: IPAddress | str) -> AddrClass:
    """Classify one address. Embedded IPv4 forms get the first non-public class they carry."""
    ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return AddrClass.LINK_LOCAL
        direct = _lookup(ip)
        if direct is not None:
            return direct
        carried = embedded_ipv4(ip)
        for v4 in carried:
            cls = classify(v4)
            if cls is not AddrClass.PUBLIC:
                return cls
        if not carried and ip not in _GLOBAL_UNICAST:
            return AddrClass.RESERVED  # unallocated outside 2000::/3
        return AddrClass.PUBLIC
    found = _lookup(ip)
    return AddrClass.PUBLIC if found is None else found
