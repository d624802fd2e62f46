"""Helpers for tests of code that uses moat (after ``trio.testing``).

- ``fake_front_door()``: a front door over an engine whose only runtime is the fake one (the
  agent as a plain subprocess, NO isolation), for fast tests of engine and SDK logic;
- ``local_transport(...)``: a transport to a given engine or front door, as a tenant;
- ``session_of(sandbox)``: the engine's view of an embedded sandbox, to check from outside.

Not for production use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moat.engine.api import FrontDoor
    from moat.engine.engine import Engine
    from moat.engine.session import Session
    from moat.sdk.transport.local import LocalTransport

__all__ = ["fake_front_door", "local_transport", "session_of"]


def fake_front_door() -> FrontDoor:
    """A front door over a new engine that runs every sandbox on the fake runtime.

    Sandboxes report tier "fake"; they have no network. Nothing else about the engine
    changes: the guard, caps, timeouts, tenants and validation are the real ones.
    """
    from moat.engine.api import FrontDoor
    from moat.engine.engine import Engine
    from moat.testing.fake import FakeRuntime

    return FrontDoor(Engine(pool={}, runtime=FakeRuntime(unsafe_no_isolation=True)))


def local_transport(
    engine: Engine | FrontDoor | None = None, tenant: str = "default"
) -> LocalTransport:
    """A transport to ``engine`` (an Engine or a FrontDoor; default: this process's)."""
    from moat.engine.api import FrontDoor
    from moat.sdk.transport.local import LocalTransport

    door = engine if isinstance(engine, FrontDoor) else FrontDoor(engine)
    return LocalTransport(door, tenant)


def session_of(sandbox: Any) -> Session:
    """The engine's live session behind an embedded ``Sandbox`` or ``AsyncSandbox``."""
    from moat.sdk.transport.local import LocalTransport

    inner = getattr(sandbox, "_a", sandbox)
    transport = inner._t
    if not isinstance(transport, LocalTransport):
        raise TypeError("session_of needs a sandbox on a local transport")
    return transport.front_door._session(transport.tenant, inner.sandbox_id)
