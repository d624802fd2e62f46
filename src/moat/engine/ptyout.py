"""A PTY's output: raw bytes in, guarded bytes out (invariant 4), as fast as a terminal needs.

Terminal output is bytes with escape sequences and UTF-8 split anywhere. It is decoded
incrementally as UTF-8 (a character split across chunks waits for its rest), fed to the
guard's stream for the ``pty`` channel, and encoded back, so every byte the guard does not
redact reaches the caller unchanged: only a redacted span becomes its marker. A byte that is
not UTF-8 becomes one character of the last 128 code points of plane 16 (private use; the
guard's matchers take no lone surrogates), and a genuine character from that range is taken
byte by byte the same way, so the mapping is one to one (:func:`decode`, :func:`encode`).

The guard's stream holds back a window of characters until more output or an idle release
(``moat.engine.output``, docs/guard.md). A terminal echoes keystrokes one by one, so the idle
release after a *small* chunk (an echo, a prompt, a screen update) comes after
:data:`FAST_RELEASE` instead of 200 ms; after a large chunk (bulk output, which a pause of the
sandbox's writer or the host's scheduler could split) it keeps the usual 200 ms. The choice
depends only on lengths, never on what the text looks like (docs/guard.md: content-dependent
release leaks prefixes). What holds is what holds for any stream with idle releases: a value
written in one burst is redacted whole; one written in pieces with pauses between them can
leave its first pieces (documented there).

Memory: nothing is retained for a result (a terminal's output is streamed only); the
consumer's pace bounds what waits (``deliver`` is awaited), and behind it the call's queue
(``moat.engine.client.QUEUE_CAP``) drops past its cap and marks the call truncated.
"""

from __future__ import annotations

import asyncio
import codecs
import re
from collections.abc import Awaitable, Callable

from moat.engine.output import IDLE_RELEASE, StreamFilter, off_loop

__all__ = ["FAST_RELEASE", "SMALL_CHUNK", "PtySink", "decode", "encode"]

#: Idle release after a small chunk: a keystroke's echo is on screen after about this long.
FAST_RELEASE = 0.002
#: A chunk shorter than this (characters) is interactive output: released after FAST_RELEASE.
SMALL_CHUNK = 1024


#: Code point of the character that stands for byte b (0x80..0xff) that is not UTF-8.
_ESCAPE = 0x10FF00
_IN = re.compile("[\udc80-\udcff\U0010ff80-\U0010ffff]")
_OUT = re.compile("([\U0010ff80-\U0010ffff]+)")


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    if c < "\ue000":  # a lone surrogate of surrogateescape: U+DC80 + byte
        return chr(_ESCAPE + ord(c) - 0xDC00)
    return "".join(chr(_ESCAPE + b) for b in c.encode("utf-8"))  # genuine: byte by byte


def decode(text: str) -> str:
    """Text from surrogateescape decoding, with every byte that was not UTF-8 (and every
    genuine character of the escape range) as an escape character the guard can take."""
    return _IN.sub(_escape, text) if _IN.search(text) else text


def encode(text: str) -> bytes:
    """The bytes ``decode`` stood for (markers and other text as UTF-8)."""
    if not _OUT.search(text):
        return text.encode("utf-8")
    parts = _OUT.split(text)
    out = bytearray()
    for i, part in enumerate(parts):
        if i % 2:
            out += bytes(ord(c) - _ESCAPE for c in part)
        else:
            out += part.encode("utf-8")
    return bytes(out)


class PtySink:
    """Guards one PTY stream of one call and hands released bytes to ``deliver``, in order."""

    def __init__(self, filt: StreamFilter, deliver: Callable[[bytes], Awaitable[None]]) -> None:
        self._filt = filt
        self._deliver = deliver
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._lock = asyncio.Lock()  # a guard stream takes one call at a time
        self._timer: asyncio.TimerHandle | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self._finished = False

    async def feed(self, data: bytes) -> None:
        async with self._lock:
            if self._finished:
                return
            text = decode(self._decoder.decode(data))
            await self._emit(await off_loop(len(text), self._filt.feed, text))
            delay = FAST_RELEASE if len(text) < SMALL_CHUNK else IDLE_RELEASE
        self._arm(delay)

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._filt.pending and not self._finished:
            self._timer = asyncio.get_running_loop().call_later(delay, self._spawn_idle)

    def _spawn_idle(self) -> None:
        self._timer = None
        self._idle_task = asyncio.get_running_loop().create_task(self._release_idle())
        self._idle_task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _release_idle(self) -> None:
        async with self._lock:
            if self._finished or not self._filt.pending:
                return
            # A guard error (block mode, budget) is raised again by the next feed or finish.
            try:
                text = await off_loop(self._filt.pending, self._filt.release_idle)
            except Exception:  # noqa: BLE001 - see above
                return
            await self._emit(text)

    async def finish(self) -> None:
        """End of the call: what the decoder and the guard still hold. Idempotent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        async with self._lock:
            if self._finished:
                return
            self._finished = True
            tail = decode(self._decoder.decode(b"", final=True))
            text = self._filt.feed(tail) if tail else ""
            text += await off_loop(self._filt.pending, self._filt.flush)
            await self._emit(text)

    def abandon(self) -> None:
        """The call ended without a finish (the caller left): stop the idle release, the
        one already running too (it may wait on a reader that is gone)."""
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._idle_task is not None and not self._idle_task.done():
            self._idle_task.cancel()

    async def _emit(self, text: str) -> None:
        if text:
            await self._deliver(encode(text))
