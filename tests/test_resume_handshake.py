"""The quiesce/resume handshake's pieces (moat.protocol.resume, issue 11).

The agent's channel holds or drops other threads' frames; the host reads up to a restored
agent's announcement within a bound; and the real agent (on the container tier, for speed:
the handshake is the agent's, not the tier's) answers QUIESCE at a frame boundary, writes
nothing until RESUME, goes on after a RESUME without nonce, and starts over after one with a
nonce: the announcement first on the stream, then READY, and no more output for requests of
before. The host's client holds back every send between QUIESCE and its release.
tests/test_pause_gvisor_handshake.py runs it end to end under real checkpoints.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid

import pytest
from tests.conftest import require
from tests.raw_agent import Client

from moat.agent.channel import Channel
from moat.engine.client import AgentClient
from moat.errors import SandboxDiedError
from moat.errors import TimeoutError as MoatTimeoutError
from moat.protocol import AGENT_TO_HOST, HOST_TO_AGENT, Decoder, Frame, MsgType, encode, resume
from moat.runtime.announce import read_announcement
from moat.runtime.spec import SandboxSpec

NONCE = "ab" * resume.NONCE_BYTES


def _frames(data: bytes) -> list[Frame]:
    return Decoder(direction=AGENT_TO_HOST).feed(data)


def test_the_channel_holds_then_mutes_other_threads_frames() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    ch = Channel(w)
    try:
        ch.hold(encode(Frame(MsgType.DONE, 5, {})))
        sender = threading.Thread(target=ch.send, args=(MsgType.STDOUT, 9, b"late"))
        sender.start()
        time.sleep(0.2)
        assert sender.is_alive()  # held: waits
        assert [f.id for f in _frames(os.read(r, 1 << 16))] == [5]
        ch.unhold(mute=True)
        sender.join(5)
        assert not sender.is_alive()
        with pytest.raises(BlockingIOError):  # muted: dropped, nothing written
            os.read(r, 1 << 16)
        ch.muted = False
        ch.send(MsgType.STDOUT, 9, b"now")
        assert [f.payload for f in _frames(os.read(r, 1 << 16))] == [b"now"]
    finally:
        os.close(r)
        os.close(w)


def _reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=1 << 16)
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


@pytest.mark.asyncio
async def test_the_announcement_drops_what_precedes_it_up_to_a_bound() -> None:
    ready = encode(Frame(MsgType.READY, 0, {"version": 1}))
    junk = b"\x00\x01half a frame" * 1000
    reader = _reader(junk + resume.line(NONCE) + ready)
    dropped = await read_announcement(reader, NONCE, time.monotonic() + 5, 1 << 20)
    assert dropped == len(junk)
    assert _frames(await reader.read())[0].type is MsgType.READY
    # more than the bound before it: refused, however it would have ended
    reader = _reader(b"x" * (300 << 10) + resume.line(NONCE))
    with pytest.raises(SandboxDiedError):
        await read_announcement(reader, NONCE, time.monotonic() + 5, 128 << 10)


@pytest.mark.asyncio
async def test_another_nonce_or_none_is_never_taken_for_the_announcement() -> None:
    other = resume.line("cd" * resume.NONCE_BYTES)
    with pytest.raises(asyncio.IncompleteReadError):  # the stream ends: no line
        await read_announcement(_reader(other), NONCE, time.monotonic() + 5, 1 << 20)
    with pytest.raises(TimeoutError):  # the agent says nothing more: the deadline
        await read_announcement(_reader(other, eof=False), NONCE, time.monotonic() + 0.3, 1 << 20)


def test_nonce_shape() -> None:
    assert resume.valid_nonce(NONCE)
    assert not resume.valid_nonce(NONCE.upper())
    assert not resume.valid_nonce(NONCE[:-2])
    assert not resume.valid_nonce(None)


async def _quiet(client: Client, seconds: float) -> list[Frame]:
    """Frames that arrive within ``seconds``."""
    got: list[Frame] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            got.append(await client.frame(timeout=left))
        except TimeoutError:
            break
    return got


@pytest.mark.asyncio
@pytest.mark.container
async def test_the_agent_quiesces_resumes_and_starts_over() -> None:
    from moat.runtime.container import ContainerRuntime

    rt = ContainerRuntime()
    require(rt.probe(), "the container tier")
    sb = await rt.start(SandboxSpec(sandbox_id="h-" + uuid.uuid4().hex[:12], tier="container"))
    try:
        client = Client(sb, timeout=20)
        assert (await client.frame()).type is MsgType.READY
        # a command printing a tick every 20 ms, its output flowing to request 1
        sb.writer.write(
            encode(Frame(MsgType.CMD_START, 1, {"cmd": "while :; do echo t; sleep 0.02; done"}))
        )
        while (await client.frame()).type is not MsgType.STDOUT:
            pass
        sb.writer.write(encode(Frame(MsgType.QUIESCE, 2, {})))
        while (f := await client.frame()).id != 2:
            assert f.id == 1  # the command's output, up to the answer
        assert f.type is MsgType.DONE
        client.pending.clear()
        assert await _quiet(client, 0.5) == []  # quiesced: nothing at all
        sb.writer.write(encode(Frame(MsgType.RESUME, 3, {})))  # the same host goes on
        assert {f.id for f in await _quiet(client, 0.5)} == {1}
        # quiesced again, then a restore's RESUME: the line is the first byte that follows
        sb.writer.write(encode(Frame(MsgType.QUIESCE, 4, {})))
        while (f := await client.frame()).id != 4:
            pass
        assert client.pending == [] and not client.dec._buf
        sb.writer.write(encode(Frame(MsgType.RESUME, 5, {"nonce": NONCE}, os.urandom(64))))
        line = resume.line(NONCE)
        head = await asyncio.wait_for(sb.reader.readexactly(len(line)), 20)
        assert head == line
        assert (await client.frame()).type is MsgType.READY
        # the old request gets nothing more (detached); new ones are answered
        assert [f for f in await _quiet(client, 0.5) if f.id == 1] == []
        _, _, done = await client.request(MsgType.PING)
        assert done.type is MsgType.DONE
        out, code = await client.sh("echo still here")
        assert (out, code) == ("still here\n", 0)
    finally:
        await sb.kill()


class _Writer:
    """What the client writes, as bytes (a transport that never blocks)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None


class _Proc:
    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()
        self.writer = _Writer()


def _sent(proc: _Proc) -> list[Frame]:
    return Decoder(direction=HOST_TO_AGENT).feed(bytes(proc.writer.data))


@pytest.mark.asyncio
async def test_the_client_holds_every_send_between_quiesce_and_release() -> None:
    proc = _Proc()
    client = AgentClient(proc, lambda _reason: None)  # type: ignore[arg-type]
    try:
        quiesce = asyncio.ensure_future(client.quiesce(5))
        await asyncio.sleep(0)
        (q,) = _sent(proc)
        assert q.type is MsgType.QUIESCE
        client.send(MsgType.PING, 99, {})  # another task's request, meanwhile
        drained = asyncio.ensure_future(client.drain())
        await asyncio.sleep(0.05)
        assert len(_sent(proc)) == 1 and not drained.done()  # held back, drain waits
        proc.reader.feed_data(encode(Frame(MsgType.DONE, q.id, {})))
        await asyncio.wait_for(quiesce, 5)
        assert len(_sent(proc)) == 1
        client.release()
        await asyncio.wait_for(drained, 5)
        frames = _sent(proc)
        assert [f.type for f in frames] == [MsgType.QUIESCE, MsgType.RESUME, MsgType.PING]
        assert "nonce" not in frames[1].fields  # the same stream goes on
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_a_quiesce_nobody_answers_fails_typed_and_releases_at_once() -> None:
    proc = _Proc()
    client = AgentClient(proc, lambda _reason: None)  # type: ignore[arg-type]
    try:
        with pytest.raises(MoatTimeoutError, match="keeps running"):
            await client.quiesce(0.2)
        client.send(MsgType.PING, 7, {})  # not held any more
        assert [f.type for f in _sent(proc)] == [MsgType.QUIESCE, MsgType.RESUME, MsgType.PING]
        assert client.dead_reason is None
    finally:
        await client.close()
