"""The server protocol's read timeouts (moat.server.httpproto) on what they must not cut.

A real uvicorn with moat's protocol class and 1 s timeouts, in this process, and a tiny ASGI
app: a WebSocket (ingress's protocol after the upgrade) idles past both timeouts and still
echoes; an upload whose app reads slowly (uvicorn pauses reads: the app's pause, not the
client's) is read whole. Controls: a connection that sends nothing is closed by the same
server, and a body that stops is cut, so the timeouts are on.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from wsproto import ConnectionType, WSConnection
from wsproto import events as ws

from moat.server.httpproto import with_timeouts

TIMEOUT_S = 1.0
#: What the slow reader's app waits before reading each part of the body: longer than the
#: timeout, so only the paused reads keep the upload alive.
APP_PAUSE_S = 1.5
UPLOAD = 256 << 10  # past uvicorn's 64 KiB high-water mark: reads get paused


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()  # connect
        await send({"type": "websocket.accept"})
        while True:
            msg = await receive()
            if msg["type"] != "websocket.receive":
                return
            await send({"type": "websocket.send", "text": "echo:" + msg["text"]})
    if scope["type"] != "http":
        return
    total = 0
    more = True
    while more:
        if scope["path"] == "/slow":
            await asyncio.sleep(APP_PAUSE_S)  # the app, not the client, is slow
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        total += len(msg.get("body", b""))
        more = msg.get("more_body", False)
    body = str(total).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, lifespan="off", log_level="warning", ws="wsproto",
        http=with_timeouts(TIMEOUT_S, TIMEOUT_S),
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)
    sock.close()


def _closed_within(s: socket.socket, limit: float) -> bool:
    s.settimeout(limit)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_control_an_idle_connection_and_a_stopped_body_are_closed(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert _closed_within(s, TIMEOUT_S + 3)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        assert _closed_within(s, TIMEOUT_S + 3)


def test_a_websocket_idle_past_the_timeouts_still_echoes(port: int) -> None:
    conn = WSConnection(ConnectionType.CLIENT)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(conn.send(ws.Request(host="x", target="/")))
        got: list[str] = []
        sent = False
        while len(got) < 1:
            data = s.recv(65536)
            assert data, "the server closed the WebSocket"
            conn.receive_data(data)
            for event in conn.events():
                if isinstance(event, ws.AcceptConnection) and not sent:
                    time.sleep(TIMEOUT_S * 2.5)  # past the head's and the body's timeouts
                    s.sendall(conn.send(ws.Message(data="still here")))
                    sent = True
                elif isinstance(event, ws.TextMessage):
                    got.append(event.data)
        assert got == ["echo:still here"]
        s.sendall(conn.send(ws.CloseConnection(code=1000)))


def test_an_upload_the_app_reads_slowly_is_read_whole(port: int) -> None:
    """The client sends at once; the app pauses before each read for longer than the
    timeout (uvicorn pauses reads meanwhile): the body is not cut."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % UPLOAD)
        s.sendall(b"x" * UPLOAD)
        got = b""
        while b"\r\n\r\n" not in got or not got.endswith(str(UPLOAD).encode()):
            chunk = s.recv(65536)
            assert chunk, f"cut: {got[:200]!r}"
            got += chunk
    assert got.startswith(b"HTTP/1.1 200")
