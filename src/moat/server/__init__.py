"""``moat serve``: a multi-tenant sandbox server that speaks E2B's wire (DESIGN.md §3).

Trust domain: host, facing the network. Every request is untrusted input: bodies are capped
and validated before anything reaches the engine, and every call goes through the engine's
front door with the caller's tenant (``moat.engine.api``), never to sessions or drivers.
What a sandbox sends back has passed the guard in the front door (invariant 4); every error
body is a moat error's message, safe to show a model (invariant 8).
"""

from moat.server.app import ServerState, make_app

__all__ = ["ServerState", "make_app"]
