"""The server's HTTP parser on hostile input: a head (or chunked trailers) without end is cut
at h11's bound, not kept (moat.server.httpproto); a head that does not arrive in time (a
connection that sends nothing, or a head a byte at a time) is closed; malformed requests get
a 400; the server stays healthy. Raw sockets against a real ``moat serve``."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from tests.server_support import Server, new_key, serving, tenant_name

from moat.server.httpproto import BODY_TIMEOUT_S, HEAD_TIMEOUT_S, MAX_HEAD

#: Bytes of a head without end sent before waiting for the server to close the connection.
FLOOD = 4 << 20
#: This module's server's head and body timeouts (MOAT_SERVE_HEAD_TIMEOUT_S and
#: MOAT_SERVE_BODY_TIMEOUT_S; 30 and 60 s by default).
HEAD_S = 3.0
BODY_S = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = Path(tmp_path_factory.mktemp("serve")) / "server.log"
    env = {"MOAT_SERVE_HEAD_TIMEOUT_S": str(HEAD_S), "MOAT_SERVE_BODY_TIMEOUT_S": str(BODY_S)}
    with serving(log, env=env) as srv:
        yield srv


def _connect(server: Server) -> socket.socket:
    u = urlsplit(server.url)
    return socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=10)


def _exchange(server: Server, data: bytes) -> bytes:
    """Send ``data``; everything the server answers until it closes (or 10 s)."""
    with _connect(server) as s:
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
                if b"\r\n\r\n" in got and b"connection: close" not in got.lower():
                    break  # a kept-alive answer: enough
        except TimeoutError:
            pass
        return got


def _flood(server: Server, start: bytes, filler: bytes) -> bytes:
    """Send ``start``, then ``filler`` until FLOOD bytes or the server cuts the connection;
    then wait (10 s at most) for the server to close it. What it answered before closing;
    pytest.fail if it kept the connection open (it took the flood as a request in progress).

    Bytes sent prove nothing here (loopback's socket buffers hold megabytes): the close does.
    """
    sent = 0
    answer = b""
    with _connect(server) as s:
        s.sendall(start)
        try:
            while sent < FLOOD:
                s.sendall(filler)
                sent += len(filler)
            while chunk := s.recv(65536):
                answer += chunk
        except (BrokenPipeError, ConnectionResetError):
            return answer
        except TimeoutError:
            pytest.fail(f"the server kept reading a head without end ({sent} bytes)")
        return answer


def test_a_head_within_the_bound_is_served(server: Server) -> None:
    """Positive control: a large head just under the bound is an ordinary request."""
    pad = b"X-Pad: " + b"a" * (MAX_HEAD - 1024) + b"\r\n"
    got = _exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n" + pad + b"\r\n")
    assert got.startswith(b"HTTP/1.1 200"), got[:200]


def test_a_head_over_the_bound_is_refused(server: Server) -> None:
    pad = b"X-Pad: " + b"a" * (MAX_HEAD + 1024) + b"\r\n"
    got = _exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n" + pad + b"\r\n")
    assert got.startswith(b"HTTP/1.1 400"), got[:200]
    assert server.healthy()


def test_a_head_without_end_is_cut(server: Server) -> None:
    answer = _flood(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"a" * 4096)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert server.healthy()


def test_headers_without_end_are_cut(server: Server) -> None:
    answer = _flood(server, b"GET /health HTTP/1.1\r\nHost: x\r\n", b"X-A: b\r\n" * 512)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert server.healthy()


def test_chunked_trailers_without_end_are_cut(server: Server) -> None:
    start = (
        b"POST /v2/sandboxes HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n"
    )
    _flood(server, start, b"X-T: c\r\n" * 512)  # (a 401 may come first: no key)
    assert server.healthy()


def test_a_large_body_is_not_a_large_head(server: Server) -> None:
    """Body bytes never count towards the bound (an upload is no head): the control plane
    reads a 1 MiB JSON body (refused for its content, not cut as a bad request)."""
    body = b'{"templateID": "' + b"x" * (1 << 20) + b'"}'
    got = _exchange(
        server,
        b"POST /v2/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
    )
    assert got.startswith(b"HTTP/1.1 401"), got[:200]  # no key: its answer, not a 400


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"POST /v2/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /he\x00alth HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_malformed_requests_get_400(server: Server, request_bytes: bytes) -> None:
    got = _exchange(server, request_bytes)
    assert got.startswith(b"HTTP/1.1 400"), got[:200]
    assert server.healthy()


def _get_health(s: socket.socket) -> bytes:
    """GET /health on ``s``; the whole answer (head and Content-Length body)."""
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got and (chunk := s.recv(65536)):
        got += chunk
    if b"\r\n\r\n" not in got:
        return got  # closed by the server
    head, _, body = got.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length and (chunk := s.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def test_an_idle_kept_alive_connection_outlives_the_clients_pause(server: Server) -> None:
    """A client that pauses between calls reuses its pooled connection: the server must not
    have closed it (uvicorn's default 5 s made a call ~5 s later fail with a reset)."""
    from moat.server.serve import KEEP_ALIVE_S

    assert KEEP_ALIVE_S > 90  # the E2B Python SDK's pool (reqwest) keeps a connection 90 s
    with _connect(server) as s:
        assert _get_health(s).startswith(b"HTTP/1.1 200")
        time.sleep(6.5)  # past uvicorn's default, which closed it here
        assert _get_health(s).startswith(b"HTTP/1.1 200")


def _closed_after(s: socket.socket, limit: float) -> float | None:
    """Seconds until the server closes ``s`` (EOF or reset), or None if it is still open
    after ``limit``."""
    t0 = time.monotonic()
    s.settimeout(limit)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def test_an_idle_new_connection_is_closed_after_the_head_timeout(server: Server) -> None:
    """uvicorn arms no timer on a fresh connection: without the head timeout a socket that
    sends nothing was held for ever (bounded only by file descriptors)."""
    assert HEAD_TIMEOUT_S <= 60  # the default an operator gets
    with _connect(server) as s:
        took = _closed_after(s, HEAD_S + 5)
    assert took is not None, "an idle connection was kept past the head timeout"
    assert HEAD_S - 0.5 < took < HEAD_S + 5
    assert server.healthy()


def test_a_head_sent_a_byte_at_a_time_is_cut(server: Server) -> None:
    """Slowloris: the bytes keep coming, but the head has HEAD_S in all, not per byte."""
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    t0 = time.monotonic()
    with _connect(server) as s:
        try:
            for byte in head:  # 100 s of head at this pace
                s.sendall(bytes([byte]))
                time.sleep(0.1)
                if time.monotonic() - t0 > HEAD_S + 5:
                    pytest.fail("a head trickling in was kept past the head timeout")
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut
    assert time.monotonic() - t0 > HEAD_S - 0.5
    assert server.healthy()


def test_a_head_sent_in_pieces_within_the_timeout_is_served(server: Server) -> None:
    """Positive control: a slow client whose head arrives whole in time is answered."""
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with _connect(server) as s:
        for i in range(0, len(head), 8):
            s.sendall(head[i : i + 8])
            time.sleep(0.2)
        got = s.recv(65536)
    assert got.startswith(b"HTTP/1.1 200"), got[:200]


def test_a_response_longer_than_the_head_timeout_is_not_cut(server: Server) -> None:
    """The timer covers a head only: code that runs past it streams to its end, and the
    connection, kept alive, serves the next call."""
    from e2b_code_interpreter import Sandbox

    sbx = Sandbox.create(api_key=new_key(tenant_name("slow")), timeout=60)
    try:
        ex = sbx.run_code(f"import time; time.sleep({HEAD_S + 1.5}); print('slept'); 6 * 7")
        assert ex.error is None and ex.logs.stdout == ["slept\n"] and ex.text == "42"
        assert sbx.commands.run(f"sleep {HEAD_S + 1}; echo done").stdout == "done\n"
        assert sbx.run_code("1 + 1").text == "2"
    finally:
        sbx.kill()


def _create_head(key: str, length: int) -> bytes:
    return (
        b"POST /v2/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-API-Key: " + key.encode() + b"\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n\r\n"
    )


def test_a_body_that_stops_is_cut(server: Server) -> None:
    """A slow POST: the head is whole, the body stops; the app reading it does not wait for
    ever (uvicorn arms no timer while a body is read)."""
    assert BODY_TIMEOUT_S <= 120  # the default an operator gets
    key = new_key(tenant_name("slowbody"))
    with _connect(server) as s:
        s.sendall(_create_head(key, 200) + b'{"templateID": ')
        took = _closed_after(s, BODY_S + 5)
    assert took is not None, "a body that stopped was waited for past the body timeout"
    assert BODY_S - 0.5 < took < BODY_S + 5
    with _connect(server) as s:  # a client that leaves in the middle of its body
        s.sendall(_create_head(key, 200) + b'{"templateID": ')
        time.sleep(0.5)
    time.sleep(0.5)
    assert server.healthy()
    # both ends are the client's, not the server's: nothing logged as a server fault
    assert "Traceback" not in server.log.read_text()


def test_a_body_trickled_within_the_timeout_is_read_whole(server: Server) -> None:
    """Positive control: the limit is on a pause, not on the whole body: a body sent over
    twice the timeout, a piece every 0.25 s, is read whole and answered for its content."""
    key = new_key(tenant_name("trickle"))
    body = b'{"templateID": "no-such-template-' + b"x" * 40 + b'"}'
    t0 = time.monotonic()
    with _connect(server) as s:
        s.sendall(_create_head(key, len(body)))
        step = max(1, len(body) // 28)
        for i in range(0, len(body), step):
            s.sendall(body[i : i + step])
            time.sleep(0.25)
        assert time.monotonic() - t0 > BODY_S * 2
        got = s.recv(65536)
    assert got.startswith(b"HTTP/1.1 4") and b"no-such-template" in got, got[:300]
