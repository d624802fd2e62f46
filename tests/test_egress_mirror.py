"""``unsafe_allow_networks``: a site's package mirror on a private or reserved address, for
template builds (issue 12). It widens the address check for names the policy allows, and
nothing else (invariant 2)."""

from __future__ import annotations

import ipaddress

import pytest

from moat.egress import GatewayConfig, NetworkPolicy, Verdict, decide
from moat.egress.hostport import parse_authority
from moat.errors import InvalidArgumentError

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
MIRROR: tuple[Net, ...] = (
    ipaddress.ip_network("203.0.113.80/32"),
    ipaddress.ip_network("10.1.0.0/16"),
)
POLICY = NetworkPolicy(allow_out=["deb.debian.org"])


def _decide(host: str, *addrs: str, nets: tuple[Net, ...] = MIRROR) -> tuple[Verdict, str]:
    d = decide(
        POLICY,
        parse_authority(f"{host}:80"),
        [ipaddress.ip_address(a) for a in addrs],
        unsafe_allow_networks=nets,
    )
    return d.result, d.reason


@pytest.mark.parametrize(
    ("host", "addrs", "want"),
    [
        ("deb.debian.org", ["203.0.113.80"], (Verdict.ALLOW, "allowed_by_rule")),
        ("deb.debian.org", ["10.1.255.255"], (Verdict.ALLOW, "allowed_by_rule")),
        # just outside each network: the usual classes apply
        ("deb.debian.org", ["203.0.113.81"], (Verdict.DENY, "blocked_address:reserved")),
        ("deb.debian.org", ["10.2.0.0"], (Verdict.DENY, "blocked_address:private")),
        # one answer outside: the whole answer is judged without the widening
        (
            "deb.debian.org",
            ["203.0.113.80", "127.0.0.1"],
            (Verdict.DENY, "blocked_address:reserved"),
        ),
        # names the policy does not allow stay refused before any address is looked at
        ("example.com", ["203.0.113.80"], (Verdict.DENY, "not_allowed")),
    ],
)
def test_only_allowed_names_reach_only_the_declared_networks(
    host: str, addrs: list[str], want: tuple[Verdict, str]
) -> None:
    assert _decide(host, *addrs) == want


def test_without_the_option_the_mirror_is_refused() -> None:
    assert _decide("deb.debian.org", "203.0.113.80", nets=()) == (
        Verdict.DENY,
        "blocked_address:reserved",
    )


def test_multicast_stays_closed_even_inside_a_declared_network() -> None:
    nets = (ipaddress.ip_network("224.0.0.0/4"),)
    assert _decide("deb.debian.org", "224.0.0.1", nets=nets)[0] is Verdict.DENY


def test_config_checks_the_type() -> None:
    with pytest.raises(InvalidArgumentError):
        GatewayConfig(unsafe_allow_networks=("203.0.113.80/32",))  # type: ignore[arg-type]
    assert GatewayConfig(unsafe_allow_networks=MIRROR).unsafe_allow_networks == MIRROR
