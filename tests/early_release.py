"""Release a session fixture's heavy cleanup after its last test, in the background.

A session-scoped fixture is torn down when the whole run ends, so its cleanup adds to the
run's wall clock even when its last user ran minutes before. The template store's (about
90,000 files of template roots and test layers to unlink, ~26 s of kernel time here) was
the longest step of CI. With this plugin (tests/conftest.py loads it) that cleanup starts on a
low-priority thread as soon as the last collected test that uses the fixture has finished,
and the fixture's teardown waits for it. Nothing is left behind: the teardown joins the thread,
or runs the cleanup itself when the run stopped before the last user.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest


@dataclass
class _Release:
    cleanup: Callable[[], None]
    thread: threading.Thread | None = None
    errors: list[BaseException] = field(default_factory=list)


_LAST_USER: dict[str, str] = {}  # fixture name -> node id of the last collected test using it
_PENDING: dict[str, _Release] = {}


def register(fixture: str, cleanup: Callable[[], None]) -> Callable[[], None]:
    """Arrange ``cleanup`` to start after the last test using ``fixture``; the returned
    function (call it in the fixture's teardown) waits for it, or runs it, and re-raises
    what it raised."""
    # one instance per name: a fixture imported into two modules is two fixtures, and the
    # second would hide the first's cleanup until the end of the run
    assert fixture not in _PENDING, f"{fixture!r} registered twice"
    entry = _Release(cleanup)
    _PENDING[fixture] = entry

    def finish() -> None:
        _PENDING.pop(fixture, None)
        if entry.thread is None:
            cleanup()
            return
        entry.thread.join()
        if entry.errors:
            raise entry.errors[0]

    return finish


def _run(entry: _Release) -> None:
    # below the tests' own threads and processes: their latency-bound checks keep the cores
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    try:
        entry.cleanup()
    except BaseException as e:  # noqa: BLE001 - handed to the fixture's teardown
        entry.errors.append(e)


def pytest_collection_finish(session: pytest.Session) -> None:
    _LAST_USER.clear()
    for item in session.items:
        for name in getattr(item, "fixturenames", ()):
            _LAST_USER[name] = item.nodeid


def pytest_runtest_logfinish(nodeid: str) -> None:
    for name, entry in list(_PENDING.items()):
        if entry.thread is None and _LAST_USER.get(name) == nodeid:
            entry.thread = threading.Thread(
                target=_run, args=(entry,), name=f"release-{name}", daemon=False
            )
            entry.thread.start()
