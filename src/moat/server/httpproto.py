"""The server's HTTP/1.1 protocol: uvicorn's ``httptools`` one, with h11's bound on a head.

uvicorn parses with llhttp through ``httptools`` (Node's parser, in C, fuzzed upstream;
uvicorn's own default): a warm ``POST /execute`` costs ~0.5 ms less CPU than with h11, which
is pure Python. But uvicorn gives httptools no limit on a request's head: a client could send
headers (or chunked-body trailers) without end and the server would keep them all. h11 stopped
at 16 KiB (``h11_max_incomplete_event_size``'s default in uvicorn); this protocol does the
same: more than :data:`MAX_HEAD` bytes that are not body, in one message, since its start or
its last body bytes, answer uvicorn's own 400 and close (the host's availability, DESIGN §1).

Trust domain: host; everything it parses comes from the network (untrusted).
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Bytes of a request that are not its body (request line, headers, trailers, chunk framing)
#: allowed in a row: h11's bound in uvicorn (16 KiB).
MAX_HEAD = 16 * 1024


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that refuses a head (or trailers) over :data:`MAX_HEAD`.

    Counted twice: the target and each header (trailers too) as the parser delivers them, per
    message; and per ``data_received``, for what the parser holds unfinished (one header
    without end): a read that carries no body bytes and does not end the message counts whole,
    body bytes or the message's end reset it. So what it holds is at most the bound plus one
    read."""

    _open = False  # a message has begun and not ended
    _body = False  # body bytes came in this read
    _ended = False  # a message ended in this read
    _head = 0  # non-body bytes in a row
    _fields = 0  # bytes of the message's target, headers and trailers, as parsed

    def on_message_begin(self) -> None:
        self._open = True
        self._fields = 0
        super().on_message_begin()

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

    def on_body(self, body: bytes) -> None:
        self._body = True
        super().on_body(body)

    def on_message_complete(self) -> None:
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
