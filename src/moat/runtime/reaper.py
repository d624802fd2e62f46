"""Background reaping: the slow half of killing a sandbox, off the caller's path.

Trust domain: host engine. A driver's ``kill()`` does the part that ends the sandbox at once
(its processes frozen or SIGKILLed, its channel closed) and hands the rest to :func:`submit`:
waiting for exits, ``runsc delete``, removing cgroups and directories. Worker threads (at most
``MAX_WORKERS``, started as jobs arrive and kept while there is work, so a kill does not pay
for a thread's start) run the jobs, in order of arrival. Invariant 5 still holds exactly:

* in this process, :func:`drain` runs at interpreter exit (``atexit``: after the SDK's own
  exit hook has killed what the program forgot), so a program that ends leaves nothing;
* after a crash, whatever a job had not finished is owned by a dead process, which is what each
  tier's start-up ``sweep`` removes.

Jobs are blocking callables (they run on the worker thread, never on an event loop) and must
be bounded in time themselves; an exception is logged, never raised to anyone.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Final

__all__ = ["drain", "pending", "submit"]

log = logging.getLogger("moat.runtime.reaper")

#: How long interpreter exit waits for queued reaping (each job bounds itself too).
EXIT_DRAIN_S: Final = 60.0
#: Worker threads at most; more jobs wait their turn (each is bounded in time).
MAX_WORKERS: Final = 16
#: A worker with nothing to do for this long ends.
IDLE_EXIT_S: Final = 30.0

# Process-wide by nature (like atexit itself): one count of unfinished jobs per process, one
# queue of jobs not started yet, and the workers that take them.
_lock = threading.Lock()
_idle = threading.Condition(_lock)
_pending = 0
_registered = False
_queue: collections.deque[tuple[str, Callable[[], None]]] = collections.deque()
_arrived = threading.Condition(_lock)  # the same lock: one state, one lock
_workers = 0  # worker threads alive
_free = 0  # of them, waiting for a job


def submit(what: str, job: Callable[[], None]) -> None:
    """Run ``job`` on a background thread; :func:`drain` waits for it."""
    global _pending, _registered, _workers
    with _idle:
        _pending += 1
        if not _registered:
            atexit.register(drain, EXIT_DRAIN_S)
            _registered = True
        _queue.append((what, job))
        if _free > len(_queue) - 1 or _workers >= MAX_WORKERS:
            _arrived.notify()
            return
        _workers += 1
    try:
        threading.Thread(target=_work, name="moat-reaper", daemon=True).start()
    except BaseException:
        with _idle:
            _workers -= 1
            if _workers == 0:  # nobody would ever run it: fail the submit, as before
                _queue.remove((what, job))
                _pending -= 1
                _idle.notify_all()
        raise


def _work() -> None:
    """A worker: run queued jobs until none comes for ``IDLE_EXIT_S``."""
    global _workers, _free
    while True:
        with _idle:
            _free += 1
            try:
                if not _queue:
                    _arrived.wait(IDLE_EXIT_S)
                if not _queue:
                    _workers -= 1
                    return
                what, job = _queue.popleft()
            finally:
                _free -= 1
        _run(what, job)


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
