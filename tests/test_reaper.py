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
