"""The background reaper: jobs run off the caller's path, drain waits for them, a failing job
is logged and never raised (the start-up sweep covers what it left)."""

from __future__ import annotations

import logging
import threading

import pytest

from moat.runtime import reaper


def test_drain_waits_for_jobs_and_survives_failures(caplog: pytest.LogCaptureFixture) -> None:
    gate = threading.Event()
    done: list[str] = []

    def slow() -> None:
        gate.wait(5)
        done.append("slow")

    def broken() -> None:
        raise OSError("cgroup busy")

    reaper.submit("slow", slow)
    with caplog.at_level(logging.ERROR, logger="moat.runtime.reaper"):
        reaper.submit("broken", broken)
        assert reaper.drain(timeout=0.05) >= 1  # the slow job holds it: drain times out
        gate.set()
        assert reaper.drain(timeout=5) == 0
    assert done == ["slow"]
    assert reaper.pending() == 0
    assert "reaping broken failed" in caplog.text


def test_workers_are_reused_and_bounded() -> None:
    """A kill does not pay for a thread's start: back-to-back jobs run on the worker that is
    already there; a burst larger than MAX_WORKERS still runs every job."""

    def workers() -> set[int]:
        return {t.ident or 0 for t in threading.enumerate() if t.name == "moat-reaper"}

    idents: list[int] = []
    for _ in range(5):
        reaper.submit("seq", lambda: idents.append(threading.get_ident()))
        assert reaper.drain(timeout=5) == 0
        assert set(idents) <= workers()
    before = workers()
    for _ in range(5):
        reaper.submit("seq", lambda: idents.append(threading.get_ident()))
        assert reaper.drain(timeout=5) == 0
    assert workers() == before  # no thread started for these

    gate = threading.Event()
    ran: list[int] = []
    lock = threading.Lock()

    def held(i: int) -> None:
        gate.wait(5)
        with lock:
            ran.append(i)

    for i in range(reaper.MAX_WORKERS * 2):
        reaper.submit("burst", lambda i=i: held(i))  # type: ignore[misc]
    alive = sum(t.name == "moat-reaper" for t in threading.enumerate())
    assert alive <= reaper.MAX_WORKERS
    gate.set()
    assert reaper.drain(timeout=10) == 0
    assert sorted(ran) == list(range(reaper.MAX_WORKERS * 2))
