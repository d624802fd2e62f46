"""No cyclic garbage collection while a large scan runs: a scan must not stall other threads.

Trust domain: host engine. A scan of a large output dense with findings allocates hundreds
of thousands of small objects that live until the scan ends; in CPython they trigger full
(generation 2) collections, each of which holds the GIL for as long as it takes to walk the
whole process heap (~150 ms in a server or test process of ~200k objects on the 2-core
reference host), so a hostile sandbox's output would stall every other sandbox's I/O on the
event loop, although the scan itself runs in a worker thread. What a scan allocates is
acyclic (reference counting frees it), so collection is paused for the scan instead.

The pause is process-wide (``gc.disable``), so it is shared and bounded: scans of at least
``MIN_SIZE`` join a pause that began less than ``MAX_PAUSE_S`` ago (or start one); a scan
that finds an older pause runs without joining it, so the pause ends once the scans that
joined it end, however busy the guard is (each is bounded by its CPU budget). A process that
disabled collection itself keeps it disabled.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Iterator
from typing import Final

#: Scans smaller than this never pause collection (they allocate too little to trigger one).
MIN_SIZE: Final = 64 * 1024
#: A pause takes no new scans once it is this old (seconds).
MAX_PAUSE_S: Final = 1.0

_lock = threading.Lock()
_depth = 0
_since = 0.0
_paused_by_us = False


@contextlib.contextmanager
def quiet_gc(size: int) -> Iterator[None]:
    """Pause cyclic collection while a scan of ``size`` bytes (or characters) runs."""
    global _depth, _since, _paused_by_us
    joined = False
    if size >= MIN_SIZE:
        with _lock:
            now = time.monotonic()
            if _depth == 0:
                _paused_by_us = gc.isenabled()
                if _paused_by_us:
                    gc.disable()
                _since, _depth, joined = now, 1, True
            elif now - _since < MAX_PAUSE_S:
                _depth += 1
                joined = True
    try:
        yield
    finally:
        if joined:
            with _lock:
                _depth -= 1
                if _depth == 0 and _paused_by_us:
                    _paused_by_us = False
                    gc.enable()


def paused() -> bool:
    """Whether a scan holds collection paused now (for tests and diagnostics)."""
    with _lock:
        return _depth > 0
