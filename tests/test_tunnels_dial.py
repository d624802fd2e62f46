"""Host end of ingress streams (``Tunnels.dial``) against a hostile agent's frames (invariant 6).

The agent answers a dial with TCP_OPEN or TCP_CLOSE of the id the host chose; anything else
with a positive id is forged and ends the sandbox (ProtocolError), and a dial is bounded.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from moat.engine import tunnels
from moat.engine.tunnels import PortNotOpen, Tunnels
from moat.protocol import MsgType, ProtocolError


def _mux() -> tuple[Tunnels, list[tuple[MsgType, int, dict[str, Any]]]]:
    sent: list[tuple[MsgType, int, dict[str, Any]]] = []

    async def drain() -> None:
        return None

    mux = Tunnels(lambda t, sid, f, p: sent.append((t, sid, f)), drain, None)
    return mux, sent


def test_dial_opens_and_refusal_is_port_not_open() -> None:
    async def main() -> None:
        mux, sent = _mux()
        task = asyncio.create_task(mux.dial(8000))
        await asyncio.sleep(0)
        assert sent == [(MsgType.TCP_DIAL, 1, {"port": 8000})]
        mux.on_frame(MsgType.TCP_OPEN, 1, b"", {})
        tunnel = await task
        mux.on_frame(MsgType.TCP_DATA, 1, b"hello", {})
        assert await tunnel.reader.read(5) == b"hello"
        task2 = asyncio.create_task(mux.dial(8001))
        await asyncio.sleep(0)
        mux.on_frame(MsgType.TCP_CLOSE, 2, b"", {})
        with pytest.raises(PortNotOpen):
            await task2
        assert 2 not in mux.streams

    asyncio.run(main())


def test_forged_opens_are_protocol_errors() -> None:
    async def main() -> None:
        mux, _ = _mux()
        with pytest.raises(ProtocolError):
            mux.on_frame(MsgType.TCP_OPEN, 7, b"", {})  # never dialled
        task = asyncio.create_task(mux.dial(8000))
        await asyncio.sleep(0)
        mux.on_frame(MsgType.TCP_OPEN, 1, b"", {})
        tunnel = await task
        mux.on_frame(MsgType.TCP_OPEN, 1, b"", {})  # twice: an issued id, harmless, ignored
        assert mux.streams == {1: tunnel}
        with pytest.raises(ProtocolError):
            mux.on_frame(MsgType.TCP_OPEN, 2, b"", {})  # the next id, not issued yet

    asyncio.run(main())


def test_silent_agent_dial_times_out_and_cap_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tunnels, "DIAL_TIMEOUT", 0.2)
    monkeypatch.setattr(tunnels, "MAX_INGRESS", 2)

    async def main() -> None:
        mux, sent = _mux()
        with pytest.raises(TimeoutError):
            await mux.dial(8000)
        assert sent[-1][0] is MsgType.TCP_CLOSE and not mux.streams  # cleaned up, agent told
        # The agent's answer to the dial we gave up on arrives late: ignored (its TCP_CLOSE
        # is on the way), not a protocol error that would end an honest sandbox.
        mux.on_frame(MsgType.TCP_OPEN, sent[-1][1], b"", {})
        assert not mux.streams
        with pytest.raises(ProtocolError):
            mux.on_frame(MsgType.TCP_OPEN, 99, b"", {})  # an id never issued: forged
        opened = []
        for _ in range(2):
            task = asyncio.create_task(mux.dial(8000))
            await asyncio.sleep(0)
            mux.on_frame(MsgType.TCP_OPEN, sent[-1][1], b"", {})
            opened.append(await task)
        with pytest.raises(ConnectionResetError):
            await mux.dial(8000)
        mux.close_all()
        assert not mux.streams

    asyncio.run(main())
