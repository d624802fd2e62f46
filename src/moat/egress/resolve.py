"""Resolve a canonical name once; the gateway then dials exactly what was checked.

Trust domain: host engine. The resolver's answers are untrusted (a hostile DNS server can
answer 127.0.0.1 or 169.254.169.254, or change its answer between two queries: DNS
rebinding). So the gateway resolves each destination exactly once per connection, has every
answer classified by :func:`moat.egress.policy.decide`, and connects to the first answer by
address. Nothing downstream ever sees the name again except as TLS SNI / Host header.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from moat.egress.addr import IPAddress
from moat.egress.hostport import HostPort

__all__ = ["Resolver", "StaticResolver", "SystemResolver", "host_addresses", "resolve_once"]

_MAX_ANSWERS = 32


@runtime_checkable
class Resolver(Protocol):
    """Anything that turns a canonical name into addresses (injectable for tests)."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """All addresses of ``host`` (an A-label name); empty or OSError if none."""
        ...


class SystemResolver:
    """The host's resolver (``getaddrinfo``), TCP stream answers only, deduplicated."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Resolve through the event loop's ``getaddrinfo`` (a thread)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        out: list[IPAddress] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            ip = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
            if ip not in out:
                out.append(ip)
        return out


class StaticResolver:
    """A fixed name -> addresses table (for tests and air-gapped admins). Unknown: no answer."""

    def __init__(self, table: Mapping[str, Iterable[str]]) -> None:
        self._table = {k.lower(): [ipaddress.ip_address(a) for a in v] for k, v in table.items()}

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The table's answer for ``host``."""
        return list(self._table.get(host, []))


async def resolve_once(dest: HostPort, resolver: Resolver, timeout: float) -> list[IPAddress]:
    """The addresses of ``dest``: the literal itself, or one bounded resolver query.

    Returns an empty list on any resolver failure (the policy then says ``no_address``).
    """
    if dest.is_ip:
        return [ipaddress.ip_address(dest.host)]
    try:
        async with asyncio.timeout(timeout):
            answers = await resolver.resolve(dest.host, dest.port)
    except (OSError, TimeoutError, UnicodeError, ValueError):
        return []
    out: list[IPAddress] = []
    for a in list(answers)[:_MAX_ANSWERS]:
        ip = ipaddress.ip_address(a) if isinstance(a, str) else a
        if not isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return []
        out.append(ip)
    return out


_OWN_CACHE: dict[str, tuple[float, frozenset[IPAddress]]] = {}
_OWN_TTL = 30.0


def host_addresses() -> frozenset[IPAddress]:
    """The host's own local addresses (Linux /proc), cached for 30 s.

    A public address of the host itself would otherwise let a sandbox reach services the
    host binds on 0.0.0.0.
    """
    now = time.monotonic()
    cached = _OWN_CACHE.get("own")
    if cached and now - cached[0] < _OWN_TTL:
        return cached[1]
    found: set[IPAddress] = set()
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for prev, line in itertools.pairwise(lines):
            if line.strip() == "/32 host LOCAL":
                text = prev.strip().split()[-1]
                found.add(ipaddress.IPv4Address(text))
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            hexaddr = line.split()[0]
            found.add(ipaddress.IPv6Address(int(hexaddr, 16)))
    except (OSError, ValueError, IndexError):
        pass
    result = frozenset(found)
    _OWN_CACHE["own"] = (now, result)
    return result
