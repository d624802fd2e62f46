"""E2B's ``network`` fields (as the server records them) turned into moat's egress policy.

E2B's SDKs export ``ALL_TRAFFIC = "0.0.0.0/0"`` and document ``denyOut: [ALL_TRAFFIC]`` (with an
``allowOut`` list taking precedence) as the way to say "nothing but these hosts". moat's
patterns are host names, so that CIDR would be refused as a malformed pattern; its meaning is
moat's own default, deny-all (invariant 2), so it maps to no internet access and the
``allowOut`` list alone. ``allowOut: [ALL_TRAFFIC]`` would open everything: it is refused
(invariant 7), ``allow_internet_access`` is the way to open public hosts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moat.egress import NetworkPolicy
from moat.errors import InvalidArgumentError

ALL_TRAFFIC = "0.0.0.0/0"


def policy_of(network: Mapping[str, Any]) -> NetworkPolicy:
    """moat's policy for a recorded ``{allow_out, deny_out, internet_access}`` dict."""
    allow = list(network.get("allow_out") or [])
    deny = list(network.get("deny_out") or [])
    internet = bool(network.get("internet_access"))
    if ALL_TRAFFIC in allow:
        raise InvalidArgumentError(
            "allowOut 0.0.0.0/0 (all traffic) is not supported by moat: set "
            "allow_internet_access to reach public hosts"
        )
    if ALL_TRAFFIC in deny:
        # Deny everything but allowOut: moat's default (invariant 2), internet access off.
        deny = [d for d in deny if d != ALL_TRAFFIC]
        internet = False
    return NetworkPolicy.parse(
        {
            "allow_out": allow,
            "deny_out": deny,
            "internet_access": internet,
            "allow_tcp": list(network.get("allow_tcp") or []),  # moat's raw TCP (issue 15)
        }
    )
