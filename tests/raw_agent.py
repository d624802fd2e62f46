"""A minimal host side of the agent protocol, for driver tests below the engine."""

from __future__ import annotations

import asyncio

from moat.protocol import AGENT_TO_HOST, Decoder, Frame, MsgType, encode
from moat.runtime.base import SandboxProcess


class Client:
    """Enough of the host side to drive a real agent through a driver's byte stream."""

    def __init__(self, sb: SandboxProcess, timeout: float = 30) -> None:
        self.sb = sb
        self.dec = Decoder(direction=AGENT_TO_HOST)
        self.pending: list[Frame] = []
        self.next_id = 1
        self.timeout = timeout

    async def frame(self, timeout: float | None = None) -> Frame:
        while not self.pending:
            data = await asyncio.wait_for(self.sb.reader.read(1 << 16), timeout or self.timeout)
            if not data:
                raise EOFError("agent stream closed")
            self.pending += self.dec.feed(data)
        return self.pending.pop(0)

    async def request(self, mtype: MsgType, **fields: object) -> tuple[bytes, bytes, Frame]:
        rid, self.next_id = self.next_id, self.next_id + 1
        self.sb.writer.write(encode(Frame(mtype, rid, dict(fields))))
        await self.sb.writer.drain()
        out, err = b"", b""
        while True:
            f = await self.frame()
            if f.id != rid:
                continue
            if f.type is MsgType.STDOUT:
                out += f.payload
            elif f.type is MsgType.STDERR:
                err += f.payload
            elif f.type in (MsgType.DONE, MsgType.FAIL):
                return out, err, f

    async def sh(self, cmd: str) -> tuple[str, int]:
        out, err, f = await self.request(MsgType.CMD_START, cmd=cmd)
        assert f.type is MsgType.DONE, f
        return (out + err).decode(errors="replace"), int(f.get("exit_code"))
