"""Per-call output handling: decode, guard, cap, deliver to callbacks (in that order).

The guard runs before anything reaches the caller or a callback (invariant 4); the cap bounds
what the host buffers for one call however much the sandbox prints (invariant 6).
"""

from __future__ import annotations

import asyncio
import codecs
import inspect
from collections.abc import Callable
from typing import Any, Protocol

from moat.model import DEFAULT_MAX_OUTPUT

__all__ = ["DEFAULT_MAX_OUTPUT", "IDLE_RELEASE", "OutputSink", "StreamFilter"]


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
        self._finished = False

    async def feed(self, channel: str, data: bytes) -> None:
        if self.truncated:
            return
        self._seen += len(data)
        if self._seen > self._max:
            keep = len(data) - (self._seen - self._max)
            data = data[: max(keep, 0)]
            self.truncated = True
        text = self._decoders[channel].decode(data)
        await self._emit(channel, self._filters[channel].feed(text))
        self._arm_idle(channel)
        if self.truncated:
            await self.finish()
            # Emitted like output, so a streaming face (and on_stderr) learns of the cut too.
            await self._emit("stderr", f"\n[moat: output truncated after {self._max} bytes]\n")

    def _arm_idle(self, channel: str) -> None:
        timer = self._idle.pop(channel, None)
        if timer is not None:
            timer.cancel()
        if self._filters[channel].pending and not self._finished:
            loop = asyncio.get_running_loop()
            self._idle[channel] = loop.call_later(IDLE_RELEASE, self._spawn_idle, channel)

    def _spawn_idle(self, channel: str) -> None:
        task = asyncio.get_running_loop().create_task(self._release_idle(channel))
        self._idle_tasks.add(task)
        task.add_done_callback(self._idle_tasks.discard)

    async def _release_idle(self, channel: str) -> None:
        self._idle.pop(channel, None)
        if self._finished:
            return
        try:
            await self._emit(channel, self._filters[channel].release_idle())
        except Exception:  # noqa: BLE001 - block mode etc.: the next feed/finish raises it
            return

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
        for channel in ("stdout", "stderr"):
            tail = self._decoders[channel].decode(b"", final=True)
            text = self._filters[channel].feed(tail) if tail else ""
            text += self._filters[channel].flush()
            await self._emit(channel, text)

    async def _emit(self, channel: str, text: str) -> None:
        if not text:
            return
        async with self._emit_lock:
            self.chunks[channel].append(text)
            cb = self._callbacks.get(channel)
            if cb is not None:
                out = cb(text)
                if inspect.isawaitable(out):
                    await out

    def text(self, channel: str) -> str:
        return "".join(self.chunks[channel])
