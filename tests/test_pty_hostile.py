"""Terminals against a taken-over agent (invariant 6): its PTY frames are output like any
other (guarded, whatever frame type carries them), and a reply off its schema ends the
sandbox. On the scripted agent of tests/hostile_agent.py."""

from __future__ import annotations

import asyncio
import resource
import secrets
from typing import Any

import pytest
from tests.test_hostile_agent import _end, _ended, _hostile

from moat.errors import SandboxDiedError

pytestmark = pytest.mark.asyncio


async def test_pty_output_of_every_frame_type_passes_the_guard() -> None:
    v = "sensitive-" + secrets.token_hex(8)
    script = {
        "cmd_start": [
            ["started", {"pid": 7, "pty": True}],
            ["pty", {}, "\x1b[1m" + v[:9]],
            ["pty", {}, v[9:] + "\r\n"],
            ["stdout", {}, "and " + v + "\r\n"],  # not a PTY frame: the same guarded stream
            ["stderr", {}, v[:5]],
            ["stderr", {}, v[5:] + "\r\n"],
            ["done", {"exit_code": 0}],
        ]
    }
    door, sbx = await _hostile(script, sensitive=[v])
    try:
        got: list[bytes] = []
        h = await sbx.pty.create(80, 24, on_data=got.append)
        assert (await h.wait()).exit_code == 0
        out = b"".join(got)
        assert v.encode() not in out and v[:9].encode() not in out
        assert out.count(b"[REDACTED") == 3, out  # positive control: all three came through
        assert out.startswith(b"\x1b[1m")
    finally:
        await _end(door)


_BAD: list[tuple[str, list[list[Any]]]] = [
    ("cmd_start", [["started", {"pid": 7}]]),  # a PTY without a terminal
    ("cmd_start", [["started", {"pid": 7, "pty": "yes"}]]),  # off the frame schema
    ("cmd_start", [["started", {"pid": 7, "pty": True}], ["done", {"exit_code": "TOKEN"}]]),
    ("cmd_start", [["started", {"pid": 7, "pty": True}], ["result", {"data": {}, "is_main": 1}]]),
    ("cmd_start", [["started", {"pid": 7, "pty": True}], ["cmd_resize", {"pid": 1}]]),
]


@pytest.mark.parametrize("verb,reply", _BAD, ids=[str(i) for i in range(len(_BAD))])
async def test_a_malformed_pty_reply_ends_the_sandbox(verb: str, reply: list[list[Any]]) -> None:
    door, sbx = await _hostile({verb: reply})
    try:
        with pytest.raises(SandboxDiedError) as err:
            h = await sbx.pty.create(80, 24)
            await h.wait()
        assert "TOKEN" not in str(err.value)
        assert await _ended(sbx)
    finally:
        await _end(door)


async def test_a_resize_reply_off_its_schema_ends_the_sandbox() -> None:
    script = {
        "cmd_start": [["started", {"pid": 7, "pty": True}]],
        "cmd_resize": [["done", {"cols": "TOKEN"}]],
    }
    door, sbx = await _hostile(script)
    try:
        h = await sbx.pty.create(80, 24)
        with pytest.raises(SandboxDiedError, match="protocol"):
            await h.resize(100, 30)
        assert await _ended(sbx)
    finally:
        await _end(door)


async def test_a_pty_flood_to_a_slow_reader_stays_bounded() -> None:
    """300 MB of terminal output for a reader that takes its time: host memory stays bounded
    (the backlog waits, the call's queue drops past its cap and marks the call truncated)."""
    script = {
        "cmd_start": [
            ["started", {"pid": 7, "pty": True}],
            ["pty", {}, "x" * 60_000, 5_000],
            ["done", {"exit_code": 0}],
        ]
    }
    door, sbx = await _hostile(script)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        seen = 0

        async def slow(data: bytes) -> None:
            # At most ~10 MB/s whatever the chunks' size (merged chunks grow on a loaded
            # machine, and a fixed pause per chunk once let this reader keep up).
            nonlocal seen
            seen += len(data)
            await asyncio.sleep(0.01 + len(data) / 10e6)

        h = await sbx.pty.create(80, 24, on_data=slow, timeout=120)
        result = await h.wait()
        assert result.truncated and 0 < seen < 300_000_000
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        assert grown < 200 << 20, f"host memory grew by {grown >> 20} MiB"
    finally:
        await _end(door)
