"""Host end of the proxied TCP streams: each becomes a (reader, writer) for the gateway.

Untrusted input: a stream's frames come from the agent. Credit is enforced here too: an agent
that sends more than the window it was granted is breaking the protocol (invariant 6), so a
hostile sandbox can't make the host buffer without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from moat.errors import SandboxDiedError
from moat.protocol import CHUNK_SIZE, INGRESS_WINDOW, TCP_WINDOW, MsgType, ProtocolError

log = logging.getLogger("moat.engine")

Send = Callable[[MsgType, int, dict[str, Any], bytes], None]
Handler = Callable[[asyncio.StreamReader, Any], Awaitable[None]]
#: Streams one sandbox may have open at once, whatever the gateway's own caps say.
MAX_STREAMS = 256
#: Ingress streams (host -> a port inside) one sandbox may have open at once.
MAX_INGRESS = 64
#: How long the agent gets to connect to a port inside.
DIAL_TIMEOUT = 10.0


class PortNotOpen(Exception):
    """Nothing listens on the port inside the sandbox (or the agent refused the dial)."""


class _Reader(asyncio.StreamReader):
    """A StreamReader that returns credit to the agent as the gateway consumes bytes."""

    def __init__(self, stream: Tunnel, window: int) -> None:
        super().__init__(limit=window)
        self._tunnel = stream
        #: the credit the agent has for this stream: what it sent and we did not ack yet
        #: never exceeds it, so the host buffers at most this much per stream (invariant 6)
        self.window = window
        self.fed = 0
        self.acked = 0

    def push(self, data: bytes) -> None:
        self.fed += len(data)
        if self.fed - self.acked > self.window:
            raise ProtocolError("proxied stream exceeded its credit")
        self.feed_data(data)

    def _maybe_resume_transport(self) -> None:  # called by StreamReader after each read
        super()._maybe_resume_transport()  # type: ignore[misc]
        consumed = self.fed - len(self._buffer) - self.acked  # type: ignore[attr-defined]
        # An ack per half window, not per read: each ack wakes the agent, and on a loaded
        # host every wake-up can cost the gateway its time slice. The agent only stalls with
        # no credit left, and then what it sent is consumed + buffered = window, so draining
        # the buffer always reaches the half: no stall waits on an ack that never comes.
        if consumed >= self.window // 2:
            self.acked += consumed
            self._tunnel.send(MsgType.TCP_ACK, {"n": consumed})


class _Writer:
    """The subset of StreamWriter the gateway uses, over TCP_DATA frames with credit."""

    def __init__(self, stream: Tunnel) -> None:
        self._t = stream
        self._pending = bytearray()
        self._credit = TCP_WINDOW
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._closing = False
        self._eof_sent = False
        self._closed = asyncio.Event()

    def write(self, data: bytes) -> None:
        if self._closing or self._t.dead:
            return
        self._pending += data
        self._flush()

    def _flush(self) -> None:
        while self._pending and self._credit > 0 and not self._t.dead:
            n = min(len(self._pending), self._credit, CHUNK_SIZE)
            chunk = bytes(self._pending[:n])
            del self._pending[:n]
            self._credit -= n
            self._t.send(MsgType.TCP_DATA, {}, chunk)
        if not self._pending or self._t.dead:
            self._pending.clear()
            self._flushed.set()
            if self._closing and not self._eof_sent:
                self._eof_sent = True
                self._t.send(MsgType.TCP_CLOSE, {})
                self._closed.set()
                self._t.end()
        else:
            self._flushed.clear()

    def credit(self, n: int) -> None:
        self._credit = min(self._credit + n, TCP_WINDOW)
        self._flush()

    async def drain(self) -> None:
        await self._t.drain()
        await self._flushed.wait()
        if self._t.dead:
            raise ConnectionResetError("proxied stream closed")

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if not self._closing:
            self._t.send(MsgType.TCP_EOF, {})

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._flush()

    def is_closing(self) -> bool:
        return self._closing or self._t.dead

    async def wait_closed(self) -> None:
        if self._t.dead:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._closed.wait(), 5)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def _kill(self) -> None:
        self._pending.clear()
        self._flushed.set()
        self._closed.set()


class Tunnel:
    """One proxied stream."""

    def __init__(self, mux: Tunnels, sid: int, window: int = TCP_WINDOW) -> None:
        self.mux = mux
        self.id = sid
        self.dead = False
        self.reader = _Reader(self, window)
        self.writer = _Writer(self)
        self.task: asyncio.Task[None] | None = None

    def send(self, mtype: MsgType, fields: dict[str, Any], payload: bytes = b"") -> None:
        if self.dead:
            return
        try:
            self.mux.send(mtype, self.id, fields, payload)
        except SandboxDiedError:
            # The agent is gone (killed, crashed): the stream is over. The gateway must see
            # a closed stream, not our exception in the middle of its pump (which would leave
            # its bookkeeping and the audit row unfinished).
            self.end()

    async def drain(self) -> None:
        try:
            await self.mux.drain()
        except SandboxDiedError as exc:
            self.end()
            raise ConnectionResetError("proxied stream closed") from exc

    def end(self) -> None:
        if not self.dead:
            self.dead = True
            self.reader.feed_eof()
            self.writer._kill()
            self.mux.streams.pop(self.id, None)


class Tunnels:
    """All proxied streams of one sandbox."""

    def __init__(
        self, send: Send, drain: Callable[[], Awaitable[None]], handler: Handler | None
    ) -> None:
        self.send = send
        self.drain = drain
        self.handler = handler
        self.streams: dict[int, Tunnel] = {}
        self._dials: dict[int, asyncio.Future[None]] = {}
        self._ids = itertools.count(1)  # ingress stream ids are positive, the agent's negative
        self._issued = 0  # the highest ingress id handed out

    async def dial(self, port: int) -> Tunnel:
        """Ingress: a stream to ``127.0.0.1:port`` inside the sandbox (the reverse of egress,
        the same credit). Raises PortNotOpen, or ConnectionResetError over the ingress cap."""
        if sum(1 for sid in self.streams if sid > 0) >= MAX_INGRESS:
            raise ConnectionResetError("too many ingress streams")
        sid = next(self._ids)
        self._issued = sid
        tunnel = Tunnel(self, sid, INGRESS_WINDOW)  # the agent grants itself the same (netproxy)
        self.streams[sid] = tunnel
        opened = asyncio.get_running_loop().create_future()
        self._dials[sid] = opened
        try:
            tunnel.send(MsgType.TCP_DIAL, {"port": port})
            async with asyncio.timeout(DIAL_TIMEOUT):
                await opened
        except BaseException:
            if not tunnel.dead:
                tunnel.send(MsgType.TCP_CLOSE, {})
            tunnel.end()
            raise
        finally:
            self._dials.pop(sid, None)
        return tunnel

    def on_frame(self, mtype: MsgType, sid: int, payload: bytes, fields: dict[str, Any]) -> None:
        if mtype is MsgType.TCP_OPEN and sid > 0:
            # The answer to our dial. A dial we gave up on (timed out, cancelled) may still be
            # answered: its TCP_CLOSE is on its way to the agent, so a late open of an id we
            # issued is ignored; an id never issued is forged.
            pending = self._dials.get(sid)
            if pending is None or pending.done():
                if 0 < sid <= self._issued:
                    return
                raise ProtocolError("stream opened that was never dialled")
            pending.set_result(None)
            return
        if mtype is MsgType.TCP_CLOSE and sid in self._dials:
            pending = self._dials[sid]
            if not pending.done():
                pending.set_exception(PortNotOpen())
        if mtype is MsgType.TCP_OPEN:
            if sid >= 0 or sid in self.streams:
                raise ProtocolError("bad stream id")
            if self.handler is None or len(self.streams) >= MAX_STREAMS:
                self.send(MsgType.TCP_CLOSE, sid, {}, b"")
                return
            new = Tunnel(self, sid)
            self.streams[sid] = new
            new.task = asyncio.get_running_loop().create_task(self._run(new))
            return
        t = self.streams.get(sid)
        if t is None:
            return  # a stream we already ended
        if mtype is MsgType.TCP_DATA:
            if t.reader.at_eof():
                return
            t.reader.push(payload)
        elif mtype is MsgType.TCP_EOF:
            t.reader.feed_eof()
        elif mtype is MsgType.TCP_CLOSE:
            t.end()
            if t.task is not None:
                t.task.cancel()
        elif mtype is MsgType.TCP_ACK:
            n = fields["n"]
            if n < 0 or n > TCP_WINDOW:
                raise ProtocolError("bad stream ack")
            t.writer.credit(n)

    async def _run(self, t: Tunnel) -> None:
        assert self.handler is not None
        try:
            await self.handler(t.reader, t.writer)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("egress stream %s failed", t.id)
        finally:
            # Closes once what is pending is delivered (then the stream ends itself).
            t.writer.close()

    def close_all(self) -> None:
        for pending in self._dials.values():
            if not pending.done():
                pending.set_exception(ConnectionResetError("the sandbox ended"))
        for t in list(self.streams.values()):
            t.end()
            if t.task is not None:
                t.task.cancel()
