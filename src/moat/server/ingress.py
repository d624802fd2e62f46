"""Ingress: callers reach a port a sandbox process listens on (issue 10, E2B's ``get_host``).

Two ways to name the target, both on the server's one listener:

- the Host header ``<port>-<sandbox id>.<domain>`` (``sbx.get_host(port)``; the default
  domain is under ``localhost``, which browsers and curl resolve to loopback by themselves);
- E2B's headers ``E2b-Sandbox-Id`` and ``E2b-Sandbox-Port`` with a port other than the two
  moat serves itself (49983, 49999).

Closed by default: the sandbox's traffic token is required (E2B's ``E2B-Traffic-Access-Token``
header; for browsers a ``moat_traffic_token`` query parameter, which sets a cookie for that
host), unless the sandbox was created with ``allowPublicTraffic: true``. A wrong token, another
tenant's sandbox and an unknown one answer alike (invariant 11). The bytes travel through the
agent's channel (``FrontDoor.open_port``); the sandbox still has no network interface but
loopback. HTTP/1.1 requests are forwarded one per upstream connection (h11 both ways);
WebSocket upgrades are bridged message by message (wsproto to the app inside). What flows
back is the user's own app talking to its client: it is not guarded, and every connection is
an audit row (kind ``ingress``). Caps: streams per sandbox (the engine's), request body size,
idle time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
import urllib.parse
from typing import Any

import h11
from starlette.datastructures import Headers
from wsproto import ConnectionType, WSConnection
from wsproto import events as ws

from moat.errors import PolicyError, PortNotOpenError, SandboxError
from moat.server.app import MAX_FILE_BODY, Receive, Record, Scope, Send, ServerState

__all__ = ["IDLE_TIMEOUT_S", "TOKEN_COOKIE", "TOKEN_PARAM", "Target", "handle", "target_of"]

log = logging.getLogger("moat.server")

TOKEN_PARAM = "moat_traffic_token"  # noqa: S105 - a parameter's name, not a secret
TOKEN_COOKIE = "moat_traffic_token"  # noqa: S105 - a cookie's name, not a secret
#: An ingress connection with no byte either way for this long is closed.
IDLE_TIMEOUT_S = 300.0
#: The largest WebSocket message relayed from an app (uvicorn's own default for the outside).
_MAX_WS_MESSAGE = 16 * 1024 * 1024
_READ = 64 * 1024
#: The most of a response body taken from the stream at once (what its credit has let in).
_BODY_READ = 1024 * 1024
_HOST_RE = re.compile(r"(\d{1,5})-([a-z0-9-]{4,64})\.(.+)")
#: Hop-by-hop headers (RFC 9110 §7.6.1) and framing the proxy sets itself.
_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"content-length", b"expect",
        b"e2b-traffic-access-token", b"x-access-token", b"e2b-sandbox-id", b"e2b-sandbox-port",
    }
)  # fmt: skip
_OWN_PORTS = frozenset({49983, 49999})


class Target:
    """Where an ingress request goes, and the host name it used (for the cookie)."""

    def __init__(self, sandbox_id: str, port: int, by_host: bool) -> None:
        self.sandbox_id = sandbox_id
        self.port = port
        self.by_host = by_host


def target_of(scope: Scope, domain: str) -> Target | None:
    """The ingress target a request names, or None (not an ingress request)."""
    headers = Headers(scope=scope)
    sid, port = headers.get("e2b-sandbox-id"), headers.get("e2b-sandbox-port", "")
    if sid is not None and port.isdigit() and int(port) not in _OWN_PORTS:
        return Target(sid, int(port), by_host=False)
    host = headers.get("host", "").lower()
    host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    m = _HOST_RE.fullmatch(host)
    if m is None or m.group(3) != domain.split(":", 1)[0].lower():
        return None
    if int(m.group(1)) in _OWN_PORTS:  # envd and the code interpreter are moat's own, served
        return None  # on the sandbox plane: never a port of user code inside
    return Target(m.group(2), int(m.group(1)), by_host=True)


def _token(scope: Scope) -> tuple[list[str], bool]:
    """The traffic token candidates a request carries, and whether they came as the query
    parameter. Every cookie of the name counts: one planted for a parent domain must not
    hide the real one."""
    headers = Headers(scope=scope)
    given = headers.get("e2b-traffic-access-token")
    if given:
        return [given], False
    query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get(TOKEN_PARAM):
        return query[TOKEN_PARAM][:1], True
    cookies = [
        value
        for part in headers.get("cookie", "").split(";")
        for name, _, value in [part.strip().partition("=")]
        if name == TOKEN_COOKIE and value
    ]
    return cookies[:16], False


def _matches(expected: str, given: list[str]) -> bool:
    """Whether one of ``given`` is the sandbox's traffic token (constant time per candidate)."""
    return any(hmac.compare_digest(expected.encode(), g.encode("utf-8", "replace")) for g in given)


def _without_token(query: bytes) -> bytes:
    pairs = urllib.parse.parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if k != TOKEN_PARAM]
    return urllib.parse.urlencode(kept).encode("latin-1")


async def _reply(send: Send, status: int, message: str, sandbox_id: str) -> None:
    import json

    body = json.dumps({"sandboxId": sandbox_id, "message": message, "code": status}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


async def handle(state: ServerState, target: Target, scope: Scope, receive: Receive,
                 send: Send) -> None:  # fmt: skip
    """Serve one ingress request or WebSocket (``scope["type"]`` http or websocket)."""
    sid = target.sandbox_id
    is_ws = scope["type"] == "websocket"
    rec = state.records.get(sid)
    paused = rec is None and sid in state.paused
    if paused:
        rec = state.paused[sid]
    token, from_query = _token(scope)
    token_ok = rec is not None and _matches(rec.traffic, token)
    admitted = rec is not None and (rec.public_traffic or token_ok)
    if rec is None or not admitted:
        # Unknown, another's, or no/wrong token: the same answer (invariant 11).
        await _refuse(send, is_ws, 502, "The sandbox was not found", sid)
        return
    if paused:  # traffic to a paused sandbox resumes it (E2B's autoResume), same tokens
        try:
            await state.front.connect(rec.tenant, sid)
        except SandboxError:
            await _refuse(send, is_ws, 502, "The sandbox was not found", sid)
            return
        if state.paused.get(sid) is rec:
            state.paused.pop(sid, None)
            state.records[sid] = rec
    try:
        reader, writer = await state.front.open_port(rec.tenant, sid, target.port)
    except PortNotOpenError as exc:
        _audit(state, rec, sid, target.port, "WEBSOCKET" if is_ws else scope.get("method"),
               allowed=False, reason="port_not_open")  # fmt: skip
        await _refuse(send, is_ws, 502, str(exc), sid)
        return
    except PolicyError as exc:  # a port of moat's own inside (the egress proxy)
        _audit(state, rec, sid, target.port, "WEBSOCKET" if is_ws else scope.get("method"),
               allowed=False, reason="port_refused")  # fmt: skip
        await _refuse(send, is_ws, 403, str(exc), sid)
        return
    except SandboxError:
        await _refuse(send, is_ws, 502, "The sandbox was not found", sid)
        return
    counts = [0, 0]  # bytes to the sandbox, bytes from it
    method = "WEBSOCKET" if is_ws else str(scope.get("method", "GET"))
    reason = "ingress"
    accepted = [False]
    try:
        if is_ws:
            await _websocket(scope, receive, send, reader, writer, counts, accepted)
        else:
            # Only a real token, as given in the query, becomes the cookie (never attacker text:
            # the value is the sandbox's own token once it matched).
            cookie = rec.traffic if from_query and target.by_host and token_ok else None
            await _http(scope, receive, send, reader, writer, counts, cookie, accepted)
    except _Failed as exc:
        reason = f"ingress;failed:{exc}"
        if not is_ws and not accepted[0]:  # no response started yet: answer it
            status = 413 if "too large" in str(exc) else 502
            with contextlib.suppress(Exception):
                await _reply(send, status, f"ingress: {exc}", sid)
    except (ConnectionError, OSError, TimeoutError, h11.ProtocolError):
        reason = "ingress;closed"
        if not is_ws and not accepted[0]:  # the app broke off before answering
            with contextlib.suppress(Exception):
                await _reply(send, 502, "ingress: the app closed the connection", sid)
    finally:
        if is_ws and not accepted[0]:  # refused before the upgrade: the client hears a 403
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1011})
        writer.close()
        _audit(state, rec, sid, target.port, method, allowed=True, reason=reason,
               up=counts[0], down=counts[1])  # fmt: skip


class _Failed(Exception):
    """The app inside broke HTTP (answered before the error was sent, or not at all)."""


async def _refuse(send: Send, is_ws: bool, status: int, message: str, sid: str) -> None:
    if is_ws:
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        import json

        body = json.dumps({"sandboxId": sid, "message": message, "code": status}).encode()
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await _reply(send, status, message, sid)


def _audit(state: ServerState, rec: Record, sid: str, port: int, method: Any, *,
           allowed: bool, reason: str, up: int = 0, down: int = 0) -> None:  # fmt: skip
    record = getattr(state.front.engine.audit, "record_ingress", None)
    if record is None:
        return
    try:
        record(sid, method=str(method)[:16], port=port, allowed=allowed, reason=reason,
               bytes_up=up, bytes_down=down)  # fmt: skip
    except Exception:
        log.exception("ingress audit failed")


def _forwarded(scope: Scope) -> list[tuple[bytes, bytes]]:
    out = [(k.lower(), v) for k, v in scope.get("headers", ()) if k.lower() not in _HOP]
    if b"cookie" in (k for k, _ in out):  # never hand the app moat's own token cookie
        kept = []
        for k, v in out:
            if k == b"cookie":
                parts = [p for p in v.split(b";") if not p.strip().startswith(b"moat_traffic")]
                if not parts:
                    continue
                v = b";".join(parts).strip()
            kept.append((k, v))
        out = kept
    return out


async def _send_body(
    receive: Receive, conn: h11.Connection, writer: Any, counts: list[int]
) -> None:
    """Stream the client's body to the app as it arrives: memory is bounded by the stream's
    credit (``drain``), never a whole body per request; the total stays under the cap."""
    sent = 0
    while True:
        async with asyncio.timeout(IDLE_TIMEOUT_S):  # a client that stops sending is let go
            message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("client left")
        chunk = message.get("body", b"")
        sent += len(chunk)
        if sent > MAX_FILE_BODY:
            raise _Failed("request body too large")
        if chunk:
            out = conn.send(h11.Data(data=chunk))
            counts[0] += len(out)
            writer.write(out)
            await writer.drain()
        if not message.get("more_body", False):
            out = conn.send(h11.EndOfMessage())
            counts[0] += len(out)
            writer.write(out)
            await writer.drain()
            return


def _framing(scope: Scope) -> list[tuple[bytes, bytes]]:
    """How the request's body is framed to the app: the client's Content-Length, or chunked
    when the client sent one so, or no body at all."""
    headers = Headers(scope=scope)
    length = headers.get("content-length")
    if length is not None and length.isdigit():
        if int(length) > MAX_FILE_BODY:
            raise _Failed("request body too large")
        return [(b"content-length", length.encode())]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return [(b"transfer-encoding", b"chunked")]
    return []


async def _next_event(conn: h11.Connection, reader: Any, counts: list[int]) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        async with asyncio.timeout(IDLE_TIMEOUT_S):
            data = await reader.read(_READ)
        counts[1] += len(data)
        conn.receive_data(data)


async def _http(scope: Scope, receive: Receive, send: Send, reader: Any, writer: Any,
                counts: list[int], set_cookie: str | None,
                started: list[bool]) -> None:  # fmt: skip
    conn = h11.Connection(h11.CLIENT)
    target = scope.get("raw_path") or scope["path"].encode()
    query = _without_token(scope.get("query_string", b""))
    if query:
        target += b"?" + query
    # The client's Host goes on (apps build their links from it), as any reverse proxy does.
    headers = [*_forwarded(scope), (b"connection", b"close"), *_framing(scope)]
    if not any(k == b"host" for k, _ in headers):
        headers.insert(0, (b"host", b"localhost"))
    out = conn.send(h11.Request(method=scope["method"], target=target, headers=headers))
    counts[0] += len(out)
    writer.write(out)
    await _send_body(receive, conn, writer, counts)
    response = await _next_event(conn, reader, counts)
    if not isinstance(response, h11.Response):
        raise _Failed("no response")
    # uvicorn sends its own Date (one is enough) and no Server header (the app's stays).
    headers_out = [
        (k, _host_only(v) if k.lower() == b"set-cookie" else v)
        for k, v in response.headers
        if k.lower() not in _HOP | {b"date"}
    ]
    if set_cookie is not None:
        headers_out.append((b"set-cookie", f"{TOKEN_COOKIE}={set_cookie}; HttpOnly; Path=/; "
                                           "SameSite=Lax".encode()))  # fmt: skip
    length = _body_length(response)
    if length is not None:  # the client gets the app's framing: no re-chunking per piece
        headers_out.append((b"content-length", str(length).encode()))
    started[0] = True
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": headers_out})  # fmt: skip
    if length is not None and scope.get("method") != "HEAD":  # HEAD: no body follows
        await _relay_length(conn, reader, send, counts, length)
        return
    while True:
        event = await _next_event(conn, reader, counts)
        if isinstance(event, h11.Data):
            await send({"type": "http.response.body", "body": bytes(event.data),
                        "more_body": True})  # fmt: skip
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            await send({"type": "http.response.body", "body": b""})
            return


def _body_length(response: h11.Response) -> int | None:
    """The app's Content-Length, when it frames the response (not for 204 or 304, which
    have no body whatever the header says); h11 has checked the header's form."""
    if response.status_code in (204, 304):
        return None
    values = [v for k, v in response.headers if k == b"content-length"]
    if len(values) != 1 or not values[0].isdigit():
        return None
    return int(values[0])


async def _relay_length(conn: h11.Connection, reader: Any, send: Send, counts: list[int],
                        length: int) -> None:  # fmt: skip
    """Pass a Content-Length body from the app to the client as the pieces come: no h11
    parsing or copy per piece (the hot path of a download). What h11 already read goes first.
    Memory stays bounded by the stream's credit and by uvicorn's write buffer (``send``
    waits while the client is slow, and the stream's credit stops the app meanwhile)."""
    buffered, _ = conn.trailing_data
    left = length
    data = buffered[:left]
    while True:
        if data:
            left -= len(data)
            await send({"type": "http.response.body", "body": data, "more_body": left > 0})
        if left <= 0:
            if not data:
                await send({"type": "http.response.body", "body": b""})
            return
        async with asyncio.timeout(IDLE_TIMEOUT_S):
            data = await reader.read(min(left, _BODY_READ))
        if not data:
            raise ConnectionResetError("the app closed before the end of its body")
        counts[1] += len(data)


_DOMAIN_ATTR = re.compile(rb";\s*domain=[^;]*", re.IGNORECASE)


def _host_only(cookie: bytes) -> bytes:
    """An app's cookie without its ``Domain`` attribute: it stays on its own host name, never
    set for the parent domain every sandbox shares (invariant 11)."""
    return _DOMAIN_ATTR.sub(b"", cookie)


async def _websocket(scope: Scope, receive: Receive, send: Send, reader: Any, writer: Any,
                     counts: list[int], accepted_out: list[bool]) -> None:  # fmt: skip
    connect = await receive()
    if connect["type"] != "websocket.connect":
        return
    ws_conn = WSConnection(ConnectionType.CLIENT)
    target = scope.get("raw_path") or scope["path"].encode()
    query = _without_token(scope.get("query_string", b""))
    path = (target + (b"?" + query if query else b"")).decode("latin-1")
    extra = [(k, v) for k, v in _forwarded(scope)
             if not k.startswith(b"sec-websocket") and k != b"host"]  # fmt: skip
    out = ws_conn.send(ws.Request(host="127.0.0.1", target=path, extra_headers=extra,
                                  subprotocols=list(scope.get("subprotocols", []))))  # fmt: skip
    counts[0] += len(out)
    writer.write(out)
    await writer.drain()
    accepted: ws.AcceptConnection | None = None
    pending: list[Any] = []
    while accepted is None:
        async with asyncio.timeout(IDLE_TIMEOUT_S):
            data = await reader.read(_READ)
        if not data:
            raise _Failed("the app closed during the handshake")
        counts[1] += len(data)
        ws_conn.receive_data(data)
        for event in ws_conn.events():
            if isinstance(event, ws.AcceptConnection):
                accepted = event
            elif isinstance(event, ws.RejectConnection):
                return  # handle() refuses the upgrade
            else:
                pending.append(event)
    await send({"type": "websocket.accept", "subprotocol": accepted.subprotocol})
    accepted_out[0] = True
    last = [time.monotonic()]

    async def to_app() -> None:
        while True:
            message = await receive()
            last[0] = time.monotonic()
            if message["type"] == "websocket.disconnect":
                data = ws_conn.send(ws.CloseConnection(code=message.get("code", 1000)))
            elif message.get("bytes") is not None:
                data = ws_conn.send(ws.Message(data=message["bytes"]))
            else:
                data = ws_conn.send(ws.Message(data=message.get("text") or ""))
            counts[0] += len(data)
            writer.write(data)
            await writer.drain()
            if message["type"] == "websocket.disconnect":
                return

    async def from_app() -> None:
        events = pending
        parts: list[Any] = []  # a message the app sends in several frames
        size = 0
        while True:
            for event in events:
                if isinstance(event, (ws.TextMessage, ws.BytesMessage)):
                    parts.append(event.data)
                    size += len(event.data)
                    if size > _MAX_WS_MESSAGE:
                        await send({"type": "websocket.close", "code": 1009})
                        return
                    if not event.message_finished:
                        continue
                    whole = "".join(parts) if isinstance(event, ws.TextMessage) else None
                    if whole is not None:
                        await send({"type": "websocket.send", "text": whole})
                    else:
                        await send({"type": "websocket.send", "bytes": b"".join(parts)})
                    parts, size = [], 0
                elif isinstance(event, ws.Ping):
                    writer.write(ws_conn.send(event.response()))
                    await writer.drain()  # a ping flood must wait for the app to read
                elif isinstance(event, ws.CloseConnection):
                    with contextlib.suppress(Exception):
                        writer.write(ws_conn.send(event.response()))
                    await send({"type": "websocket.close", "code": event.code})
                    return
            try:
                async with asyncio.timeout(min(30.0, IDLE_TIMEOUT_S)):
                    data = await reader.read(_READ)
            except TimeoutError:
                if time.monotonic() - last[0] < IDLE_TIMEOUT_S:
                    events = []
                    continue
                data = b""  # idle both ways for too long: close
            last[0] = time.monotonic()
            if not data:
                await send({"type": "websocket.close", "code": 1006})
                return
            counts[1] += len(data)
            ws_conn.receive_data(data)
            events = list(ws_conn.events())

    tasks = [asyncio.create_task(t) for t in (to_app(), from_app())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
