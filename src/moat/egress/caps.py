"""Per-sandbox caps of the gateway and their configuration.

Trust domain: host engine. The caps keep one hostile or slow sandbox from exhausting the
host or its neighbours: concurrent tunnels, total bytes, requests per second, idle time and
total time per tunnel, header sizes and handshake time.
"""

from __future__ import annotations

import ipaddress
import math
import time
from dataclasses import dataclass

from moat.egress.addr import IPAddress
from moat.egress.resolve import Resolver
from moat.errors import InvalidArgumentError

__all__ = ["GatewayConfig", "TokenBucket"]


@dataclass(frozen=True)
class GatewayConfig:
    """Limits and knobs of one sandbox's gateway. Defaults suit a small shared host.

    ``unsafe_allow_private_ranges`` lets the gateway dial loopback, RFC 1918, CGNAT,
    link-local and ULA addresses (and the host's own): for tests and admins only; every
    gateway start with it logs a warning. ``upstream_ca_file`` replaces the system roots
    for verifying intercepted upstreams (tests). ``resolver`` replaces the system resolver;
    ``own_addresses`` replaces the discovered set of the host's own addresses.
    """

    max_tunnels: int = 64
    #: raw TCP tunnels (allow_tcp) open at once, within ``max_tunnels``
    max_tcp_tunnels: int = 16
    max_total_bytes: int = 8 << 30
    max_requests_per_second: float = 20.0
    request_burst: int = 40
    idle_timeout: float = 120.0
    max_tunnel_seconds: float = 3600.0
    connect_timeout: float = 10.0
    resolve_timeout: float = 5.0
    handshake_timeout: float = 10.0
    first_bytes_timeout: float = 1.0
    max_header_bytes: int = 64 * 1024
    unsafe_allow_private_ranges: bool = False
    upstream_ca_file: str | None = None
    resolver: Resolver | None = None
    own_addresses: frozenset[IPAddress] | None = None
    #: Networks whose addresses are dialled whatever their class (but unspecified, multicast
    #: and broadcast), for names the policy allows: a site's package mirror behind a private
    #: or reserved address (template builds, issue 12). Warned at every gateway start.
    unsafe_allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def __post_init__(self) -> None:
        ints = {
            "max_tunnels": (1, 100_000),
            "max_tcp_tunnels": (1, 100_000),
            "max_total_bytes": (1, 1 << 50),
            "request_burst": (1, 1_000_000),
            "max_header_bytes": (1024, 1 << 20),
        }
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise InvalidArgumentError(
                    f"GatewayConfig.{name} must be an integer in [{lo}, {hi}]"
                )
        for name in (
            "max_requests_per_second",
            "idle_timeout",
            "max_tunnel_seconds",
            "connect_timeout",
            "resolve_timeout",
            "handshake_timeout",
            "first_bytes_timeout",
        ):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or not 0 < v <= 86400 * 7
            ):
                raise InvalidArgumentError(f"GatewayConfig.{name} must be a positive number")
        if not isinstance(self.unsafe_allow_private_ranges, bool):
            raise InvalidArgumentError("GatewayConfig.unsafe_allow_private_ranges must be a bool")
        if not isinstance(self.unsafe_allow_networks, tuple) or not all(
            isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network))
            for n in self.unsafe_allow_networks
        ):
            raise InvalidArgumentError("GatewayConfig.unsafe_allow_networks must be networks")
        if self.upstream_ca_file is not None and not isinstance(self.upstream_ca_file, str):
            raise InvalidArgumentError("GatewayConfig.upstream_ca_file must be a path string")


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self) -> bool:
        """Take one token if there is one."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
