"""Network policies and the pure egress decision.

Trust domain: host engine, pure (no I/O). Policies come from the caller (trusted but
validated: a typo must not open the internet); destinations come from the sandbox (hostile)
and are already canonical :class:`~moat.egress.hostport.HostPort` values.

Pattern syntax (``allow_out`` / ``deny_out`` entries):

- ``pypi.org``: exactly that host, ports 80 and 443;
- ``*.pythonhosted.org``: any name *below* pythonhosted.org (not the apex), ports 80/443;
- ``api.example.com:8443``: that host on that port only (also ``*.x.org:8443``);
- an IP literal (``93.184.216.34``, ``[2606:2800::1]:443``): that address.

Refused: ``*``, a wildcard over a public suffix (``*.com``, ``*.co.uk``, ``*.github.io``),
wildcards not at the start, userinfo, paths and anything :func:`parse_authority` refuses.

``allow_tcp`` entries open raw TCP (issue 15: ssh, git over SSH, databases) through the
sandbox's SOCKS5 or CONNECT endpoint; they take the same syntax but an explicit port is
always required (``github.com:22``, ``*.db.example.com:5432``). ``deny_out`` wins over them
too, and ``internet_access`` never opens raw TCP.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from publicsuffixlist import PublicSuffixList

from moat.egress.addr import AddrClass, IPAddress, classify
from moat.egress.hostport import HostKind, HostPort, parse_authority
from moat.errors import InvalidArgumentError, PolicyError

__all__ = [
    "DEFAULT_PORTS",
    "Decision",
    "HostPattern",
    "NetworkPolicy",
    "Verdict",
    "decide",
    "decide_name",
    "decide_tcp_name",
]

#: Ports a pattern without an explicit port stands for.
DEFAULT_PORTS = frozenset({80, 443})
_MAX_RULES = 1024


@functools.cache
def _psl() -> PublicSuffixList:
    # Cache (the only module-level state): the bundled list takes ~50 ms to load.
    return PublicSuffixList()


@dataclass(frozen=True)
class HostPattern:
    """One validated allow/deny entry. ``wildcard`` means "strict subdomains of host"."""

    host: str
    wildcard: bool
    ports: frozenset[int]
    kind: HostKind

    @classmethod
    def parse(cls, text: object) -> HostPattern:
        """Parse and validate one pattern; raises PolicyError."""
        if not isinstance(text, str) or not text.strip() or len(text) > 300:
            raise PolicyError("network pattern must be a non-empty string")
        raw = text.strip()
        wildcard = raw.startswith("*.")
        body = raw[2:] if wildcard else raw
        if "*" in body:
            raise PolicyError("a wildcard is only allowed as a leading '*.' label")
        if any(c in body for c in "/?#@ \\"):
            raise PolicyError("network patterns are host[:port], without scheme, path or user")
        try:
            dest = parse_authority(body, 0)
        except InvalidArgumentError as exc:
            raise PolicyError("invalid network pattern") from exc
        if wildcard and dest.kind is not HostKind.NAME:
            raise PolicyError("wildcards apply to names, not addresses")
        if wildcard and (_psl().is_public(dest.host) or "." not in dest.host):
            raise PolicyError("wildcard over a public suffix is too broad")
        ports = DEFAULT_PORTS if dest.port == 0 else frozenset({dest.port})
        return cls(dest.host, wildcard, ports, dest.kind)

    def matches(self, dest: HostPort) -> bool:
        """Whether this pattern covers a canonical destination."""
        if dest.port not in self.ports:
            return False
        if self.wildcard:
            return dest.kind is HostKind.NAME and dest.host.endswith("." + self.host)
        return dest.host == self.host

    def matches_host(self, host: str) -> bool:
        """Whether this pattern covers ``host`` on any of its ports."""
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.kind is HostKind.IPV6 else self.host
        host = f"*.{host}" if self.wildcard else host
        if self.ports == DEFAULT_PORTS:
            return host
        return f"{host}:{next(iter(self.ports))}"


def _patterns(items: object, what: str) -> tuple[HostPattern, ...]:
    if items is None:
        return ()
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise PolicyError(f"{what} must be a list of host patterns")
    out = tuple(p if isinstance(p, HostPattern) else HostPattern.parse(p) for p in items)
    if len(out) > _MAX_RULES:
        raise PolicyError(f"{what} has too many entries")
    return out


@dataclass(frozen=True)
class NetworkPolicy:
    """Which destinations a sandbox may reach. The default allows nothing.

    ``internet_access=True`` (or :meth:`allow_internet`, E2B's ``allow_internet_access``)
    allows any public host on ports 80/443; the blocked address ranges of invariant 2 stay
    blocked, and ``deny_out`` still applies.
    """

    allow_out: tuple[HostPattern, ...] = ()
    deny_out: tuple[HostPattern, ...] = ()
    internet_access: bool = False
    #: raw TCP destinations (explicit ports only)
    allow_tcp: tuple[HostPattern, ...] = ()

    def __init__(
        self,
        allow_out: Iterable[str | HostPattern] | None = None,
        deny_out: Iterable[str | HostPattern] | None = None,
        internet_access: bool = False,
        allow_tcp: Iterable[str | HostPattern] | None = None,
    ) -> None:
        if not isinstance(internet_access, bool):
            raise PolicyError("internet_access must be a bool")
        object.__setattr__(self, "allow_out", _patterns(allow_out, "allow_out"))
        object.__setattr__(self, "deny_out", _patterns(deny_out, "deny_out"))
        object.__setattr__(self, "internet_access", internet_access)
        tcp = _patterns(allow_tcp, "allow_tcp")
        for pattern in tcp:
            if pattern.ports == DEFAULT_PORTS:  # what a pattern without a port stands for
                raise PolicyError(f"allow_tcp entry {str(pattern)[:80]!r} needs an explicit port")
        object.__setattr__(self, "allow_tcp", tcp)

    @classmethod
    def parse(cls, value: NetworkPolicy | Mapping[str, Any] | None) -> NetworkPolicy:
        """Accept a NetworkPolicy, a plain dict with the same keys, or None (deny all)."""
        if value is None:
            return cls()
        if isinstance(value, NetworkPolicy):
            return value
        if not isinstance(value, Mapping):
            raise PolicyError("network policy must be a NetworkPolicy or a dict")
        unknown = set(value) - {"allow_out", "deny_out", "internet_access", "allow_tcp"}
        if unknown:
            raise PolicyError(
                "unknown network policy keys: " + ", ".join(sorted(map(str, unknown)))
            )
        return cls(
            value.get("allow_out"),
            value.get("deny_out"),
            value.get("internet_access", False),
            value.get("allow_tcp"),
        )

    @classmethod
    def allow_internet(cls, deny_out: Iterable[str] | None = None) -> NetworkPolicy:
        """Any public host on ports 80/443 (the private ranges stay closed)."""
        return cls(deny_out=deny_out, internet_access=True)

    @classmethod
    def deny_all(cls) -> NetworkPolicy:
        """Nothing at all (the default)."""
        return cls()

    def to_dict(self) -> dict[str, Any]:
        """The policy as a plain dict (round-trips through :meth:`parse`)."""
        return {
            "allow_out": [str(p) for p in self.allow_out],
            "deny_out": [str(p) for p in self.deny_out],
            "internet_access": self.internet_access,
            "allow_tcp": [str(p) for p in self.allow_tcp],
        }


class Verdict(StrEnum):
    """Outcome of a decision (not ``moat.Result``, a displayed value of run_code)."""

    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True)
class Decision:
    """A decision and its reason (a short stable token, safe for logs and models)."""

    result: Verdict
    reason: str
    addresses: tuple[IPAddress, ...] = field(default=())

    @property
    def allowed(self) -> bool:
        """True if the destination may be dialled."""
        return self.result is Verdict.ALLOW


def decide_tcp_name(policy: NetworkPolicy, dest: HostPort) -> Decision:
    """Decide a raw TCP destination (SOCKS5, or CONNECT carrying bytes that aren't TLS to an
    ``allow_tcp`` entry) on its canonical name, before any DNS query:

    1. ``deny_out`` matches -> DENY ``denied_by_policy``
    2. ``allow_tcp`` matches -> ALLOW ``allowed_tcp``
    3. otherwise -> DENY ``tcp_not_allowed`` (``internet_access`` never opens raw TCP)
    """
    if any(p.matches(dest) for p in policy.deny_out):
        return Decision(Verdict.DENY, "denied_by_policy")
    if any(p.matches(dest) for p in policy.allow_tcp):
        return Decision(Verdict.ALLOW, "allowed_tcp")
    return Decision(Verdict.DENY, "tcp_not_allowed")


def decide_name(policy: NetworkPolicy, dest: HostPort) -> Decision:
    """Decide on the canonical name alone, before any DNS query.

    Order of checks (first match wins):

    1. ``deny_out`` matches -> DENY ``denied_by_policy``
    2. ``allow_out`` matches -> ALLOW ``allowed_by_rule``
    3. ``internet_access`` and the port is 80/443 -> ALLOW ``internet_access``
    4. otherwise -> DENY ``not_allowed``

    Names are decided before resolving so that a denied name never reaches a resolver
    (a DNS query is itself an exfiltration channel).
    """
    if any(p.matches(dest) for p in policy.deny_out):
        return Decision(Verdict.DENY, "denied_by_policy")
    if any(p.matches(dest) for p in policy.allow_out):
        return Decision(Verdict.ALLOW, "allowed_by_rule")
    if policy.internet_access and dest.port in DEFAULT_PORTS:
        return Decision(Verdict.ALLOW, "internet_access")
    return Decision(Verdict.DENY, "not_allowed")


#: Classes that stay closed even with ``unsafe_allow_private_ranges``: they are never a
#: meaningful unicast destination (0.0.0.0 even reaches the host's own services).
_NEVER = frozenset(
    {AddrClass.UNSPECIFIED, AddrClass.MULTICAST, AddrClass.BROADCAST, AddrClass.RESERVED}
)


def _unmapped(a: IPAddress) -> IPAddress:
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def decide(
    policy: NetworkPolicy,
    dest: HostPort,
    addresses: Iterable[IPAddress],
    *,
    unsafe_allow_private_ranges: bool = False,
    own_addresses: frozenset[IPAddress] = frozenset(),
    tcp: bool = False,
    unsafe_allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
) -> Decision:
    """The full decision for a destination and every address it resolved to (``tcp``: a
    raw TCP destination, decided by :func:`decide_tcp_name` in step 1).

    Order of checks (first match wins):

    1. :func:`decide_name` (deny_out, allow_out, internet_access, default deny)
    2. no address at all -> DENY ``no_address``
    3. an address in a class that is never dialled (unspecified, multicast, broadcast,
       reserved) -> DENY ``blocked_address:<class>``
    4. an address that is not PUBLIC (loopback, RFC 1918, CGNAT, link-local, ULA and their
       IPv4-embedded IPv6 forms) -> DENY ``blocked_address:<class>`` (skipped with
       ``unsafe_allow_private_ranges``)
    5. a public address that is one of the host's own -> DENY ``own_address`` (skipped with
       ``unsafe_allow_private_ranges``)
    6. ALLOW with the reason of step 1 and the addresses in resolver order; the caller dials
       ``addresses[0]`` and nothing else.

    One bad address refuses the whole name (a resolver mixing 127.0.0.1 into an answer is
    hostile), so the pinned address never depends on which answer is picked.

    An address inside one of ``unsafe_allow_networks`` skips steps 3 to 5 unless it is
    unspecified, multicast or broadcast (an admin's declared mirror; issue 12).
    """
    verdict = decide_tcp_name(policy, dest) if tcp else decide_name(policy, dest)
    if not verdict.allowed:
        return verdict
    addrs = tuple(ipaddress.ip_address(a) if isinstance(a, str) else a for a in addresses)
    if not addrs:
        return Decision(Verdict.DENY, "no_address")
    if unsafe_allow_networks and all(
        classify(a) not in _NEVER - {AddrClass.RESERVED}
        and any(_unmapped(a) in n for n in unsafe_allow_networks)
        for a in addrs
    ):
        return Decision(Verdict.ALLOW, verdict.reason, addrs)
    for a in addrs:
        cls = classify(a)
        if cls in _NEVER:
            return Decision(Verdict.DENY, f"blocked_address:{cls.value}")
    if not unsafe_allow_private_ranges:
        for a in addrs:
            cls = classify(a)
            if cls is not AddrClass.PUBLIC:
                return Decision(Verdict.DENY, f"blocked_address:{cls.value}")
        if any(_unmapped(a) in own_addresses or a in own_addresses for a in addrs):
            return Decision(Verdict.DENY, "own_address")
    return Decision(Verdict.ALLOW, verdict.reason, addrs)
