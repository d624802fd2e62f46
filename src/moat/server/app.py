"""The ASGI application: one listener, dispatched by E2B's sandbox headers.

Requests carrying ``E2b-Sandbox-Id`` and ``E2b-Sandbox-Port`` go to the sandbox plane
(``moat.server.sandbox``), authenticated by that sandbox's access token; every other request
is control plane (``moat.server.control``), authenticated by ``X-API-Key``. ``GET /health``
without sandbox headers answers 200 once the server is ready.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from moat.engine.api import FrontDoor
from moat.errors import InvalidArgumentError
from moat.server import wire
from moat.store.keys import KeyStore

if TYPE_CHECKING:
    from moat.server.rpc import ProcMeta

log = logging.getLogger("moat.server")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: JSON bodies of the control plane and the code interpreter.
MAX_JSON_BODY = 1 << 20
#: One upload to ``/files``.
MAX_FILE_BODY = 64 << 20


class BodyTooLarge(Exception):
    """The request body exceeds its cap (413)."""


@dataclass
class Record:
    """What the server knows of a sandbox beyond the engine: its wire-facing names."""

    tenant: str
    token: str  # envdAccessToken: X-Access-Token on every sandbox request
    traffic: str  # trafficAccessToken: the code interpreter's /contexts carry only this one
    template_id: str
    network: dict[str, Any]
    contexts: dict[str, str] = field(default_factory=dict)  # context id -> language
    procs: dict[int, ProcMeta] = field(default_factory=dict)  # pid -> what envd's List shows
    #: ingress without the traffic token (E2B's ``network.allowPublicTraffic``)
    public_traffic: bool = False
    #: stored secrets it was created with: name -> binding then (moat.server.secrets), so a
    #: resume after a restart can take their values from the store again
    stored: dict[str, Any] = field(default_factory=dict)


class ServerState:
    """The front door, the key store and the per-sandbox wire records of one server."""

    def __init__(
        self, front: FrontDoor, keys: KeyStore, tier: str | None, domain: str = "moat.localhost"
    ) -> None:
        self.front = front
        self.keys = keys
        self.tier = tier
        #: ingress host names are ``<port>-<sandbox id>.<domain>`` (``get_host``)
        self.domain = domain
        self.records: dict[str, Record] = {}
        #: the MCP server's ASGI app at ``/mcp`` (moat.mcp.McpHttp; None: not served)
        self.mcp: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None
        #: records of sandboxes paused while this server runs: their tokens stay valid for
        #: the resume (E2B's); after a restart a resumed sandbox gets fresh ones
        self.paused: dict[str, Record] = {}
        #: the tenants' stored secrets (moat.server.secrets.LazyStore), set by the control app
        self.secret_store: Any = None
        # A sandbox that ends by timeout or death takes its record with it, as DELETE does.
        self.unsubscribe = front.on_ended(self.forget)

    async def pause_sandbox(self, tenant: str, sandbox_id: str) -> None:
        """Pause for the dashboard, as E2B's ``/pause`` does (``moat.server.persist``)."""
        from moat.server import persist

        await persist.pause(self, tenant, sandbox_id)

    async def resume_sandbox(self, tenant: str, sandbox_id: str) -> None:
        """Resume for the dashboard, as E2B's ``/connect`` does."""
        from moat.server import persist

        await persist.resume(self, tenant, sandbox_id)

    def forget(self, sandbox_id: str) -> None:
        """Drop the record of a sandbox that ended (kept aside when it paused)."""
        rec = self.records.pop(sandbox_id, None)
        if rec is not None and self.front.is_paused_now(rec.tenant, sandbox_id):
            self.paused[sandbox_id] = rec

    def drop(self, sandbox_id: str) -> None:
        """Forget a killed sandbox entirely (its paused record too)."""
        self.records.pop(sandbox_id, None)
        self.paused.pop(sandbox_id, None)

    def tenant_of(self, request: Request) -> str | None:
        return self.keys.tenant_of(request.headers.get("x-api-key"))

    def record(self, tenant: str, sandbox_id: str) -> Record | None:
        """The tenant's record, or None (another tenant's id is just unknown: invariant 11)."""
        rec = self.records.get(sandbox_id)
        return rec if rec is not None and rec.tenant == tenant else None

    def by_token(
        self, sandbox_id: str, token: str | None, traffic: str | None = None
    ) -> Record | None:
        """The sandbox whose access token is ``token`` (or, where ``traffic`` is given, whose
        traffic token it is); None for any mismatch."""
        rec = self.records.get(sandbox_id)
        if rec is None:
            return None
        if token is not None and _same(rec.token, token):
            return rec
        if traffic is not None and _same(rec.traffic, traffic):
            return rec
        return None

    @staticmethod
    def new_token() -> str:
        return secrets.token_urlsafe(32)


def _same(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


async def read_body(request: Request, cap: int) -> bytes:
    """The whole body, refusing more than ``cap`` bytes before reading them all."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise InvalidArgumentError("bad Content-Length")
        if int(length) > cap:
            raise BodyTooLarge
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > cap:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def too_large() -> Response:
    return wire.error(413, "the request body is too large")


def make_app(state: ServerState) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The server's ASGI callable over ``state``."""
    from moat.dashboard import dashboard_app, is_dashboard_path
    from moat.server import ingress
    from moat.server.control import control_app
    from moat.server.sandbox import sandbox_app

    control = control_app(state)
    plane = sandbox_app(state)
    dashboard = dashboard_app(state)  # the operators' pages at / and /ui/ (docs/dashboard.md)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await dispatch(scope, receive, send)
        except ClientDisconnect:
            # The client left (or its body timed out, moat.server.httpproto) while its body
            # was read: nobody to answer, and no fault of the server to log.
            return

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await control(scope, receive, send)
            return
        target = ingress.target_of(scope, state.domain) if scope["type"] != "lifespan" else None
        if target is not None:  # a port inside a sandbox (get_host)
            await ingress.handle(state, target, scope, receive, send)
            return
        if scope["type"] != "http":
            if scope["type"] == "websocket":  # nothing else of moat speaks WebSocket
                await send({"type": "websocket.close", "code": 1008})
            return
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        if b"e2b-sandbox-id" in headers and b"e2b-sandbox-port" in headers:
            await plane(scope, receive, send)
        elif scope.get("path") == "/mcp" and state.mcp is not None:
            await state.mcp(scope, receive, send)  # authenticates by the tenant's key itself
        elif scope.get("path") == "/files":
            # A signed link a browser follows names no sandbox: the signature finds it
            # (moat.server.files); the control plane has no /files.
            await plane(scope, receive, send)
        elif is_dashboard_path(scope.get("path", "")):
            await dashboard(scope, receive, send)
        else:
            await control(scope, receive, send)

    return app
