"""The agent's byte channel to the host: framed protocol over two fds, writes serialised."""

from __future__ import annotations

import os
import threading

from moat.protocol import CHUNK_SIZE, Frame, MsgType, encode

# The agent starts in every sandbox: typing costs ~8 ms of imports, so it is only
# imported for the type checker (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Channel:
    """Thread-safe frame writer over a file descriptor.

    Two states stop other threads' frames, for a checkpoint and a restore (main.py):
    ``held`` (they wait: nothing is written between a QUIESCE and its RESUME) and ``muted``
    (they are dropped: while the agent starts over with a new host, what was meant for the
    old one never reaches it). Both change under ``lock``, so always between two frames.
    """

    def __init__(self, out_fd: int) -> None:
        self._fd = out_fd
        #: held while one whole frame is written (public for a restore's resync, main.py)
        self.lock = threading.Lock()
        self._cond = threading.Condition(self.lock)
        self.held = False
        self.muted = False

    def send(self, mtype: MsgType, rid: int, payload: bytes = b"", **fields: Any) -> None:
        data = encode(Frame(mtype, rid, fields, payload))
        with self.lock:
            while self.held:
                self._cond.wait()
            if not self.muted:
                self.write_locked(data)

    def write_locked(self, data: bytes) -> None:
        """Write all of ``data``; the caller holds ``lock``."""
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def hold(self, last: bytes) -> None:
        """Write ``last`` (a whole frame), then let no other frame out until ``unhold``."""
        with self.lock:
            self.write_locked(last)
            self.held = True

    def unhold(self, *, mute: bool = False) -> None:
        """Let waiting frames go (``mute``: be dropped) from now on."""
        with self.lock:
            self.held = False
            self.muted = mute
            self._cond.notify_all()

    def send_stream(self, mtype: MsgType, rid: int, data: bytes) -> None:
        """Send output bytes split into frames of at most CHUNK_SIZE."""
        for i in range(0, len(data), CHUNK_SIZE):
            self.send(mtype, rid, data[i : i + CHUNK_SIZE])

    def done(self, rid: int, **fields: Any) -> None:
        self.send(MsgType.DONE, rid, **fields)

    def fail(self, rid: int, kind: str, message: str) -> None:
        self.send(MsgType.FAIL, rid, kind=kind, message=message[:4000])
