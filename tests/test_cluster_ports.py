"""Ingress across the cluster (moat.cluster.ports), without Ray: the node end over a real
asyncio stream pair, the server end over a fake node call. No byte is lost when a caller's
read times out, writes keep their order and their bound, a gone node reads as a reset."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from moat.cluster.ports import READ_MAX, WRITE_MAX, NodePorts, RemoteReader, RemoteWriter


class _Sink:
    """A writer that keeps what it is given (the sandbox's side of a stream)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_the_node_end_reads_bounded_pieces_and_refuses_oversized_writes() -> None:
    async def scenario() -> None:
        ports = NodePorts()
        reader, sink = asyncio.StreamReader(limit=1 << 22), _Sink()
        conn = ports.add(reader, sink)
        assert await ports.read(conn, 0.05) == (b"", False)  # nothing yet: a long poll ends
        reader.feed_data(b"x" * (READ_MAX + 10))
        first, eof = await ports.read(conn, 1)
        assert len(first) == READ_MAX and not eof  # at most READ_MAX per call
        reader.feed_eof()
        assert await ports.read(conn, 1) == (b"x" * 10, False)
        assert await ports.read(conn, 1) == (b"", True)
        assert await ports.write(conn, b"abc") is True and bytes(sink.data) == b"abc"
        assert await ports.write(conn, b"y" * (WRITE_MAX + 1)) is False  # over the bound
        ports.close(conn)
        assert sink.closed
        assert await ports.write(conn, b"late") is False  # a closed stream takes nothing
        assert await ports.read(conn, 1) == (b"", True)

    asyncio.run(scenario())


class _FakeNode:
    """The server's view of a node: port_read answers from a queue, port_write records."""

    def __init__(self) -> None:
        self.pieces: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue()
        self.written: list[bytes] = []
        self.calls: list[str] = []
        self.fail_writes = False

    async def call(self, method: str, args: tuple[Any, ...]) -> Any:
        self.calls.append(method)
        if method == "port_read":
            return await self.pieces.get()
        if method == "port_write":
            await asyncio.sleep(0.01)
            if self.fail_writes:
                return False
            self.written.append(args[1])
            return True
        if method == "port_close":
            return None
        raise AssertionError(method)


def test_a_timed_out_read_loses_no_byte_and_read_n_keeps_its_bound() -> None:
    async def scenario() -> None:
        node = _FakeNode()
        reader = RemoteReader(node.call, "c1", 5.0)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):  # the caller gives up (an idle timeout)
                await reader.read(10)
        node.pieces.put_nowait((b"0123456789abcdef", False))
        assert await reader.read(10) == b"0123456789"  # the same call, still in flight
        assert node.calls.count("port_read") == 1
        assert await reader.read(100) == b"abcdef"
        node.pieces.put_nowait((b"", True))
        assert await reader.read(5) == b"" and reader.at_eof()

    asyncio.run(scenario())


def test_a_gone_node_reads_as_a_reset() -> None:
    async def gone(method: str, args: tuple[Any, ...]) -> Any:
        raise RuntimeError("the actor died")

    async def scenario() -> None:
        with pytest.raises(ConnectionResetError):
            await RemoteReader(gone, "c1", 5.0).read(10)
        writer = RemoteWriter(gone, "c1")
        writer.write(b"abc")
        with pytest.raises(ConnectionResetError):
            await writer.drain()

    asyncio.run(scenario())


def test_writes_keep_their_order_and_bound_then_close_after_them() -> None:
    async def scenario() -> None:
        node = _FakeNode()
        writer = RemoteWriter(node.call, "c1")
        big = bytes(range(256)) * (WRITE_MAX // 128)  # two pieces' worth
        writer.write(b"head:")
        writer.write(big)
        writer.write(b":tail")  # no drain between writes (a WebSocket pong does this)
        await writer.drain()
        assert b"".join(node.written) == b"head:" + big + b":tail"
        assert max(len(w) for w in node.written) <= WRITE_MAX
        writer.write(b"last")
        writer.close()  # what is pending goes first, then the node's end closes
        await writer.wait_closed()
        assert node.written[-1].endswith(b"last") and node.calls[-1] == "port_close"
        node.fail_writes = True
        broken = RemoteWriter(node.call, "c2")
        broken.write(b"x")
        with pytest.raises(ConnectionResetError):
            await broken.drain()
        assert broken.is_closing()

    asyncio.run(scenario())
