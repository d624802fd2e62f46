"""Credit windows of proxied streams (issue 10's ingress throughput, invariant 6).

An ingress stream's download direction gets INGRESS_WINDOW (wider than TCP_WINDOW) on both
ends; the host still refuses one byte past it (a hostile agent can't make it buffer more), an
egress stream keeps TCP_WINDOW, acks come per half window, and an agent that used its
whole credit always gets it back once the gateway reads (no stall waits on a missing ack).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from moat.agent.netproxy import NetProxy
from moat.engine.tunnels import Tunnel, Tunnels
from moat.protocol import INGRESS_WINDOW, MAX_FRAME, TCP_CHUNK, TCP_WINDOW, MsgType, ProtocolError

Sent = list[tuple[MsgType, int, dict[str, Any]]]


def _mux(handler: Any = None) -> tuple[Tunnels, Sent]:
    sent: Sent = []

    async def drain() -> None:
        return None

    mux = Tunnels(lambda t, sid, f, p: sent.append((t, sid, f)), drain, handler)
    return mux, sent


async def _ingress(mux: Tunnels, sent: Sent) -> Tunnel:
    task = asyncio.create_task(mux.dial(8000))
    await asyncio.sleep(0)
    mux.on_frame(MsgType.TCP_OPEN, sent[-1][1], b"", {})
    return await task


def _acked(sent: Sent, sid: int) -> int:
    return sum(f["n"] for t, s, f in sent if t is MsgType.TCP_ACK and s == sid)


def test_ingress_window_is_wider_and_still_a_hard_bound() -> None:
    assert TCP_WINDOW < INGRESS_WINDOW <= 4 * 1024 * 1024  # the memory bound stays small
    assert TCP_CHUNK + 1024 < MAX_FRAME  # a full TCP_DATA frame fits with its header

    async def main() -> None:
        mux, sent = _mux()
        tunnel = await _ingress(mux, sent)
        piece = b"x" * TCP_CHUNK
        for _ in range(INGRESS_WINDOW // TCP_CHUNK):  # a whole window, unread: accepted
            mux.on_frame(MsgType.TCP_DATA, tunnel.id, piece, {})
        assert len(tunnel.reader._buffer) == INGRESS_WINDOW  # type: ignore[attr-defined]
        with pytest.raises(ProtocolError):  # one byte past the credit: the agent is broken
            mux.on_frame(MsgType.TCP_DATA, tunnel.id, b"y", {})

    asyncio.run(main())


def test_egress_streams_keep_the_narrow_window() -> None:
    async def main() -> None:
        hold = asyncio.Event()

        async def handler(reader: Any, writer: Any) -> None:
            await hold.wait()

        mux, _ = _mux(handler)
        mux.on_frame(MsgType.TCP_OPEN, -1, b"", {})
        mux.on_frame(MsgType.TCP_DATA, -1, b"x" * TCP_WINDOW, {})
        with pytest.raises(ProtocolError):
            mux.on_frame(MsgType.TCP_DATA, -1, b"y", {})
        hold.set()
        mux.close_all()

    asyncio.run(main())


def test_acks_per_half_window_and_a_spent_credit_always_returns() -> None:
    async def main() -> None:
        mux, sent = _mux()
        tunnel = await _ingress(mux, sent)
        half = INGRESS_WINDOW // 2
        mux.on_frame(MsgType.TCP_DATA, tunnel.id, b"a" * 1000, {})
        assert await tunnel.reader.read(1000) == b"a" * 1000
        assert _acked(sent, tunnel.id) == 0  # a small read: no ack frame of its own
        # The agent spends all its credit; the gateway reads it in small pieces.
        rest = INGRESS_WINDOW - 1000
        mux.on_frame(MsgType.TCP_DATA, tunnel.id, b"b" * rest, {})
        got = 0
        while got < rest:
            got += len(await tunnel.reader.read(half // 3))
        # Read all it sent: less than half a window is still unacked, so the agent has
        # credit to go on (it only stalls at none, and then a read always acks).
        fed = INGRESS_WINDOW
        assert fed - _acked(sent, tunnel.id) < half
        again = INGRESS_WINDOW - (fed - _acked(sent, tunnel.id))  # all of its credit again
        mux.on_frame(MsgType.TCP_DATA, tunnel.id, b"c" * again, {})
        fed += again
        while len(tunnel.reader._buffer):  # type: ignore[attr-defined]
            await tunnel.reader.read(TCP_CHUNK)
        assert fed - _acked(sent, tunnel.id) < half
        acks = [f["n"] for t, s, f in sent if t is MsgType.TCP_ACK and s == tunnel.id]
        assert all(n >= half for n in acks) and len(acks) <= 8

    asyncio.run(main())


class _Channel:
    def __init__(self) -> None:
        self.sent: list[tuple[MsgType, int, dict[str, Any]]] = []

    def send(self, mtype: MsgType, rid: int, payload: bytes = b"", **fields: Any) -> None:
        self.sent.append((mtype, rid, fields))


def test_agent_grants_the_ingress_window_only_to_dialled_streams() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        ch = _Channel()
        proxy = NetProxy(ch)  # type: ignore[arg-type]
        proxy._dial(1, srv.getsockname()[1])
        st = proxy.streams[1]
        assert ch.sent[-1][:2] == (MsgType.TCP_OPEN, 1)
        assert st.credit == st.window == INGRESS_WINDOW
        # An ack never raises the credit past the window the host grants.
        st.credit = 0
        proxy._inbox.append((MsgType.TCP_ACK, 1, b"", INGRESS_WINDOW * 2))
        proxy._handle_inbox()
        assert st.credit == INGRESS_WINDOW
        proxy._close(st, notify=False)


def test_agent_pipe_is_widened_only_with_privilege(monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl
    import os

    from moat.runtime import pipes

    r, w = os.pipe()
    r2, w2 = os.pipe()
    try:
        default = fcntl.fcntl(r, fcntl.F_GETPIPE_SZ)
        pipes.widen(r)
        want = pipes.AGENT_PIPE_SIZE if os.geteuid() == 0 else default
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == want
        monkeypatch.setattr(os, "geteuid", lambda: 1000)  # unprivileged: the quota is shared
        pipes.widen(r2)
        assert fcntl.fcntl(r2, fcntl.F_GETPIPE_SZ) == default
    finally:
        for fd in (r, w, r2, w2):
            os.close(fd)
