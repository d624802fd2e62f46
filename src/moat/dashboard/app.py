"""The dashboard's routes: server-rendered pages at ``/`` and ``/ui/...`` of ``moat serve``.

Trust domain: host (a face over the front door, like ``moat.server``). Every page and action
needs a login (``moat.dashboard.auth``); every state-changing form (login, logout, kill)
must come from this server's own page (Origin, else Referer) and echo a token bound to the
session (login: to a signed pre-login cookie), and is written to the audit trail, refused
or not. Pages are Jinja2 templates with autoescaping on; script lives in a static file, so
the Content-Security-Policy allows no inline script at all. What is shown is what the
front door gives out: guarded output and audit rows (invariant 4), key ids never keys,
brokered secrets by name only (invariant 3).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, Router
from starlette.staticfiles import StaticFiles

from moat.dashboard.auth import COOKIE, LOGIN_COOKIE, Login, Sessions, admin_tenants, same_origin
from moat.dashboard.data import Host, Views
from moat.dashboard.words import explain, kind_name
from moat.errors import SandboxError
from moat.store.keys import TENANT_PATTERN

__all__ = ["dashboard_app", "is_dashboard_path"]

log = logging.getLogger("moat.dashboard")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

HERE = Path(__file__).resolve().parent
#: A form body (login key, a token): small.
MAX_FORM = 16 << 10
#: Seconds between two live updates of the sandboxes page, and the life of one event stream
#: (the browser reconnects by itself: a stream never outlives a logout or a server stop).
TICK_S = 2.0
STREAM_S = 30.0
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


def is_dashboard_path(path: str) -> bool:
    """Whether ``path`` is the dashboard's (the rest of the listener is E2B's wire)."""
    return path in ("/", "/ui") or path.startswith("/ui/")


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(float(ts), dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(ts: float | None) -> str:
    if ts is None:
        return "-"
    s = max(0, int(time.time() - float(ts)))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m {s % 60}s"
    return f"{s // 3600}h {s % 3600 // 60}m"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f} MiB"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every value is escaped unless a template says otherwise (none do)
    )
    env.filters.update(when=_when, age=_age, mib=_mib, explain=explain, kind=kind_name)
    return env


def _utc(raw: str) -> float | None:
    """A ``datetime-local`` value (read as UTC) or an ISO time, as a unix time."""
    when = dt.datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def dashboard_app(host: Host) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The dashboard's ASGI callable over the server's front door and keys."""
    sessions = Sessions()
    admins = admin_tenants()
    views = Views(host)
    env = _environment()
    front = host.front

    def page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        login = sessions.of(request)
        ctx.setdefault("title", "Log in" if name == "login.html" else "moat")
        html = env.get_template(name).render(login=login, path=request.url.path, **ctx)
        return HTMLResponse(html, status)

    def audit_action(
        action: str, allowed: bool, actor: str | None, *, sandbox_id: str | None = None,
        tenant: str | None = None, reason: str | None = None,
    ) -> None:  # fmt: skip
        front.engine.audit.record_operator(
            action, allowed=allowed, actor=actor, sandbox_id=sandbox_id, tenant=tenant,
            reason=reason,
        )  # fmt: skip

    async def form_of(request: Request) -> dict[str, str] | None:
        """The urlencoded form, or None when it is too large or malformed."""
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                return None
        try:
            pairs = urllib.parse.parse_qsl(body.decode("ascii"), max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            return None
        return dict(pairs)

    def refused(request: Request, why: str) -> HTMLResponse:
        return page(request, "error.html", 403, title="Refused", message=why)

    def not_found(request: Request, sandbox_id: str) -> HTMLResponse:
        # One page for unknown, ended-and-forgotten and another tenant's (invariant 11).
        shown = sandbox_id if len(sandbox_id) <= 64 and sandbox_id.isprintable() else "(bad id)"
        return page(request, "error.html", 404, title="Not found",
                    message=f"sandbox {shown} was not found")  # fmt: skip

    def needs_login(
        handler: Callable[[Request, Login], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            login = sessions.of(request)
            if login is not None and not host.keys.is_live(login.key_id):
                sessions.end(login)  # the key was revoked: so is every session it opened
                login = None
            if login is None:
                if request.method == "GET":
                    return RedirectResponse("/ui/login", 303)
                return refused(request, "you are not logged in")
            if request.method == "POST":
                form = await form_of(request)
                token = None if form is None else form.get("csrf")
                if not same_origin(request) or not sessions.check_token(login.csrf, token):
                    audit_action(
                        request.url.path.rsplit("/", 1)[-1], False, login.actor,
                        tenant=login.tenant, reason="refused: bad origin or CSRF token",
                    )  # fmt: skip
                    return refused(request, "this form did not come from this dashboard")
            try:
                return await handler(request, login)
            except SandboxError as exc:
                return page(request, "error.html", 400, title="Refused", message=str(exc))

        return endpoint

    # -- login ---------------------------------------------------------------------------

    async def login_form(request: Request) -> Response:
        if sessions.of(request) is not None:
            return RedirectResponse("/ui/", 303)
        nonce = secrets.token_urlsafe(24)
        response = page(request, "login.html", nonce=nonce, error=None)
        sessions.set_cookie(response, request, LOGIN_COOKIE, nonce)
        return response

    async def login(request: Request) -> Response:
        form = await form_of(request)
        nonce = sessions.unsign(request.cookies.get(LOGIN_COOKIE))
        if (
            form is None
            or not same_origin(request)
            or nonce is None
            or not sessions.check_token(nonce, form.get("nonce"))
        ):
            audit_action("login", False, None, reason="refused: bad origin or login token")
            return refused(request, "this login form did not come from this dashboard")
        key = host.keys.lookup(form.get("api_key", "").strip())
        if key is None:
            audit_action("login", False, None, reason="refused: unknown or revoked API key")
            new = secrets.token_urlsafe(24)
            response = page(request, "login.html", 401, nonce=new,
                            error="That API key is not valid (or was revoked).")  # fmt: skip
            sessions.set_cookie(response, request, LOGIN_COOKIE, new)
            return response
        session = sessions.create(key.tenant, key.key_id, key.tenant in admins)
        audit_action("login", True, session.actor, tenant=key.tenant)
        done = RedirectResponse("/ui/", 303)
        sessions.set_cookie(done, request, COOKIE, session.session_id)
        done.delete_cookie(LOGIN_COOKIE, path="/")
        return done

    async def logout(request: Request, login: Login) -> Response:
        sessions.end(login)
        audit_action("logout", True, login.actor, tenant=login.tenant)
        response = RedirectResponse("/ui/login", 303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- pages ---------------------------------------------------------------------------

    async def home(request: Request) -> Response:
        return RedirectResponse("/ui/", 303)

    async def sandboxes(request: Request, login: Login) -> Response:
        rows = await views.sandboxes(login, state="running")
        return page(request, "sandboxes.html", rows=rows, title="Sandboxes")

    async def events(request: Request, login: Login) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            # Counted from the generator's first step to its close (Starlette closes it when
            # the browser leaves): a request that never streams holds nothing.
            if not sessions.open_stream(login):
                yield b"retry: 10000\n\nevent: busy\ndata: {}\n\n"  # this tenant's cap
                return
            try:
                yield b"retry: 3000\n\n"
                end = time.monotonic() + STREAM_S
                while time.monotonic() < end:
                    if sessions.of(request) is None or not host.keys.is_live(login.key_id):
                        return  # logged out or revoked: the stream ends with the session
                    rows = [r.to_json() for r in await views.sandboxes(login, state="running")]
                    yield b"event: sandboxes\ndata: " + json.dumps(rows).encode() + b"\n\n"
                    await asyncio.sleep(TICK_S)
            finally:
                sessions.close_stream(login)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"x-accel-buffering": "no"}
        )

    async def sandbox(request: Request, login: Login) -> Response:
        sid = request.path_params["sandbox_id"]
        found = await views.sandbox(login, sid)
        if found is None:
            return not_found(request, sid)
        return page(request, "sandbox.html", s=found, title=f"Sandbox {sid}")

    async def kill(request: Request, login: Login) -> Response:
        sid = request.path_params["sandbox_id"]
        owner = await views.owner(login, sid)
        if owner is None:
            audit_action("kill", False, login.actor, tenant=login.tenant,
                         reason="refused: no such sandbox")  # fmt: skip
            return not_found(request, sid)
        killed = await front.kill(owner, sid)
        host.drop(sid)  # a paused one's record too
        audit_action(
            "kill", True, login.actor, sandbox_id=sid, tenant=owner,
            reason="killed from the dashboard" if killed else "had already ended",
        )  # fmt: skip
        return RedirectResponse(f"/ui/sandboxes/{sid}", 303)

    async def pause_or_resume(request: Request, login: Login) -> Response:
        sid = request.path_params["sandbox_id"]
        action = request.path_params["action"]
        owner = await views.owner(login, sid)
        if owner is None or action not in ("pause", "resume"):
            audit_action(action[:16], False, login.actor, tenant=login.tenant,
                         reason="refused: no such sandbox")  # fmt: skip
            return not_found(request, sid)
        try:
            if action == "pause":
                await host.pause_sandbox(owner, sid)
            else:
                await host.resume_sandbox(owner, sid)
        except SandboxError as exc:  # the front door's own words (never a host path)
            audit_action(action, False, login.actor, sandbox_id=sid, tenant=owner,
                         reason=f"refused: {type(exc).__name__}")  # fmt: skip
            return page(request, "error.html", 409, title=f"Could not {action}",
                        message=str(exc)[:500])  # fmt: skip
        audit_action(action, True, login.actor, sandbox_id=sid, tenant=owner,
                     reason=f"{action}d from the dashboard")  # fmt: skip
        return RedirectResponse(f"/ui/sandboxes/{sid}", 303)

    async def trail(request: Request, login: Login) -> Response:
        q = request.query_params
        filters: dict[str, Any] = {
            "denied": q.get("denied") == "1",
            "sandbox": (q.get("sandbox") or "").strip()[:64],
            "since": (q.get("since") or "").strip()[:32],
            "until": (q.get("until") or "").strip()[:32],
        }
        error = None
        since = until = None
        try:
            since = _utc(filters["since"]) if filters["since"] else None
            until = _utc(filters["until"]) if filters["until"] else None
        except ValueError:
            error = "Times look like 2026-12-01T13:45 (UTC)."
        rows: list[dict[str, Any]] = []
        if error is None:
            rows = await front.audit_trail(
                None if login.admin else login.tenant,
                sandbox_id=filters["sandbox"] or None, denied_only=bool(filters["denied"]),
                since=since, until=until, limit=500,
            )  # fmt: skip
        return page(request, "audit.html", rows=rows, f=filters, error=error,
                    title="Audit trail")  # fmt: skip

    async def tenants(request: Request, login: Login) -> Response:
        if not login.admin:
            return page(request, "error.html", 404, title="Not found", message="no such page")
        summary = []
        for name in views.tenants(login):
            running = await front.list_sandboxes(name, state="running")
            keys = [k for k in host.keys.list() if k.tenant == name]
            summary.append((name, len(running), sum(k.revoked is None for k in keys)))
        return page(request, "tenants.html", tenants=summary, title="Tenants")

    async def tenant(request: Request, login: Login) -> Response:
        name = request.path_params["name"]
        if not login.admin or not TENANT_PATTERN.fullmatch(name):
            return page(request, "error.html", 404, title="Not found", message="no such page")
        t = await views.tenant_page(name)
        return page(request, "tenant.html", t=t, admins=admins, title=f"Tenant {name}")

    routes = [
        Route("/", home, methods=["GET"]),
        Route("/ui", home, methods=["GET"]),
        Route("/ui/", needs_login(sandboxes), methods=["GET"]),
        Route("/ui/login", login_form, methods=["GET"]),
        Route("/ui/login", login, methods=["POST"]),
        Route("/ui/logout", needs_login(logout), methods=["POST"]),
        Route("/ui/events", needs_login(events), methods=["GET"]),
        Route("/ui/audit", needs_login(trail), methods=["GET"]),
        Route("/ui/tenants", needs_login(tenants), methods=["GET"]),
        Route("/ui/tenants/{name}", needs_login(tenant), methods=["GET"]),
        Route("/ui/sandboxes/{sandbox_id}", needs_login(sandbox), methods=["GET"]),
        Route("/ui/sandboxes/{sandbox_id}/kill", needs_login(kill), methods=["POST"]),
        Route(
            "/ui/sandboxes/{sandbox_id}/{action}", needs_login(pause_or_resume), methods=["POST"]
        ),
        Mount("/ui/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    router = Router(routes=routes)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await router(scope, receive, send_with_headers)

    return app
