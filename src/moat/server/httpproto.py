"""The server's HTTP/1.1 protocol: uvicorn's ``httptools`` one, with h11's bound on a head.

uvicorn parses with llhttp through ``httptools`` (Node's parser, in C, fuzzed upstream;
uvicorn's own default): a warm ``POST /execute`` costs ~0.5 ms less CPU than with h11, which
is pure Python. But uvicorn gives httptools no limit on a request's head: a client could send
headers (or chunked-body trailers) without end and the server would keep them all. h11 stopped
at 16 KiB (``h11_max_incomplete_event_size``'s default in uvicorn); this protocol does the
same: more than :data:`MAX_HEAD` bytes that are not body, in one message, since its start or
its last body bytes, answer uvicorn's own 400 and close (the host's availability, DESIGN §1).

Nor does uvicorn time a request: its keep-alive timer starts only after a response, so a
connection that sends nothing, a head a byte at a time (slowloris) or a body that stops
(a slow POST) was held for ever, and idle sockets were bounded only by file descriptors. A
request's head must now arrive whole within ``head_timeout`` (:data:`HEAD_TIMEOUT_S`),
counted from the connection's opening or the message's first byte, and its body may not
pause longer than ``body_timeout`` (:data:`BODY_TIMEOUT_S`) while the app reads it (a pause
of the app's own, uvicorn's flow control, does not count); otherwise the connection is
closed (:func:`with_timeouts`).

Trust domain: host; everything it parses comes from the network (untrusted).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Bytes of a request that are not its body (request line, headers, trailers, chunk framing)
#: allowed in a row: h11's bound in uvicorn (16 KiB).
MAX_HEAD = 16 * 1024
#: Seconds a request's head may take to arrive whole (nginx's ``client_header_timeout`` is 60,
#: Apache's ``RequestReadTimeout`` 20-40): clients send a head in one write.
HEAD_TIMEOUT_S = 30.0
#: Seconds a request's body may go without a byte while the app reads it (nginx's
#: ``client_body_timeout``): the time between two reads, not the whole upload's.
BODY_TIMEOUT_S = 60.0
#: The ASGI scope extension (``scope["extensions"]``) that :func:`reset` calls.
RESET = "moat.reset"
#: The longest a reset waits for what was already written to leave (and be acknowledged).
RESET_DRAIN_S = 1.0


async def reset(scope: MutableMapping[str, Any]) -> None:
    """Make the connection of ``scope``'s request end with a TCP reset when it closes: for a
    response moat cuts on purpose (a sandbox that died under a stream). A client then reads a
    dropped connection (ECONNRESET), as when E2B's edge resets the stream, not a body that
    merely stopped: the E2B Python SDK (its pyqwest transport) takes only the former for a
    transport failure, the one case in which it probes the sandbox's health and reports it
    gone. Waits (at most :data:`RESET_DRAIN_S`) for what was already written to be sent and
    acknowledged first: a reset discards what is still queued. No-op on other servers."""
    hook: Callable[[], Awaitable[None]] | None = scope.get("extensions", {}).get(RESET)
    if hook is not None:
        await hook()


def _queued(sock: Any) -> int:
    """Bytes in the kernel's send queue not yet acknowledged by the peer (SIOCOUTQ)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that refuses a head (or trailers) over :data:`MAX_HEAD`.

    Counted twice: the target and each header (trailers too) as the parser delivers them, per
    message; and per ``data_received``, for what the parser holds unfinished (one header
    without end): a read that carries no body bytes and does not end the message counts whole,
    body bytes or the message's end reset it. So what it holds is at most the bound plus one
    read.

    Timed too (module docstring): one timer per connection, on the head or on the body's
    next bytes. A client stream (Connect's ``StreamInput``) must send within the body
    timeout; its keepalive messages are for that."""

    head_timeout = HEAD_TIMEOUT_S
    body_timeout = BODY_TIMEOUT_S
    _timer: asyncio.TimerHandle | None = None  # the head's or the body's, never both
    _timing: str = ""  # "head" or "body": what the timer waits for
    _open = False  # a message has begun and not ended
    _body = False  # body bytes came in this read
    _ended = False  # a message ended in this read
    _head = 0  # non-body bytes in a row
    _fields = 0  # bytes of the message's target, headers and trailers, as parsed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, what: str) -> None:
        self._disarm()
        seconds = self.head_timeout if what == "head" else self.body_timeout
        self._timing = what
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timing = ""

    def _timed_out(self) -> None:
        what = self._timing
        self._timer, self._timing = None, ""
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # closed, or upgraded (a WebSocket has its own protocol)
        if what == "head" and self.cycle is not None and not self.cycle.response_complete:
            # a pipelined head behind a response still streaming (reads are paused then):
            # the response is not cut; the head gets its time once reads resume
            self._arm("head")
            return
        if what == "body" and (
            self.flow.read_paused
            or (self.cycle is not None and self.cycle.waiting_for_100_continue)
        ):
            # the app is behind, not the client: reads are paused, or the client waits for
            # the "100 Continue" that the app's first read sends
            self._arm("body")
            return
        # debug, not warning: browsers open spare connections they may never use
        self.logger.debug("no request %s bytes in time: connection closed", what)
        self.transport.close()

    def on_message_begin(self) -> None:
        if self._timing != "head":  # a new connection's first head: timed from its opening
            self._arm("head")
        self._open = True
        self._fields = 0
        super().on_message_begin()
        ext: Any = {RESET: self._reset}  # a server's own extension (the ASGI spec's words)
        self.scope["extensions"] = ext

    async def _reset(self) -> None:
        """:func:`reset` on this connection."""
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESET_DRAIN_S
        with contextlib.suppress(OSError):
            while not self.transport.is_closing() and loop.time() < deadline:
                if self.transport.get_write_buffer_size() == 0 and _queued(sock) == 0:
                    break
                await asyncio.sleep(0.01)
            # SO_LINGER on, 0 s: close() sends RST instead of FIN (uvicorn closes a
            # connection whose response was not completed)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        """A head that came whole in one read is bounded here, as parsed: raised from a
        parser callback, it is the parser's error (uvicorn answers 400 and closes)."""
        self._fields += n
        if self._fields > MAX_HEAD:
            self.logger.warning("a request head of more than %d bytes", MAX_HEAD)
            raise ValueError("request head too large")

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade():
            self._disarm()
        else:
            self._arm("body")  # disarmed at once by the message's end if it has no body
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body = True
        self._arm("body")  # the time between two reads, not the whole body's
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._open = False
        self._ended = True
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        self._body = self._ended = False
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._body or self._ended:
            self._head = 0
        elif self._open:
            self._head += len(data)
            if self._head > MAX_HEAD:
                msg = "Invalid HTTP request received."  # uvicorn's words for a bad request
                self.logger.warning("%s (a head of more than %d bytes)", msg, MAX_HEAD)
                self.send_400_response(msg)


def with_timeouts(head: float, body: float) -> type[BoundedHttpToolsProtocol]:
    """:class:`BoundedHttpToolsProtocol` with these ``head_timeout`` and ``body_timeout``
    (uvicorn takes a protocol class, not an instance)."""
    for seconds in (head, body):
        if not 0 < seconds <= 3600:
            raise ValueError("a timeout is more than 0 and at most 3600 seconds")
    return type(
        "BoundedHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {"head_timeout": head, "body_timeout": body},
    )
