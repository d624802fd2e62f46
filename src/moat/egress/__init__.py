"""moat.egress: the host-side egress gateway, the only way out of every sandbox.

Trust domain: host engine (privileged). Everything it receives comes from a sandbox and is
hostile. Modules, from pure to I/O:

- :mod:`~moat.egress.hostport`: canonical destinations (one spelling per host)
- :mod:`~moat.egress.addr`: address classification (an enum; boundary-tested)
- :mod:`~moat.egress.policy`: :class:`NetworkPolicy` and the pure ``decide``
- :mod:`~moat.egress.resolve`: resolve once, pin, dial what was checked
- :mod:`~moat.egress.framing`: strict request heads (no ambiguous framing: no smuggling)
- :mod:`~moat.egress.reflect`: every spelling of a secret value; the streaming scrubber
- :mod:`~moat.egress.broker`: secrets, placeholders, scrubbing, the per-sandbox CA
- :mod:`~moat.egress.tls`: ClientHello SNI peeking, TLS over any stream
- :mod:`~moat.egress.caps`: :class:`GatewayConfig` and the per-sandbox caps
- :mod:`~moat.egress.exchange`: one HTTP/1.1 request and response, gateway-framed
- :mod:`~moat.egress.proxy`: the :class:`Gateway`

Its audit rows go to :class:`moat.store.AuditLog`.
"""

from __future__ import annotations

from moat.egress.addr import AddrClass, classify
from moat.egress.broker import Secret
from moat.egress.caps import GatewayConfig
from moat.egress.hostport import HostPort, canonical_host, parse_absolute_url, parse_authority
from moat.egress.policy import Decision, NetworkPolicy, Verdict, decide, decide_name
from moat.egress.proxy import Gateway
from moat.egress.resolve import Resolver, StaticResolver, SystemResolver
from moat.egress.sandboxenv import proxy_env

__all__ = [
    "AddrClass",
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
