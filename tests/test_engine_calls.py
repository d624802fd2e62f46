"""The host's per-call frame queue: output frames waiting behind each other are merged."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from moat.engine.client import _DEAD, MERGE_OUTPUT, Call
from moat.errors import SandboxDiedError
from moat.protocol import Frame, MsgType


class _Client:
    dead_reason: str | None = "gone"


def _call() -> Call:
    client: Any = _Client()
    return Call(client, 7)


def test_output_frames_merge_in_order_and_other_frames_keep_their_place() -> None:
    async def main() -> list[Frame]:
        call = _call()
        for item in (
            Frame(MsgType.STDOUT, 7, {}, b"a"),
            Frame(MsgType.STDOUT, 7, {}, b"b"),
            Frame(MsgType.STDERR, 7, {}, b"e1"),
            Frame(MsgType.STDERR, 7, {}, b"e2"),
            Frame(MsgType.STDOUT, 7, {}, b"c"),
            Frame(MsgType.RESULT, 7, {"data": {}, "is_main": True}),
            Frame(MsgType.STDOUT, 7, {}, b"d"),
            Frame(MsgType.DONE, 7, {}),
        ):
            call.put(item)
        out: list[Frame] = []
        while not out or out[-1].type is not MsgType.DONE:
            out.append(await call.next())
        return out

    got = [(f.type, f.payload) for f in asyncio.run(main())]
    assert got == [
        (MsgType.STDOUT, b"ab"),
        (MsgType.STDERR, b"e1e2"),
        (MsgType.STDOUT, b"c"),
        (MsgType.RESULT, b""),
        (MsgType.STDOUT, b"d"),
        (MsgType.DONE, b""),
    ]


def test_merging_stops_at_the_cap_and_read_frames_are_not_touched() -> None:
    async def main() -> list[int]:
        call = _call()
        big = b"x" * (MERGE_OUTPUT // 2 + 1)
        call.put(Frame(MsgType.STDOUT, 7, {}, big))
        call.put(Frame(MsgType.STDOUT, 7, {}, big))  # would exceed the cap: its own frame
        first = await call.next()
        call.put(Frame(MsgType.STDOUT, 7, {}, b"y"))  # merges with the second, not the first
        return [len(first.payload), len((await call.next()).payload)]

    half = MERGE_OUTPUT // 2 + 1
    assert asyncio.run(main()) == [half, half + 1]


def test_a_dead_agent_keeps_failing_after_queued_output() -> None:
    async def main() -> None:
        call = _call()
        call.put(Frame(MsgType.STDOUT, 7, {}, b"last words"))
        call.put(_DEAD)
        assert (await call.next()).payload == b"last words"
        for _ in range(2):
            with pytest.raises(SandboxDiedError):
                await call.next()

    asyncio.run(main())


def test_next_waits_for_a_frame() -> None:
    async def main() -> bytes:
        call = _call()
        asyncio.get_running_loop().call_later(0.05, call.put, Frame(MsgType.STDOUT, 7, {}, b"z"))
        return (await asyncio.wait_for(call.next(), 5)).payload

    assert asyncio.run(main()) == b"z"
