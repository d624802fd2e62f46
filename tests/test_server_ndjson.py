"""/execute's NDJSON stream, without a server: what goes out in one chunk, what goes out at
once, and that a client's leaving ends the call (moat.server.sandbox._ExecStream).

The server tests (test_server_e2b.py) drive the same stream over HTTP with the real SDKs;
these pin the write pattern and the disconnect watch, which HTTP hides."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from moat.errors import SandboxDiedError
from moat.model import End, Event, Output, Result, ResultEvent
from moat.server import sandbox as plane


class _Events:
    """An event stream: ``script`` items are events, seconds to sleep, or an exception to
    raise; ``hang`` waits forever at the end. Records whether it was closed."""

    def __init__(self, *script: Any, hang: bool = False, flood: bool = False) -> None:
        self.script = script
        self.hang = hang
        self.flood = flood  # output without end, and never a wait for it
        self.closed = False

    async def run(self) -> AsyncIterator[Event]:
        try:
            for item in self.script:
                if isinstance(item, float):
                    await asyncio.sleep(item)
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
            while self.flood:
                await asyncio.sleep(0)
                yield Output("stdout", "x" * 1000)
            if self.hang:
                await asyncio.Event().wait()
        finally:
            self.closed = True


async def _respond(
    events: _Events, disconnect_after: float | None = None
) -> tuple[list[tuple[float, dict[str, Any]]], _Events]:
    """Run an _ExecStream as the server would; the ASGI messages it sent, with their times."""
    stream = events.run()
    first = asyncio.ensure_future(anext(stream))
    sent: list[tuple[float, dict[str, Any]]] = []
    t0 = time.monotonic()

    async def receive() -> dict[str, Any]:
        if disconnect_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(disconnect_after or 0)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append((time.monotonic() - t0, message))

    response = plane._ExecStream(stream, first)
    await response({"type": "http"}, receive, send)  # type: ignore[arg-type]
    return sent, events


def _bodies(sent: list[tuple[float, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [m for _, m in sent if m["type"] == "http.response.body"]


def _lines(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(x) for x in body.splitlines()]


def test_events_that_come_at_once_go_out_as_one_chunk_with_the_end() -> None:
    result = ResultEvent(Result(text="2", is_main_result=True))
    sent, events = asyncio.run(_respond(_Events(result, End(execution_count=3))))
    assert sent[0][1]["type"] == "http.response.start"
    assert (b"content-type", b"application/x-ndjson") in sent[0][1]["headers"]
    bodies = _bodies(sent)
    assert len(bodies) == 1 and bodies[0]["more_body"] is False  # the body's end, same write
    assert [x["type"] for x in _lines(bodies[0]["body"])] == [
        "result", "number_of_executions", "end_of_execution",
    ]  # fmt: skip
    assert _lines(bodies[0]["body"])[1]["execution_count"] == 3
    assert events.closed


def test_a_line_is_not_held_back_waiting_for_a_later_event() -> None:
    """Output while the code still runs goes out at once (positive control of the batching:
    the end, 0.5 s later, is a chunk of its own)."""
    script = (Output("stdout", "early\n"), 0.5, Output("stdout", "late\n"), End())
    sent, _ = asyncio.run(_respond(_Events(*script)))
    bodies = [(t, m) for t, m in sent if m["type"] == "http.response.body"]
    assert len(bodies) == 2
    (t1, m1), (t2, m2) = bodies
    assert _lines(m1["body"]) == [
        {"type": "stdout", "text": "early\n", "timestamp": _lines(m1["body"])[0]["timestamp"]}
    ]
    assert m1["more_body"] is True and t1 < 0.3 <= t2
    assert [x["type"] for x in _lines(m2["body"])] == ["stdout", "end_of_execution"]
    assert m2["more_body"] is False


def test_the_clients_leaving_ends_the_call() -> None:
    """A client that leaves while the code runs closes the event stream (which interrupts
    the code in the sandbox); positive control: a client that stays keeps it open."""
    t0 = time.monotonic()
    leaving = _respond(_Events(Output("stdout", "x"), hang=True), 0.3)
    sent, events = asyncio.run(asyncio.wait_for(leaving, 5))  # not seen: TimeoutError
    assert events.closed and time.monotonic() - t0 < 3
    assert not any(m.get("more_body") is False for m in _bodies(sent))  # never "completed"

    async def staying() -> None:
        events = _Events(Output("stdout", "x"), hang=True)
        task = asyncio.ensure_future(_respond(events))
        await asyncio.sleep(1.0)
        assert not events.closed and not task.done()  # the call still runs
        task.cancel()  # the server's own end of the request: the call ends too
        try:
            await task
        except asyncio.CancelledError:
            pass
        assert events.closed

    asyncio.run(staying())


def test_the_clients_leaving_ends_a_call_that_floods_output() -> None:
    """Output that never lets the stream wait (each event is there at once): the client's
    leaving is still seen, between chunks."""
    t0 = time.monotonic()
    leaving = _respond(_Events(flood=True), 0.3)
    sent, events = asyncio.run(asyncio.wait_for(leaving, 10))
    assert events.closed and time.monotonic() - t0 < 5
    assert len(_bodies(sent)) > 1  # it streamed (chunks of ~64 KiB) until the client left


def test_a_dead_sandbox_cuts_the_body_after_its_error_line() -> None:
    sent, events = asyncio.run(
        _respond(_Events(Output("stdout", "x"), SandboxDiedError("the sandbox died")))
    )
    bodies = _bodies(sent)
    assert all(m["more_body"] for m in bodies)  # no end of body: the connection is cut
    kinds = [x["type"] for m in bodies for x in _lines(m["body"])]
    assert kinds == ["stdout", "error"]
    assert events.closed
