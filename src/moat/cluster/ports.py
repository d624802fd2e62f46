"""Ingress across the cluster: a byte stream to a port inside a sandbox on another node.

Trust domain: host engine. The node end (:class:`NodePorts`, in the node's actor) opens the
stream with its front door's ``open_port`` (the agent dials 127.0.0.1:port inside, as on one
host) and moves bytes in bounded pieces: a read returns at most ``READ_MAX`` bytes, waiting
at most a long poll for the first; a write carries at most ``WRITE_MAX`` and returns once
the sandbox's stream took it (its credit: backpressure reaches the server). The server end
(:func:`remote_stream`) gives the ingress handler the same ``(reader, writer)`` shapes as
one host's front door. What flows is the user's own app talking to its client, not guarded
(as on one host); every connection is an audit row on the sandbox's node.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final

__all__ = ["READ_MAX", "WRITE_MAX", "NodePorts", "RemoteReader", "RemoteWriter"]

#: The most bytes one read or one write carries per Ray call.
READ_MAX: Final = 256 * 1024
WRITE_MAX: Final = 256 * 1024
#: Streams one node keeps open at once (each sandbox has its own cap, MAX_INGRESS).
MAX_OPEN: Final = 1024


class NodePorts:
    """The node's open ingress streams, by an id the server names them with."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[Any, Any]] = {}

    def add(self, reader: Any, writer: Any) -> str:
        if len(self._open) >= MAX_OPEN:
            writer.close()
            raise ConnectionRefusedError("too many ingress streams on this node")
        conn = secrets.token_hex(8)
        self._open[conn] = (reader, writer)
        return conn

    async def read(self, conn: str, wait: float) -> tuple[bytes, bool]:
        """(bytes, at end): at most READ_MAX; (b"", False) when none came within ``wait``."""
        got = self._open.get(conn)
        if got is None:
            return b"", True
        try:
            data: bytes = await asyncio.wait_for(got[0].read(READ_MAX), min(max(wait, 0), 30))
        except TimeoutError:
            return b"", False
        return data, not data

    async def write(self, conn: str, data: bytes) -> bool:
        """Hand ``data`` to the sandbox's stream; False when it is closed."""
        got = self._open.get(conn)
        if got is None or len(data) > WRITE_MAX:
            return False
        writer = got[1]
        if writer.is_closing():
            return False
        writer.write(data)
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    def close(self, conn: str) -> None:
        got = self._open.pop(conn, None)
        if got is not None:
            got[1].close()


#: Calls the server makes on the node for one stream: (method name, args) -> reply value.
Call = Callable[[str, tuple[Any, ...]], Awaitable[Any]]


class RemoteReader:
    """StreamReader's ``read`` over a node's stream. One read is in flight at a time; a read
    cancelled by its caller (a timeout) leaves it in flight for the next, so no byte is lost."""

    def __init__(self, call: Call, conn: str, wait: float) -> None:
        self._call = call
        self._conn = conn
        self._wait = wait
        self._buf = b""
        self._eof = False
        self._inflight: asyncio.Future[Any] | None = None

    async def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            if self._inflight is None:
                self._inflight = asyncio.ensure_future(
                    self._call("port_read", (self._conn, self._wait))
                )
                # one left behind by a caller that went away ends unread: not an error to log
                self._inflight.add_done_callback(_retrieve)
            fetch = self._inflight
            try:
                data, eof = await asyncio.shield(fetch)
            except Exception:  # noqa: BLE001 - node or stream gone: a reset, as a socket says
                self._inflight = None
                self._eof = True
                raise ConnectionResetError("the sandbox's stream closed") from None
            self._inflight = None
            self._buf, self._eof = bytes(data), bool(eof)
        size = len(self._buf) if n is None or n < 0 else n
        out, self._buf = self._buf[:size], self._buf[size:]
        return out

    def at_eof(self) -> bool:
        return self._eof and not self._buf


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class RemoteWriter:
    """StreamWriter's subset the ingress handler uses, over a node's stream: writes go out in
    order from one sender task, ``drain`` waits until they are in the sandbox's stream."""

    def __init__(self, call: Call, conn: str) -> None:
        self._call = call
        self._conn = conn
        self._pending: list[bytes] = []
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._sender: asyncio.Task[None] | None = None
        self._closing = False
        self._broken = False

    def write(self, data: bytes) -> None:
        if self._closing or self._broken or not data:
            return
        self._pending.append(bytes(data))
        self._flushed.clear()
        self._kick()

    def _kick(self) -> None:
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._pending and not self._broken:
                chunk = b"".join(self._pending)
                self._pending.clear()
                for i in range(0, len(chunk), WRITE_MAX):
                    if not await self._call("port_write", (self._conn, chunk[i : i + WRITE_MAX])):
                        self._broken = True
                        break
        except Exception:  # noqa: BLE001 - node or stream gone: the caller sees a reset
            self._broken = True
        finally:
            if self._broken:
                self._pending.clear()
            if not self._pending:
                self._flushed.set()
            if self._closing and not self._pending:
                with contextlib.suppress(Exception):
                    await self._call("port_close", (self._conn,))

    async def drain(self) -> None:
        await self._flushed.wait()
        if self._broken:
            raise ConnectionResetError("the sandbox's stream closed")

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._kick()  # flushes what is pending, then closes the node's end

    def is_closing(self) -> bool:
        return self._closing or self._broken

    async def wait_closed(self) -> None:
        if self._sender is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._sender), 5)

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default
