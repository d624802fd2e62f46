"""uvicorn's "ASGI callable returned without completing response." for streams moat ends on
purpose (a sandbox that ended mid-call: :mod:`moat.server.sandbox`), and only for those.

uvicorn logs that line at ERROR and closes the connection, which is the point; an operator
should not read it as a fault each time a sandbox is killed mid-run. Each deliberate cut
allows one such line to be dropped; any other keeps its ERROR.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

__all__ = ["expect", "install"]

_MESSAGE = "ASGI callable returned without completing response."
#: uvicorn logs the line as the cut response's app returns: an expectation older than this
#: was never matched (the client had gone, so uvicorn said nothing) and drops nothing.
_WITHIN_S = 5.0
_mu = threading.Lock()
_expected: collections.deque[float] = collections.deque(maxlen=1024)


def expect() -> None:
    """A stream is about to end without its last chunk, on purpose."""
    with _mu:
        _expected.append(time.monotonic())


class _Filter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != _MESSAGE:
            return True
        now = time.monotonic()
        with _mu:
            while _expected and now - _expected[0] > _WITHIN_S:
                _expected.popleft()
            if _expected:
                _expected.popleft()
                return False
        return True


def install() -> None:
    """Filter uvicorn's error logger (idempotent)."""
    log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _Filter) for f in log.filters):
        log.addFilter(_Filter())
