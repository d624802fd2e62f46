"""Plain words for the audit trail's tokens, for readers who have never used moat.

Pure: the gateway's reasons (``moat.egress.policy``, docs/egress.md) and the row kinds
(docs/audit.md) with a short explanation each; an unknown token is shown as it is.
"""

from __future__ import annotations

__all__ = ["KINDS", "REASONS", "explain", "kind_name"]

KINDS = {
    "egress": "network request",
    "ingress": "inbound connection",
    "exec": "code run",
    "finding": "guard finding",
    "sandbox": "lifecycle",
    "operator": "dashboard action",
    "audit_dropped": "rows not written",
}
REASONS = {
    "not_allowed": "the sandbox's network policy does not allow this host",
    "denied_by_policy": "the sandbox's network policy denies this host",
    "tcp_not_allowed": "raw TCP to this host is not allowed",
    "allowed_by_rule": "allowed by the sandbox's network policy",
    "allowed_tcp": "raw TCP allowed by the sandbox's network policy",
    "internet_access": "allowed: the sandbox may reach the internet",
    "no_address": "the host name did not resolve",
    "own_address": "the address is this host's own",
    "rate_limited": "too many refused requests: slowed down",
    "upstream_connect_failed": "the destination did not answer",
    "client_tls_failed": "the TLS handshake with the sandbox failed",
    "not_a_proxy_request": "not a request moat's proxy understands",
    "bad_target": "the destination is malformed",
    "https_needs_connect": "HTTPS must go through CONNECT",
    "tunnel": "tunnel opened",
    "tcp": "raw TCP tunnel opened",
}
_BLOCKED = "blocked_address:"


def explain(reason: str | None) -> str:
    """A reason token in words ('' when there is none; the token itself when unknown)."""
    if not reason:
        return ""
    if reason.startswith(_BLOCKED):
        return f"the address is {reason[len(_BLOCKED) :]}: never reachable from a sandbox"
    return REASONS.get(reason, "")


def kind_name(kind: str | None) -> str:
    return KINDS.get(kind or "", kind or "")
