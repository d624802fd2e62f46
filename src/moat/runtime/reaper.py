"""Background reaping: the slow half of killing a sandbox, off the caller's path.

Trust domain: host engine. A driver's ``kill()`` does the part that ends the sandbox at once
(its processes frozen or SIGKILLed, its channel closed) and hands the rest to :func:`submit`:
waiting for exits, ``runsc delete``, removing cgroups and directories. One worker thread runs
the jobs in order. Invariant 5 still holds exactly:

* in this process, :func:`drain` runs at interpreter exit (``atexit``: after the SDK's own
  exit hook has killed what the program forgot), so a program that ends leaves nothing;
* after a crash, whatever a job had not finished is owned by a dead process, which is what each
  tier's start-up ``sweep`` removes.

Jobs are blocking callables (they run on the worker thread, never on an event loop) and must
be bounded in time themselves; an exception is logged, never raised to anyone.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from typing import Final

__all__ = ["drain", "pending", "submit"]

log = logging.getLogger("moat.runtime.reaper")

#: How long interpreter exit waits for queued reaping (each job bounds itself too).
EXIT_DRAIN_S: Final = 60.0

# Process-wide by nature (like atexit itself): one count of unfinished jobs per process.
_idle = threading.Condition(threading.Lock())
_pending = 0
_registered = False


def submit(what: str, job: Callable[[], None]) -> None:
    """Run ``job`` on a background thread; :func:`drain` waits for it."""
    global _pending, _registered
    with _idle:
        _pending += 1
        if not _registered:
            atexit.register(drain, EXIT_DRAIN_S)
            _registered = True
    try:
        thread = threading.Thread(target=_run, args=(what, job), name=f"reap-{what}", daemon=True)
        thread.start()
    except BaseException:
        _done()
        raise


def pending() -> int:
    """Jobs submitted and not finished yet."""
    with _idle:
        return _pending


def drain(timeout: float | None = None) -> int:
    """Wait until every submitted job has finished (or ``timeout``); return how many remain."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _idle:
        while _pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            _idle.wait(left)
        return _pending


def _run(what: str, job: Callable[[], None]) -> None:
    try:
        job()
    except Exception:  # a failed cleanup is logged; the sweep covers it
        log.exception("reaping %s failed", what)
    finally:
        _done()


def _done() -> None:
    global _pending
    with _idle:
        _pending -= 1
        _idle.notify_all()
