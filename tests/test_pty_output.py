"""A PTY's output through the guard (``moat.engine.ptyout.PtySink``): bytes in, bytes out,
redaction at every chunk boundary, every other byte unchanged (DESIGN invariant 4)."""

from __future__ import annotations

import asyncio
import random

import pytest

from moat.engine.ptyout import FAST_RELEASE, SMALL_CHUNK, PtySink
from moat.errors import LeakBlockedError
from moat.guard import Guard, GuardPolicy

SECRET = "Zq8vR2mXw4Lp9TnB7kYc3HdF6sJa1GeU"  # made-up value for the tests
MARK = b"[REDACTED:TOKEN]"


def _run(guard: Guard, chunks: list[bytes], pause: float = 0.0) -> list[bytes]:
    """Feed ``chunks`` (with ``pause`` seconds between them) and finish: what was delivered."""
    out: list[bytes] = []

    async def deliver(data: bytes) -> None:
        out.append(data)

    async def main() -> None:
        sink = PtySink(guard.stream("pty"), deliver)
        for chunk in chunks:
            await sink.feed(chunk)
            if pause:
                await asyncio.sleep(pause)
        await sink.finish()

    asyncio.run(main())
    return out


def test_value_split_at_every_offset_is_redacted_and_the_rest_is_byte_exact() -> None:
    guard = Guard(sensitive=[(SECRET, "TOKEN")])
    before = b"\x1b[1;31m\xe2\x82\xac \xff\xfe raw "  # SGR, a euro sign, invalid UTF-8
    after = b"\x1b[0m\r\n\x1b[?1049h\x00"
    whole = before + SECRET.encode() + after
    for cut in range(1, len(whole)):
        got = b"".join(_run(guard, [whole[:cut], whole[cut:]]))
        assert got == before + MARK + after, cut


def test_random_chunking_round_trips_every_byte_value() -> None:
    guard = Guard(sensitive=[(SECRET, "TOKEN")])
    rng = random.Random(7)
    # every byte value; text; a genuine character of the range that escapes stand in
    data = bytes(range(256)) * 8 + "héllo wörld ✓ 𝄞 \U0010ffab".encode() * 50
    data += SECRET.encode()[:9]  # a prefix only: not redacted
    cuts = sorted(rng.sample(range(1, len(data)), 200))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    assert b"".join(_run(guard, chunks)) == data


def test_a_character_split_across_chunks_is_delivered_whole() -> None:
    guard = Guard(sensitive=[(SECRET, "TOKEN")])
    out = _run(guard, [b"a\xe2", b"\x82", b"\xacb"], pause=FAST_RELEASE * 4)
    assert b"".join(out) == "a€b".encode()
    for piece in out:  # each delivery is valid UTF-8 on its own (E2B's tests decode each)
        piece.decode("utf-8")


def test_small_chunks_are_released_fast_large_ones_wait() -> None:
    """A keystroke's echo is out after FAST_RELEASE, not the 200 ms idle release; bulk
    output keeps the long one."""
    guard = Guard(sensitive=[(SECRET, "TOKEN")])
    seen: list[tuple[float, bytes]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def deliver(data: bytes) -> None:
            seen.append((loop.time(), data))

        sink = PtySink(guard.stream("pty"), deliver)
        t0 = loop.time()
        await sink.feed(b"a")
        await asyncio.sleep(0.1)
        assert seen and seen[0][1] == b"a" and seen[0][0] - t0 < 0.09
        big = b"x" * SMALL_CHUNK
        t1 = loop.time()
        await sink.feed(big)
        await asyncio.sleep(0.1)
        assert len(seen) == 1  # held: bulk output waits for the long idle release
        await asyncio.sleep(0.25)
        assert b"".join(d for _, d in seen[1:]) == big and seen[1][0] - t1 >= 0.19
        await sink.finish()

    asyncio.run(main())


def test_block_mode_raises_and_releases_nothing_of_the_value() -> None:
    guard = Guard(sensitive=[(SECRET, "TOKEN")], policy=GuardPolicy(mode="block"))
    with pytest.raises(LeakBlockedError):
        out = _run(guard, [b"ok ", SECRET.encode()[:5], SECRET.encode()[5:]])
        assert SECRET[:5].encode() not in b"".join(out)


def test_a_reader_that_leaves_frees_a_stalled_terminal_stream() -> None:
    """A reader that stops, then leaves: the idle release waiting for room ends, and nothing
    more is held (before, that task waited forever holding the 4 MiB backlog)."""
    import asyncio

    from moat.engine.api import PTY_BACKLOG, _Stream
    from moat.engine.ptyout import PtySink

    class Hold:  # holds the last 10 characters back, like a guard's window
        def __init__(self) -> None:
            self.buf = ""

        def feed(self, s: str) -> str:
            self.buf += s
            out, self.buf = self.buf[:-10], self.buf[-10:]
            return out

        @property
        def pending(self) -> int:
            return len(self.buf)

        def release_idle(self) -> str:
            out, self.buf = self.buf, ""
            return out

        def flush(self) -> str:
            return self.release_idle()

    async def main() -> None:
        stream = _Stream()
        sink = PtySink(Hold(), stream.push_pty)

        async def work() -> None:
            try:
                while True:
                    await sink.feed(b"x" * 100_000)
                    await asyncio.sleep(0.25)  # idle: the release fires
            except BaseException:
                sink.abandon()
                raise

        stream.run(work)
        events = stream.events()
        await events.__anext__()
        for _ in range(300):  # the reader stalls: the backlog fills past its cap
            if stream.backlog > PTY_BACKLOG:
                break
            await asyncio.sleep(0.1)
        assert stream.backlog > PTY_BACKLOG  # the writer now waits for room
        await asyncio.sleep(0.5)
        await events.aclose()  # type: ignore[attr-defined]  # the reader leaves
        await asyncio.sleep(0.5)
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert stream.task is not None and stream.task.done()
        assert not rest, rest  # no idle release left waiting

    asyncio.run(main())
