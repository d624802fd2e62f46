"""Directory watches against a taken-over agent (invariant 6): malformed events, events on a
call that is no watch, oversized names, floods. Checked from outside: what reached the
caller, the host's memory, and whether the sandbox was ended."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from tests.test_hostile_agent import _end, _ended, _hostile, _peak_rss

from moat.errors import PolicyError, SandboxDiedError
from moat.model import FilesystemEvent
from moat.protocol.watch import MAX_QUEUED_EVENTS

pytestmark = pytest.mark.asyncio

_OK = ["fs_events", {"events": [["a", "create"]]}]


@pytest.fixture(autouse=True)
def _short_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    from moat.engine.session import watch

    monkeypatch.setattr(watch, "STOP_WAIT", 0.5)  # this agent never ends its watches


def _watch(*steps: list[Any]) -> dict[str, Any]:
    return {"watch_start": [["watching", {}], *steps]}


async def _collect(sbx: Any, path: str = "d", seconds: float = 3.0) -> list[FilesystemEvent]:
    """The events a watch hands to on_event until it ends (or ``seconds`` pass)."""
    got: list[FilesystemEvent] = []
    handle = await sbx.files.watch_dir(path, got.append)
    try:
        await asyncio.wait_for(handle.wait(), seconds)
    except TimeoutError:
        pass
    finally:
        await handle.stop()
    return got


_BAD = [
    ["fs_events", {"events": [["a", "explode"]]}],  # unknown type
    ["fs_events", {"events": [[7, "create"]]}],  # name not a string
    ["fs_events", {"events": [["a", "create", "TOKEN"]]}],  # extra item
    ["fs_events", {"events": "TOKEN"}],  # not a list
    ["fs_events", {"events": [], "lost": "TOKEN"}],  # lost not a bool
    ["fs_events", {"events": [], "extra": "TOKEN"}],  # an unknown field
    ["fs_events", {"events": [["a\0b", "create"]]}],  # NUL in a name
    ["fs_events", {"events": [[{"$repeat": ["n", 4097]}, "create"]]}],  # name too long
    ["fs_events", {"events": [["a", "create"]] * 257}],  # too many in one frame
    ["started", {"pid": 1}],  # a frame that has no place in a watch
    ["done", {"TOKEN": 1}],  # the watch's end off its schema
]


@pytest.mark.parametrize("bad", _BAD, ids=[str(i) for i in range(len(_BAD))])
async def test_a_malformed_watch_frame_ends_the_sandbox(bad: list[Any]) -> None:
    door, sbx = await _hostile(_watch(_OK, bad))
    try:
        got: list[FilesystemEvent] = []
        errors: list[Any] = []
        with pytest.raises(SandboxDiedError, match="protocol") as err:
            # (the start too, when the decoder refuses the frame read with WATCHING)
            handle = await sbx.files.watch_dir("d", got.append, on_exit=errors.append)
            await asyncio.wait_for(handle.wait(), 10)
        assert "TOKEN" not in str(err.value)
        # (a frame the decoder refuses can take the good one read with it: at most that one)
        assert [(e.name, e.type) for e in got] in ([("a", "create")], [])
        assert await _ended(sbx)
    finally:
        await _end(door)


async def test_a_wellformed_watch_keeps_the_sandbox() -> None:
    # The positive control of the test above: the same agent without the bad frame.
    door, sbx = await _hostile(_watch(_OK))
    try:
        got = await _collect(sbx, seconds=1.0)
        assert [(e.name, e.type) for e in got] == [("a", "create")]
        assert not await _ended(sbx)
    finally:
        await _end(door)


async def test_a_bad_first_frame_ends_the_sandbox() -> None:
    door, sbx = await _hostile({"watch_start": [["fs_events", {"events": [["a", "create"]]}]]})
    try:
        with pytest.raises(SandboxDiedError, match="protocol"):
            await sbx.files.watch_dir("d", lambda e: None)
        assert await _ended(sbx)
    finally:
        await _end(door)


async def test_watch_events_on_a_call_that_is_no_watch_end_the_sandbox() -> None:
    door, sbx = await _hostile({"file_mkdir": [_OK, ["done", {"created": True}]]})
    try:
        with pytest.raises(SandboxDiedError, match="protocol"):
            await sbx.files.make_dir("x")
        assert await _ended(sbx)
    finally:
        await _end(door)


async def test_an_event_flood_is_bounded_and_reported() -> None:
    # 150 frames of 200 events with names of 4,000 characters (the longest the schema lets
    # through, in frames just under the cap): 120 MB of names if the host kept them.
    flood = ["fs_events", {"events": [[{"$repeat": ["n", 4000]}, "write"]] * 200}, "", 150]
    door, sbx = await _hostile(_watch(flood, ["fs_events", {"events": [["last", "create"]]}]))
    before = _peak_rss()
    try:
        handle = await sbx.files.watch_dir("d")  # polling: nobody reads while it floods
        t0 = time.monotonic()
        events: list[FilesystemEvent] = []
        while time.monotonic() - t0 < 60 and not any(e.name == "last" for e in events):
            await asyncio.sleep(0.2)
            events += await handle.get_new_events()
        names = [e.name for e in events]
        assert "last" in names  # the flood was read through, and the watch goes on
        assert any(e.type == "overflow" for e in events)  # the loss is reported
        assert len(events) < 2 * MAX_QUEUED_EVENTS
        grown = _peak_rss() - before
        assert grown < 150 << 20, f"host memory grew by {grown >> 20} MiB"
        assert not await _ended(sbx)  # a flood alone is no protocol violation
        await handle.stop()
    finally:
        await _end(door)


async def test_event_names_pass_the_guard() -> None:
    value = "tok-4f9d2c7a1e8b3f60a5"
    door, sbx = await _hostile(_watch(["fs_events", {"events": [[f"x-{value}-y", "create"]]}]))
    try:
        sbx.guard.register(value, "secret")
        got = await _collect(sbx, seconds=1.0)
        assert got and all(value not in e.name for e in got), got
        assert got[0].name.startswith("x-")  # positive control: the event itself came
    finally:
        await _end(door)


async def test_racing_starts_cannot_pass_the_watch_cap() -> None:
    # An agent that accepts every watch: the host's cap must hold for starts that race
    # across their awaits (they all passed the check before any was counted).
    from moat.protocol.watch import MAX_WATCHERS

    door, sbx = await _hostile(_watch())
    try:
        results = await asyncio.gather(
            *(sbx.files.watch_dir("d", lambda e: None) for _ in range(MAX_WATCHERS + 8)),
            return_exceptions=True,
        )
        started = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, PolicyError)]
        assert len(started) == MAX_WATCHERS and len(refused) == 8, results
        # Stopped together: each stop waits out STOP_WAIT, as this agent never ends a watch.
        await asyncio.gather(*(handle.stop() for handle in started))
    finally:
        await _end(door)
