"""moat.egress: the host-side egress gateway, the only way out of every sandbox.

Trust domain: host engine (privileged). Everything it receives comes from a sandbox and is
hostile. Modules, from pure to I/O:

- :mod:`~moat.egress.hostport`: canonical destinations (one spelling per host)
- :mod:`~moat.egress.addr`: address classification (an enum; boundary-tested)
- :mod:`~moat.egress.policy`: :class:`NetworkPolicy` and the pure ``decide``
- :mod:`~moat.egress.resolve`: resolve once, pin, dial what was checked
- :mod:`~moat.egress.broker`: secrets, placeholders, scrubbing, the per-sandbox CA
- :mod:`~moat.egress.tls`: ClientHello SNI peeking, TLS over any stream
- :mod:`~moat.egress.caps`: :class:`GatewayConfig` and the per-sandbox caps
- :mod:`~moat.egress.proxy`: the :class:`Gateway`
- :mod:`~moat.egress.audit`: the SQLite audit trail
"""

from __future__ import annotations

from moat.egress.addr import AddrClass, classify
from moat.egress.audit import AuditLog
from moat.egress.broker import Secret
from moat.egress.caps import GatewayConfig
from moat.egress.hostport import HostPort, canonical_host, parse_absolute_url, parse_authority
from moat.egress.policy import Decision, NetworkPolicy, Verdict, decide, decide_name
from moat.egress.proxy import Gateway
from moat.egress.resolve import Resolver, StaticResolver, SystemResolver
from moat.egress.sandboxenv import proxy_env

__all__ = [
    "AddrClass",
    "AuditLog",
    "Decision",
    "Gateway",
    "GatewayConfig",
    "HostPort",
    "NetworkPolicy",
    "Resolver",
    "Secret",
    "StaticResolver",
    "SystemResolver",
    "Verdict",
    "canonical_host",
    "classify",
    "decide",
    "decide_name",
    "parse_absolute_url",
    "parse_authority",
    "proxy_env",
]
