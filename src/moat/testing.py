"""Helpers for tests of code that uses moat (after ``trio.testing``).

Not for production use: ``session_of`` reaches behind the front door to the engine's view of
an embedded sandbox, so a test can check from outside what the sandbox did.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moat.engine.engine import Engine
    from moat.engine.session import Session
    from moat.sdk.transport.local import LocalTransport

__all__ = ["local_transport", "session_of"]


def local_transport(engine: Engine | None = None, tenant: str = "default") -> LocalTransport:
    """A transport to ``engine`` (default: this process's) as ``tenant``."""
    from moat.engine.api import FrontDoor
    from moat.sdk.transport.local import LocalTransport

    return LocalTransport(FrontDoor(engine), tenant)


def session_of(sandbox: Any) -> Session:
    """The engine's live session behind an embedded ``Sandbox`` or ``AsyncSandbox``."""
    from moat.sdk.transport.local import LocalTransport

    inner = getattr(sandbox, "_a", sandbox)
    transport = inner._t
    if not isinstance(transport, LocalTransport):
        raise TypeError("session_of needs a sandbox on a local transport")
    return transport.front_door._session(transport.tenant, inner.sandbox_id)
