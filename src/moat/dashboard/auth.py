"""Dashboard logins: server-side sessions behind a signed cookie, CSRF tokens, origin checks.

Trust domain: host (a face of ``moat serve``). A browser logs in with a tenant's API key once;
the key is checked against the key store and never kept: the cookie holds a random session
id, signed with an HMAC under a key made at server start (a restart logs everyone out). The
session names the tenant, the key's id (a revoked key ends its sessions at the next request)
and a synchronizer token every form must echo. Cookies are HttpOnly, SameSite=Strict, and
Secure when the server speaks TLS. Tenant separation (invariant 11) rests on the tenant a
session names; admin rights come only from ``MOAT_ADMIN_TENANTS`` (docs/dashboard.md).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from moat.errors import InvalidArgumentError
from moat.store.keys import TENANT_PATTERN

__all__ = ["COOKIE", "LOGIN_COOKIE", "Login", "Sessions", "admin_tenants", "same_origin"]

COOKIE = "moat_session"
#: Before a login: the nonce the login form must echo (login CSRF).
LOGIN_COOKIE = "moat_login"
#: A session's life, in seconds, whatever its use.
SESSION_S = 8 * 3600
#: Sessions kept at once (the oldest logged out beyond).
MAX_SESSIONS = 10_000
#: Sessions of one tenant (its own oldest logged out beyond): one tenant logging in again and
#: again can never log another tenant out.
MAX_TENANT_SESSIONS = 64
#: Live-update streams open at once for one tenant (more are told to wait): one tenant's
#: browsers can't take the server's time from another's.
MAX_TENANT_STREAMS = 16
ADMIN_ENV = "MOAT_ADMIN_TENANTS"


def admin_tenants(raw: str | None = None) -> frozenset[str]:
    """The tenants whose keys see every tenant: ``$MOAT_ADMIN_TENANTS`` (comma separated).
    A malformed name stops the start (invariant 7: never an admin by mistake)."""
    text = os.environ.get(ADMIN_ENV, "") if raw is None else raw
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if not TENANT_PATTERN.fullmatch(name):
            raise InvalidArgumentError(f"{ADMIN_ENV}: {name[:64]!r} is not a tenant name")
    return frozenset(names)


@dataclass(frozen=True)
class Login:
    """One logged-in browser."""

    session_id: str
    tenant: str
    key_id: str
    admin: bool
    csrf: str
    expires: float

    @property
    def actor(self) -> str:
        """Who acts, as the audit trail names them (never the key itself)."""
        return f"{self.tenant}/{self.key_id}" + (" (admin)" if self.admin else "")


class Sessions:
    """The server's logins, in memory (bounded), and the signing of their cookies."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._by_id: OrderedDict[str, Login] = OrderedDict()
        self._streams: dict[str, int] = {}  # tenant -> open live-update streams

    def sign(self, value: str) -> str:
        mac = hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()
        return f"{value}.{mac}"

    def unsign(self, cookie: str | None) -> str | None:
        """The value of a cookie this server signed, else None."""
        if not cookie or len(cookie) > 256 or "." not in cookie:
            return None
        value, _, mac = cookie.rpartition(".")
        good = hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()
        return value if hmac.compare_digest(good, mac) else None

    def create(self, tenant: str, key_id: str, admin: bool) -> Login:
        login = Login(
            secrets.token_urlsafe(32), tenant, key_id, admin, secrets.token_urlsafe(32),
            time.time() + SESSION_S,
        )  # fmt: skip
        now = time.time()
        mine = [s for s, other in self._by_id.items() if other.tenant == tenant]
        for sid in mine[: max(0, len(mine) - MAX_TENANT_SESSIONS + 1)]:
            del self._by_id[sid]  # this tenant's oldest, never another's
        self._by_id[login.session_id] = login
        if len(self._by_id) > MAX_SESSIONS:
            for sid in [s for s, other in self._by_id.items() if other.expires < now]:
                del self._by_id[sid]
        while len(self._by_id) > MAX_SESSIONS:
            self._by_id.popitem(last=False)
        return login

    def open_stream(self, login: Login) -> bool:
        """Count a live-update stream of ``login``'s tenant; False (not counted) at its cap."""
        n = self._streams.get(login.tenant, 0)
        if n >= MAX_TENANT_STREAMS:
            return False
        self._streams[login.tenant] = n + 1
        return True

    def close_stream(self, login: Login) -> None:
        n = self._streams.get(login.tenant, 0) - 1
        if n > 0:
            self._streams[login.tenant] = n
        else:
            self._streams.pop(login.tenant, None)

    def of(self, request: Request) -> Login | None:
        """The request's live login, else None."""
        sid = self.unsign(request.cookies.get(COOKIE))
        login = self._by_id.get(sid) if sid is not None else None
        if login is None:
            return None
        if login.expires < time.time():
            self._by_id.pop(login.session_id, None)
            return None
        return login

    def end(self, login: Login) -> None:
        self._by_id.pop(login.session_id, None)

    def set_cookie(self, response: Response, request: Request, name: str, value: str) -> None:
        response.set_cookie(
            name, self.sign(value), max_age=SESSION_S, path="/", httponly=True,
            samesite="strict", secure=request.url.scheme == "https",
        )  # fmt: skip

    @staticmethod
    def check_token(expected: str, given: object) -> bool:
        return isinstance(given, str) and hmac.compare_digest(
            expected.encode(), given.encode("utf-8", "replace")
        )


def same_origin(request: Request) -> bool:
    """Whether a state-changing request comes from a page of this very server: its Origin
    (else its Referer) must name this scheme, host and port. Neither: refused."""
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is not None:
        return origin == own
    referer = request.headers.get("referer")
    return referer is not None and (referer == own or referer.startswith(own + "/"))
