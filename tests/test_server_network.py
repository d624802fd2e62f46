"""E2B's ``network`` body as moat's egress policy (``moat.server.network.policy_of``)."""

from __future__ import annotations

import pytest

from moat.errors import InvalidArgumentError, PolicyError
from moat.server.network import ALL_TRAFFIC, policy_of


def test_deny_all_traffic_is_the_allow_list_form() -> None:
    p = policy_of({"allow_out": ["api.example.com"], "deny_out": [ALL_TRAFFIC],
                   "internet_access": True})  # fmt: skip
    assert [str(h) for h in p.allow_out] == ["api.example.com"]
    assert p.deny_out == () and p.internet_access is False


def test_other_patterns_pass_through_unchanged() -> None:
    p = policy_of({"allow_out": ["a.example"], "deny_out": ["b.example"], "internet_access": True})
    assert [str(h) for h in p.deny_out] == ["b.example"] and p.internet_access is True


def test_allow_all_traffic_and_other_cidrs_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="not supported"):
        policy_of({"allow_out": [ALL_TRAFFIC], "deny_out": [], "internet_access": False})
    with pytest.raises(PolicyError, match="host\\[:port\\]"):
        policy_of({"allow_out": [], "deny_out": ["10.0.0.0/8"], "internet_access": True})
