"""Policy parsing and the pure decision, in the documented order of checks."""

from __future__ import annotations

import ipaddress

import pytest

from moat.egress import Decision, NetworkPolicy, Verdict, decide, decide_name
from moat.egress.hostport import parse_authority
from moat.errors import PolicyError

PUBLIC = [ipaddress.ip_address("93.184.216.34")]


def d(authority: str):  # type: ignore[no-untyped-def]
    return parse_authority(authority, 443)


@pytest.mark.parametrize(
    "pattern",
    ["*", "*.com", "*.co.uk", "*.github.io", "*.test", "a.*.com", "*example.com", "",
     "https://pypi.org", "pypi.org/simple", "user@pypi.org", "*.1.2.3.4", "pypi.org:0", "   ",
     "*.[::1]", "bad_host.example"],
)  # fmt: skip
def test_bad_patterns_refused(pattern: str) -> None:
    with pytest.raises(PolicyError):
        NetworkPolicy(allow_out=[pattern])


def test_non_list_refused() -> None:
    with pytest.raises(PolicyError):
        NetworkPolicy(allow_out="pypi.org")
    with pytest.raises(PolicyError):
        NetworkPolicy.parse({"allow_out": [], "allow_everything": True})
    with pytest.raises(PolicyError):
        NetworkPolicy.parse(["pypi.org"])  # type: ignore[arg-type]


def test_parse_dict_and_round_trip() -> None:
    p = NetworkPolicy.parse(
        {"allow_out": ["PyPI.org.", "*.pythonhosted.org", "api.example.com:8443"], "deny_out": []}
    )
    assert p.to_dict() == {
        "allow_out": ["pypi.org", "*.pythonhosted.org", "api.example.com:8443"],
        "deny_out": [],
        "internet_access": False,
        "allow_tcp": [],
    }
    assert NetworkPolicy.parse(p.to_dict()) == p


DECISIONS = [
    # (policy kwargs, destination, result, reason)
    ({}, "pypi.org:443", Verdict.DENY, "not_allowed"),
    ({"allow_out": ["pypi.org"]}, "pypi.org:443", Verdict.ALLOW, "allowed_by_rule"),
    ({"allow_out": ["pypi.org"]}, "PYPI.ORG.:80", Verdict.ALLOW, "allowed_by_rule"),
    ({"allow_out": ["pypi.org"]}, "pypi.org:22", Verdict.DENY, "not_allowed"),
    ({"allow_out": ["pypi.org"]}, "evil.pypi.org:443", Verdict.DENY, "not_allowed"),
    ({"allow_out": ["pypi.org"]}, "pypi.org.evil.com:443", Verdict.DENY, "not_allowed"),
    ({"allow_out": ["*.pythonhosted.org"]}, "files.pythonhosted.org:443", Verdict.ALLOW,
     "allowed_by_rule"),
    ({"allow_out": ["*.pythonhosted.org"]}, "a.b.pythonhosted.org:443", Verdict.ALLOW,
     "allowed_by_rule"),
    ({"allow_out": ["*.pythonhosted.org"]}, "pythonhosted.org:443", Verdict.DENY, "not_allowed"),
    ({"allow_out": ["*.pythonhosted.org"]}, "evilpythonhosted.org:443", Verdict.DENY,
     "not_allowed"),
    ({"allow_out": ["api.example.com:8443"]}, "api.example.com:8443", Verdict.ALLOW,
     "allowed_by_rule"),
    ({"allow_out": ["api.example.com:8443"]}, "api.example.com:443", Verdict.DENY, "not_allowed"),
    # deny_out wins over allow_out and internet access
    ({"allow_out": ["*.example.com"], "deny_out": ["bad.example.com"]}, "bad.example.com:443",
     Verdict.DENY, "denied_by_policy"),
    ({"internet_access": True, "deny_out": ["*.example.com"]}, "x.example.com:443", Verdict.DENY,
     "denied_by_policy"),
    ({"internet_access": True}, "anything.example.org:443", Verdict.ALLOW, "internet_access"),
    ({"internet_access": True}, "anything.example.org:25", Verdict.DENY, "not_allowed"),
    ({"allow_out": ["93.184.216.34"]}, "93.184.216.34:443", Verdict.ALLOW, "allowed_by_rule"),
    ({"allow_out": ["93.184.216.34"]}, "1572395042:443", Verdict.ALLOW, "allowed_by_rule"),
]  # fmt: skip


@pytest.mark.parametrize(("kw", "dest", "result", "reason"), DECISIONS)
def test_decide_name(kw: dict, dest: str, result: Verdict, reason: str) -> None:  # type: ignore[type-arg]
    assert decide_name(NetworkPolicy(**kw), d(dest)) == Decision(result, reason)


ALLOW_ALL = NetworkPolicy.allow_internet()


@pytest.mark.parametrize(
    ("addrs", "reason"),
    [
        ([], "no_address"),
        (["127.0.0.1"], "blocked_address:loopback"),
        (["169.254.169.254"], "blocked_address:link_local"),
        (["93.184.216.34", "127.0.0.1"], "blocked_address:loopback"),  # one bad spoils all
        (["93.184.216.34", "10.1.2.3"], "blocked_address:private"),
        (["::ffff:169.254.169.254"], "blocked_address:link_local"),
        (["64:ff9b::a00:1"], "blocked_address:private"),
        (["100.64.0.1"], "blocked_address:cgnat"),
        (["fd00::1"], "blocked_address:ula"),
        (["0.0.0.0"], "blocked_address:unspecified"),
        (["224.0.0.1"], "blocked_address:multicast"),
        (["192.0.2.1"], "blocked_address:reserved"),
    ],
)
def test_decide_addresses(addrs: list[str], reason: str) -> None:
    v = decide(ALLOW_ALL, d("api.example.com:443"), [ipaddress.ip_address(a) for a in addrs])
    assert (v.result, v.reason) == (Verdict.DENY, reason)


def test_decide_name_checked_before_addresses() -> None:
    v = decide(NetworkPolicy(), d("api.example.com:443"), [ipaddress.ip_address("127.0.0.1")])
    assert v.reason == "not_allowed"


def test_decide_allows_public_and_keeps_order() -> None:
    addrs = [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("2606:2800::1")]
    v = decide(ALLOW_ALL, d("api.example.com:443"), addrs)
    assert v.allowed and v.reason == "internet_access" and list(v.addresses) == addrs


def test_own_addresses_refused() -> None:
    own = frozenset({ipaddress.ip_address("93.184.216.34")})
    v = decide(ALLOW_ALL, d("api.example.com:443"), PUBLIC, own_addresses=own)
    assert v.reason == "own_address"
    mapped = [ipaddress.ip_address("::ffff:93.184.216.34")]
    assert decide(ALLOW_ALL, d("x.example.com:443"), mapped, own_addresses=own).reason == (
        "own_address"
    )


def test_unsafe_relaxes_private_but_not_never_ranges() -> None:
    dest = d("api.example.com:443")
    lo = [ipaddress.ip_address("127.0.0.1")]
    assert decide(ALLOW_ALL, dest, lo, unsafe_allow_private_ranges=True).allowed
    for bad in ("0.0.0.0", "255.255.255.255", "224.0.0.1"):
        v = decide(ALLOW_ALL, dest, [ipaddress.ip_address(bad)], unsafe_allow_private_ranges=True)
        assert not v.allowed
