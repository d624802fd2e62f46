"""Fast byte pumping for opaque tunnels: upstream socket -> client, at the protocol level.

Trust domain: host engine. A StreamReader copies every chunk twice and costs a coroutine
switch per chunk; an opaque tunnel's download direction is the hot path of the gateway
(``pip install``), so the upstream side is an :class:`asyncio.Protocol` that writes straight
into the client's writer, pausing the upstream socket while the client's buffer is full
(so a slow client cannot make the host buffer a fast server's bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["SplicePump", "UpstreamPump", "open_pump"]

#: Pause reading upstream when this much is buffered towards the client.
_HIGH_WATER = 1 << 20


class _Sink(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


class UpstreamPump(asyncio.Protocol):
    """The upstream connection of an opaque tunnel; bytes go straight to ``sink``."""

    def __init__(self, sink: _Sink, count: Callable[[int], object]) -> None:
        self._sink = sink
        self._count = count
        # The client writer's transport when it has one (real socket); virtual sinks
        # get a drain after every chunk instead.
        self._sink_transport: Any = getattr(sink, "transport", None)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._draining = False
        self.error: BaseException | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._count(len(data))
        try:
            self._sink.write(data)
        except (OSError, RuntimeError) as exc:
            self._finish(exc)
            return
        st = self._sink_transport
        if st is None or st.get_write_buffer_size() > _HIGH_WATER:
            self._pause_for_drain()

    def eof_received(self) -> bool:
        self._finish(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._can_write.set()
        self._finish(exc)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- helpers ------------------------------------------------------------------------

    def _finish(self, exc: BaseException | None) -> None:
        if exc is not None and self.error is None:
            self.error = exc
        if not self.done.done():
            self.done.set_result(None)

    def _pause_for_drain(self) -> None:
        if self._draining or self.transport is None:
            return
        self._draining = True
        self.transport.pause_reading()
        task = asyncio.ensure_future(self._drain())
        self._drain_task = task  # keep a reference until it ends

    async def _drain(self) -> None:
        try:
            await self._sink.drain()
        except (OSError, ConnectionError, RuntimeError) as exc:
            self._finish(exc)
            return
        finally:
            self._draining = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    async def write(self, data: bytes) -> None:
        """Send ``data`` upstream, waiting while the upstream socket's buffer is full."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("upstream closed")
        self.transport.write(data)
        await self._can_write.wait()

    def write_eof(self) -> None:
        """Half-close towards upstream."""
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self) -> None:
        """Close the upstream connection."""
        if self.transport is not None:
            self.transport.close()


async def open_pump(
    host: str, port: int, sink: _Sink, count: Callable[[int], object]
) -> UpstreamPump | SplicePump:
    """Connect to exactly ``host`` (an address) and pump its bytes into ``sink``.

    Zero-copy (:class:`SplicePump`) when the client is a real socket, else a protocol pump.
    """
    loop = asyncio.get_running_loop()
    client_fd = _client_fd(sink)
    if client_fd is not None:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, (host, port))
            return SplicePump(sock, client_fd, count)
        except BaseException:
            sock.close()
            raise
    _transport, proto = await loop.create_connection(lambda: UpstreamPump(sink, count), host, port)
    return proto


_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_PIPE_SIZE = 1 << 20
#: Splices per wake-up of the upstream socket (see SplicePump._on_upstream).
_ROUNDS = 8


def _client_fd(sink: object) -> int | None:
    """The client's socket fd if ``sink`` is a real socket writer with nothing buffered."""
    transport = getattr(sink, "transport", None)
    if transport is None or not hasattr(os, "splice"):
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM or transport.get_write_buffer_size():
        return None
    fd: int = sock.fileno()
    return fd if fd >= 0 else None


class SplicePump:
    """Zero-copy download path: upstream socket -> pipe -> client socket with splice(2).

    Used when the client is a real socket (Linux); the client's own transport keeps reading
    (the upload direction), while downloads bypass it through a duplicate of its fd. All of
    it runs in the event loop with non-blocking fds: no thread, no copy into Python.
    """

    def __init__(self, up: socket.socket, client_fd: int, count: Callable[[int], object]) -> None:
        self._loop = asyncio.get_running_loop()
        self._up = up
        self._client = os.dup(client_fd)
        self._pr, self._pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._pw, getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_SIZE)
        self._count = count
        self._in_pipe = 0
        self._closed = False
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(self._up.fileno(), self._on_upstream)

    def _on_upstream(self) -> None:
        # Move what is there now, a few rounds per wake-up: one event-loop turn per splice
        # would make the loop, not the kernel, the limit on throughput.
        for _ in range(_ROUNDS):
            try:
                n = os.splice(self._up.fileno(), self._pw, _PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError:
                self._finish()
                return
            if n == 0:
                self._finish()
                return
            self._in_pipe += n
            if self._count(n) is False:
                # Over a cap: stop pulling from upstream now, not when the cancelled task
                # unwinds (each further callback would move up to a pipe's worth past it).
                self._loop.remove_reader(self._up.fileno())
                self._finish()
                return
            self._flush()
            if self._in_pipe:  # the client is slow: _flush switched to waiting for it
                return

    def _flush(self) -> None:
        while self._in_pipe:
            try:
                n = os.splice(self._pr, self._client, self._in_pipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                # The client is slow: stop reading upstream until it drains (backpressure).
                self._loop.remove_reader(self._up.fileno())
                self._loop.add_writer(self._client, self._on_client_writable)
                return
            except OSError:
                self._finish()
                return
            self._in_pipe -= n

    def _on_client_writable(self) -> None:
        self._flush()
        if not self._in_pipe and not self._closed:
            self._loop.remove_writer(self._client)
            self._loop.add_reader(self._up.fileno(), self._on_upstream)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    async def write(self, data: bytes) -> None:
        """Send ``data`` upstream (the upload direction)."""
        await self._loop.sock_sendall(self._up, data)

    def write_eof(self) -> None:
        """Half-close towards upstream."""
        with contextlib.suppress(OSError):
            self._up.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Release every fd (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._up.fileno())
        self._loop.remove_writer(self._client)
        for fd in (self._client, self._pr, self._pw):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._up.close()
        self._finish()
