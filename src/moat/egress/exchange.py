"""One HTTP/1.1 request and its response through the gateway (plain or intercepted).

Trust domain: host engine. The request head and body come from the sandbox and are hostile;
the response comes from the internet and is untrusted too. The gateway
(:mod:`moat.egress.proxy`) has already decided the destination and pinned its address; here
each request on the connection is checked against it (target and Host header equal the
destination; a placeholder of a secret bound elsewhere refuses it, DESIGN invariant 3),
placeholders are swapped for values on an intercepted connection only, the body streams
with an overlap scan (cut before a foreign placeholder's last byte leaves) and the response
comes back with every form of every secret value scrubbed out (:mod:`moat.egress.reflect`).

Framing (issue 17: request smuggling). Parsing is h11 on both sides, but every client head
first passes the strict checks of :mod:`moat.egress.framing` (:func:`next_request`), the
client's ``Content-Length``/``Transfer-Encoding`` are never forwarded (the gateway states the
upstream framing itself, from its own parse), and an upstream connection is reused for the
next request only after a clean exchange: a request framed by Content-Length (or bodiless),
both messages complete at a boundary, no byte left over, no ambiguous response framing. A
chunked upload ends its upstream connection (an upstream that framed it otherwise must never
read the next request, with its substituted credential, as part of it).

Admission, policy, caps and the audit trail stay with the gateway: it hands in what a
request needs (:class:`Forwarder`) and gets every outcome back through ``record``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import h11

from moat.egress.addr import IPAddress
from moat.egress.broker import SecretBroker
from moat.egress.framing import FramingError, check_request_head, head_end
from moat.egress.hostport import HostPort, parse_absolute_url, parse_authority
from moat.egress.tls import ByteStream, PlainStream
from moat.errors import InvalidArgumentError, LeakBlockedError

__all__ = [
    "READ_SIZE",
    "Ended",
    "Forwarder",
    "Refused",
    "Traffic",
    "next_event",
    "next_request",
    "send_refusal",
]

#: Bytes asked for per read from a client or upstream stream.
READ_SIZE = 256 * 1024

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
        b"expect",
    }
)
#: A request's framing is the gateway's own, never the client's (smuggling, issue 17).
_REQUEST_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_PHRASES = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class Refused(Exception):
    """Refuse the current request with a status and a reason token (and a secret's handle)."""

    def __init__(self, status: int, reason: str, secret: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.secret = secret


class Ended(Exception):
    """The client connection can't go on (a refusal mid-request)."""


class Traffic(Protocol):
    """Byte accounting of the client connection an exchange runs on."""

    up: int
    down: int

    def count(self, up: int = 0, down: int = 0) -> bool: ...

    def final_reason(self, base: str) -> str: ...


class Record(Protocol):
    """Writes the gateway's log line and audit row of one request's outcome."""

    def __call__(
        self,
        method: str,
        dest: HostPort,
        ip: IPAddress,
        *,
        allowed: bool,
        reason: str,
        secret: str | None,
        up: int = 0,
        down: int = 0,
    ) -> object: ...


#: Connect to exactly this address for that destination (TLS when the flag is set).
Dial = Callable[
    [IPAddress, HostPort, bool], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
]


async def send_refusal(stream: ByteStream, status: int, reason: str) -> None:
    """Write a ``status`` response with ``X-Moat-Reason: reason`` and a one-line body."""
    body = f"moat egress refused: {reason}\n".encode()
    head = (
        f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}\r\n"
        f"X-Moat-Reason: {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with contextlib.suppress(OSError, ConnectionError, ssl.SSLError):
        async with asyncio.timeout(2):
            await stream.write(head + body)


async def next_event(
    h: h11.Connection, stream: ByteStream, traffic: Traffic, *, down: bool = False
) -> Any:
    """The next h11 event, reading from ``stream`` as needed (bytes are counted)."""
    while True:
        event = h.next_event()
        if event is h11.NEED_DATA:
            data = await stream.read(READ_SIZE)
            if down:
                traffic.count(down=len(data))
            else:
                traffic.count(up=len(data))
            h.receive_data(data)
            continue
        return event


async def next_request(
    h: h11.Connection, stream: ByteStream, traffic: Traffic, max_head: int
) -> Any:
    """Like :func:`next_event` for a server connection awaiting a request head, but h11 gets
    no byte of a head before the whole head passed :func:`check_request_head`.

    Raises :class:`FramingError` (refuse with 400) for a bad or oversized head.
    """
    if h.their_state is h11.IDLE:
        # Bytes h11 already holds (pipelined after the last message) come first; h11's
        # buffer doesn't change while it is fed nothing.
        held = h.trailing_data[0]
        buf = bytearray(held)
        pos = 0
        while True:
            end = head_end(buf, pos)
            if end is not None:
                if end > max_head:
                    raise FramingError("bad_request:head_too_large")
                check_request_head(bytes(buf[:end]))
                if len(buf) > len(held):  # feeding h11 b"" would mean EOF
                    h.receive_data(bytes(buf[len(held) :]))
                break
            if len(buf) > max_head:
                raise FramingError("bad_request:head_too_large")
            data = await stream.read(READ_SIZE)
            traffic.count(up=len(data))
            if not data:
                if len(buf) > len(held):
                    h.receive_data(bytes(buf[len(held) :]))
                h.receive_data(b"")  # EOF: h11 reports ConnectionClosed or an error
                break
            pos = max(0, len(buf) - 2)  # search only the new bytes (slowloris: no n^2)
            buf += data
    return await next_event(h, stream, traffic)


def _upstream_clean(upstream: PlainStream) -> bool:
    """Whether a kept-alive upstream sits idle at a message boundary (nothing unread, open).

    Unknown (no visible buffer) counts as not clean: dial afresh (fail closed).
    """
    buffered = getattr(upstream.reader, "_buffer", None)
    return buffered is not None and not buffered and not upstream.reader.at_eof()


@dataclass(frozen=True, slots=True)
class Forwarder:
    """Forwards the requests of one client connection to its decided destination.

    ``tls`` marks an intercepted connection (keep-alive, placeholders swapped for values of
    secrets bound to ``dest``); otherwise plain HTTP (one request, never a value).
    ``recheck`` runs first for every request and raises :class:`Refused` to refuse it.
    """

    traffic: Traffic
    client: ByteStream
    h: h11.Connection
    dest: HostPort
    ip: IPAddress
    tls: bool
    broker: SecretBroker
    record: Record
    dial: Dial
    recheck: Callable[[], None] | None = None

    async def exchange(
        self,
        req: h11.Request,
        upstream: PlainStream | None,
        inspect: Callable[[bytes], object] | None,
    ) -> PlainStream | None:
        """Forward one request and its response; returns the upstream for keep-alive.

        ``inspect`` sees the request line and headers before any value is swapped in;
        raising LeakBlockedError refuses the request. A refusal is recorded, answered if no
        response has started, and ends the connection (:class:`Ended`).
        """
        h, dest, ip, tls = self.h, self.dest, self.ip, self.tls
        method = req.method.decode("ascii", "replace")
        used: list[str] = []
        try:
            if self.recheck is not None:
                self.recheck()
            path = self.check_target(req)
            headers = self.check_headers(req)
            if inspect is not None:
                head = b"\n".join(
                    [req.method + b" " + req.target] + [k + b": " + v for k, v in headers]
                )
                try:
                    inspect(head)
                except LeakBlockedError:
                    raise Refused(403, "blocked_by_guard") from None
            if tls:
                headers, used = self.broker.substitute(headers, dest.host)
            if self.broker.has_secrets():
                headers.append((b"accept-encoding", b"identity"))
            # The upstream framing is the gateway's own, from its strict parse (issue 17).
            chunked = any(n == b"transfer-encoding" for n, _ in req.headers)
            length = [v for n, v in req.headers if n == b"content-length"]
            if chunked:
                headers.append((b"transfer-encoding", b"chunked"))
            elif length:
                headers.append((b"content-length", length[0]))
            # Reuse only after a request whose length no upstream can read another way.
            reuse = tls and not chunked
            if not reuse:
                headers.append((b"connection", b"close"))
            if upstream is not None and not _upstream_clean(upstream):
                await upstream.aclose()
                upstream = None
            if upstream is None:
                up_reader, up_writer = await self.dial(ip, dest, tls)
                upstream = PlainStream(up_reader, up_writer)
            uh = h11.Connection(h11.CLIENT)
            await upstream.write(
                uh.send(h11.Request(method=req.method, target=path, headers=headers)) or b""
            )
            if h.they_are_waiting_for_100_continue:
                await self.client.write(
                    h.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                )
            await self._forward_body(upstream, uh)
            clean = await self._forward_response(upstream, uh)
            if (
                not (reuse and clean)
                or uh.our_state is not h11.DONE
                or uh.their_state is not h11.DONE
                or uh.trailing_data[0]
            ):
                # Not at a clean message boundary: never carry another request (invariant 3).
                await upstream.aclose()
                upstream = None
        except Refused as r:
            self.record(method, dest, ip, allowed=False, reason=r.reason, secret=r.secret)
            if h.our_state is h11.SEND_RESPONSE:
                await send_refusal(self.client, r.status, r.reason)
            if upstream is not None:
                await upstream.aclose()
            # The client connection can't be reused after a refusal mid-request.
            raise Ended from None
        except BaseException:
            # Cancelled (policy update, kill, idle timeout) or the client broke: the upstream
            # dies with the exchange, never left open on the host (invariant 5), and the cut
            # request still gets its audit row.
            if upstream is not None:
                with contextlib.suppress(Exception):
                    await upstream.aclose()
            with contextlib.suppress(Exception):
                self._record_allowed(method, used, cut=True)
            raise
        self._record_allowed(method, used, cut=False)
        self.traffic.up = self.traffic.down = 0
        return upstream

    def _record_allowed(self, method: str, used: list[str], *, cut: bool) -> None:
        reason = self.traffic.final_reason("intercepted" if self.tls else "http")
        self.record(
            method,
            self.dest,
            self.ip,
            allowed=True,
            reason=reason + ";cut" if cut else reason,
            secret=",".join(used) or None,
            up=self.traffic.up,
            down=self.traffic.down,
        )

    def check_target(self, req: h11.Request) -> bytes:
        """The origin-form path to send upstream; refuses a foreign target or placeholder."""
        dest = self.dest
        target = req.target.decode("ascii", "replace")
        if target.lower().startswith(("http://", "https://")):
            try:
                _scheme, tdest, path = parse_absolute_url(target)
            except InvalidArgumentError as exc:
                raise Refused(400, "bad_target") from exc
            if (tdest.host, tdest.port) != (dest.host, dest.port):
                raise Refused(403, "host_mismatch")
            target = path
        elif not target.startswith("/"):
            raise Refused(400, "bad_target")
        found = self.broker.foreign_placeholders(target.encode(), dest.host if self.tls else None)
        if found:
            raise Refused(403, "secret_exfiltration", found[0])
        return target.encode("ascii")

    def check_headers(self, req: h11.Request) -> list[tuple[bytes, bytes]]:
        """The headers to send upstream (hop-by-hop dropped); refuses a bad Host header,
        ``Upgrade`` and placeholders of secrets not bound here (any, over plain HTTP)."""
        dest, tls = self.dest, self.tls
        hosts = [v for n, v in req.headers if n == b"host"]
        if len(hosts) != 1:
            raise Refused(400, "host_header_required")
        try:
            hdest = parse_authority(hosts[0].decode("ascii"), 443 if tls else 80)
        except (InvalidArgumentError, UnicodeDecodeError) as exc:
            raise Refused(403, "host_mismatch") from exc
        if (hdest.host, hdest.port) != (dest.host, dest.port):
            raise Refused(403, "host_mismatch")
        if any(n == b"upgrade" for n, _ in req.headers):
            raise Refused(501, "upgrade_not_supported")
        listed = {
            t.strip().lower() for n, v in req.headers if n == b"connection" for t in v.split(b",")
        }
        out: list[tuple[bytes, bytes]] = []
        for name, value in req.headers:
            if name in _HOP_BY_HOP or name in listed or name in _REQUEST_FRAMING:
                continue
            if name == b"accept-encoding" and self.broker.has_secrets():
                continue  # replaced by "identity": responses must stay scannable
            found = self.broker.foreign_placeholders(value, dest.host if tls else None)
            if found:
                reason = "secret_exfiltration"
                if not tls and self.broker.is_bound(found[0], dest.host):
                    reason = "secret_over_plaintext"
                raise Refused(403, reason, found[0])
            out.append((name, value))
        return out

    async def _forward_body(self, upstream: PlainStream, uh: h11.Connection) -> None:
        keep = max(0, self.broker.longest_placeholder - 1)
        host = self.dest.host if self.tls else None
        tail = b""
        while True:
            event = await next_event(self.h, self.client, self.traffic)
            if isinstance(event, h11.Data):
                data = bytes(event.data)
                self.traffic.count(up=len(data))
                if keep:
                    found = self.broker.foreign_placeholders(tail + data, host)
                    if found:
                        # Cut the upstream before the placeholder's last byte leaves.
                        raise Refused(403, "secret_exfiltration", found[0])
                    tail = (tail + data)[-keep:]
                await upstream.write(uh.send(h11.Data(data=data)) or b"")
            elif isinstance(event, h11.EndOfMessage):
                await upstream.write(uh.send(h11.EndOfMessage()) or b"")
                return
            else:
                raise h11.RemoteProtocolError("unexpected event")

    async def _forward_response(self, upstream: PlainStream, uh: h11.Connection) -> bool:
        """Pass the response back scrubbed; returns whether its framing was unambiguous."""
        try:
            return await self._scrubbed_response(upstream, uh)
        except h11.RemoteProtocolError as exc:
            raise Refused(502, "upstream_protocol_error") from exc

    async def _scrubbed_response(self, upstream: PlainStream, uh: h11.Connection) -> bool:
        h, client = self.h, self.client
        scrubber = self.broker.scrubber()
        while True:
            event = await next_event(uh, upstream, self.traffic, down=True)
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    raise Refused(502, "upgrade_not_supported")
                continue
            if isinstance(event, h11.Response):
                break
            raise Refused(502, "upstream_protocol_error")
        names = [n for n, _ in event.headers]
        # Both framings in a response: read it as chunked (h11, RFC 9112 6.3), pass no
        # Content-Length on, and never reuse the connection. (h11 refuses differing lengths.)
        clean = not (b"transfer-encoding" in names and b"content-length" in names)
        headers: list[tuple[bytes, bytes]] = []
        for name, value in event.headers:
            if name in _HOP_BY_HOP or (name == b"content-length" and not clean):
                continue
            if (
                name == b"content-encoding"
                and value.strip().lower() != b"identity"
                and self.broker.has_secrets()
            ):
                # A compressed body can't be scrubbed: fail closed (invariant 3).
                raise Refused(502, "unscannable_response_encoding")
            headers.append((self.broker.scrub(name), self.broker.scrub(value)))
        if h.their_state is h11.MUST_CLOSE or not self.tls:
            headers.append((b"connection", b"close"))
        await client.write(
            h.send(h11.Response(status_code=event.status_code, headers=headers, reason=b"")) or b""
        )
        while True:
            event = await next_event(uh, upstream, self.traffic, down=True)
            if isinstance(event, h11.Data):
                out = scrubber.feed(bytes(event.data))
                if out:
                    await client.write(h.send(h11.Data(data=out)) or b"")
            elif isinstance(event, h11.EndOfMessage):
                rest = scrubber.flush()
                if rest:
                    await client.write(h.send(h11.Data(data=rest)) or b"")
                await client.write(h.send(h11.EndOfMessage()) or b"")
                return clean
            else:
                raise Refused(502, "upstream_protocol_error")
