"""Per-call output handling: decode, guard, cap, deliver to callbacks (in that order).

The guard runs before anything reaches the caller or a callback (invariant 4); the cap bounds
what the host buffers for one call however much the sandbox prints, results and errors
included (invariant 6). It caps what the guard released, never the raw input (a cut the
sandbox steers could split a value where no matcher sees it: docs/guard.md). Scans of more
than a few KiB run in a worker thread (``off_loop``), so one sandbox's costly output never
stops the event loop, and with it every other sandbox's I/O (invariant 10).
"""

from __future__ import annotations

import asyncio
import codecs
import inspect
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from moat.model import DEFAULT_MAX_OUTPUT

__all__ = ["DEFAULT_MAX_OUTPUT", "IDLE_RELEASE", "INLINE_SCAN", "OutputSink", "StreamFilter"]

T = TypeVar("T")

#: Scans of fewer characters than this run inline on the event loop. A thread hop costs about
#: 50 us, more than the guard takes for a few KiB (linear time, a few us per KiB), and most
#: output chunks are small: hopping for them would slow every call's round trip for nothing,
#: while a scan of 4 KiB can't stall the loop noticeably. Larger ones go to a worker thread.
INLINE_SCAN = 4096


async def off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` inline when ``size`` is under INLINE_SCAN, else in a worker thread."""
    if size < INLINE_SCAN:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


class StreamFilter(Protocol):
    def feed(self, chunk: str) -> str: ...

    def flush(self) -> str: ...

    @property
    def pending(self) -> int: ...

    def release_idle(self) -> str: ...


#: After this long without new output, what the guard holds back is released (streaming).
IDLE_RELEASE = 0.2


Callback = Callable[[str], Any] | None


class OutputSink:
    """Collects one call's stdout and stderr."""

    def __init__(
        self,
        filters: dict[str, StreamFilter],
        callbacks: dict[str, Callback],
        max_bytes: int = DEFAULT_MAX_OUTPUT,
    ) -> None:
        self.chunks: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._decoders = {k: codecs.getincrementaldecoder("utf-8")("replace") for k in self.chunks}
        self._filters = filters
        self._callbacks = callbacks
        self._max = max_bytes
        self._seen = 0
        self.truncated = False
        self._idle: dict[str, asyncio.TimerHandle] = {}
        self._idle_tasks: set[asyncio.Task[None]] = set()
        # Emissions (and so callbacks) happen one at a time, in the order output was
        # released, also when a callback is awaitable (async, or a sync SDK callback run on
        # its own thread) and an idle release runs beside the call's own feeds.
        self._emit_lock = asyncio.Lock()
        # A guard stream takes one call at a time (docs/guard.md): feeds, idle releases and
        # the final flush of a channel run under its lock, also while one is in a thread.
        self._locks = {k: asyncio.Lock() for k in self.chunks}
        self._finished = False

    async def feed(self, channel: str, data: bytes) -> None:
        if self.truncated:
            return
        filt = self._filters[channel]
        async with self._locks[channel]:
            if self.truncated:
                return
            text = self._decoders[channel].decode(data)
            await self._emit(channel, await off_loop(len(text), filt.feed, text))
        self._arm_idle(channel)

    def charge(self, size: int) -> bool:
        """Count ``size`` bytes of other output (a result, an error) against the cap: False
        (and the call is marked truncated) when it does not fit; the caller drops it."""
        if self.truncated or self._seen + size > self._max:
            self.truncate()
            return False
        self._seen += size
        return True

    def truncate(self) -> None:
        if self.truncated:
            return
        self.truncated = True
        for timer in self._idle.values():
            timer.cancel()
        self._idle.clear()
        # Kept like output (past the cap), so a streaming face (and on_stderr) learns of it.
        note = f"\n[moat: output truncated after {self._max} bytes]\n"
        task = asyncio.get_running_loop().create_task(self._deliver("stderr", note))
        self._idle_tasks.add(task)
        task.add_done_callback(self._idle_tasks.discard)

    def _arm_idle(self, channel: str) -> None:
        timer = self._idle.pop(channel, None)
        if timer is not None:
            timer.cancel()
        if self._filters[channel].pending and not self._finished and not self.truncated:
            loop = asyncio.get_running_loop()
            self._idle[channel] = loop.call_later(IDLE_RELEASE, self._spawn_idle, channel)

    def _spawn_idle(self, channel: str) -> None:
        task = asyncio.get_running_loop().create_task(self._release_idle(channel))
        self._idle_tasks.add(task)
        task.add_done_callback(self._idle_tasks.discard)

    async def _release_idle(self, channel: str) -> None:
        self._idle.pop(channel, None)
        filt = self._filters[channel]
        async with self._locks[channel]:
            if self._finished or self.truncated:
                return
            try:
                text = await off_loop(filt.pending, filt.release_idle)
            except Exception:  # noqa: BLE001 - block mode etc.: the next feed/finish raises it
                return
            await self._emit(channel, text)

    async def finish(self) -> None:
        """End of the call: release what decoders and guards held back. Idempotent."""
        if self._finished:
            return
        self._finished = True
        for timer in self._idle.values():
            timer.cancel()
        self._idle.clear()
        if self._idle_tasks:  # an idle release still delivering: the call ends after it
            await asyncio.gather(*self._idle_tasks, return_exceptions=True)
        if self.truncated:
            return  # past the cap: what the guard still holds is not released
        for channel in ("stdout", "stderr"):
            filt = self._filters[channel]
            async with self._locks[channel]:
                tail = self._decoders[channel].decode(b"", final=True)
                text = filt.feed(tail) if tail else ""
                text += await off_loop(filt.pending, filt.flush)
                await self._emit(channel, text)
        await self.wait_notes()  # a cut made by the flush: its note is in before the call ends

    async def _emit(self, channel: str, text: str) -> None:
        """Release guarded ``text``, cut at the cap (the cut is reported once)."""
        if not text or self.truncated:
            return
        size = len(text.encode("utf-8", "surrogatepass"))
        if self._seen + size > self._max:
            room = self._max - self._seen
            text = text.encode("utf-8", "surrogatepass")[: max(room, 0)].decode("utf-8", "ignore")
            self._seen = self._max
            await self._deliver(channel, text)
            self.truncate()
            return
        self._seen += size
        await self._deliver(channel, text)

    async def _deliver(self, channel: str, text: str) -> None:
        if not text:
            return
        async with self._emit_lock:
            self.chunks[channel].append(text)
            cb = self._callbacks.get(channel)
            if cb is not None:
                out = cb(text)
                if inspect.isawaitable(out):
                    await out

    async def wait_notes(self) -> None:
        """Wait until the truncation note (if any) was delivered."""
        if self._idle_tasks:
            await asyncio.gather(*self._idle_tasks, return_exceptions=True)

    def text(self, channel: str) -> str:
        return "".join(self.chunks[channel])
