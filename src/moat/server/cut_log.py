"""uvicorn's "ASGI callable returned without completing response." for streams moat ends on
purpose (a sandbox that ended mid-call: :mod:`moat.server.sandbox`), and only for those.

uvicorn logs that line at ERROR and closes the connection, which is the point; an operator
should not read it as a fault each time a sandbox is killed mid-run. Each deliberate cut
allows one such line to be dropped; any other keeps its ERROR.
"""

from __future__ import annotations

import logging
import threading

__all__ = ["expect", "install"]

_MESSAGE = "ASGI callable returned without completing response."
_mu = threading.Lock()
_expected = 0


def expect() -> None:
    """A stream is about to end without its last chunk, on purpose."""
    global _expected
    with _mu:
        _expected = min(_expected + 1, 1024)


class _Filter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        global _expected
        if record.getMessage() != _MESSAGE:
            return True
        with _mu:
            if _expected > 0:
                _expected -= 1
                return False
        return True


def install() -> None:
    """Filter uvicorn's error logger (idempotent)."""
    log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _Filter) for f in log.filters):
        log.addFilter(_Filter())
