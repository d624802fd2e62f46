"""Directory watch handles of the SDK (E2B's shape: ``files.watch_dir`` -> a handle).

With ``on_event`` the handle calls it for every event as it comes (a task of its own); without
one, events wait for ``get_new_events()`` (E2B's polling form). Events are guarded by the
front door before they get here; an ``overflow`` event marks where some were lost.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import inspect
from collections.abc import Callable
from typing import Any

from moat.errors import SandboxError
from moat.model import FilesystemEvent
from moat.sdk.transport import WatchEvents

__all__ = ["AsyncWatchHandle"]


class AsyncWatchHandle:
    """A running watch of a directory. ``stop()`` ends it."""

    def __init__(
        self,
        watch: WatchEvents,
        on_event: Callable[[FilesystemEvent], Any] | None,
        on_exit: Callable[[SandboxError | None], Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        self._watch = watch
        self._on_event = on_event
        self._on_exit = on_exit
        self._timeout = timeout
        self._stopped = False
        self._error: SandboxError | None = None
        self._task: asyncio.Task[None] | None = None
        if on_event is not None:
            self._task = asyncio.get_running_loop().create_task(self._consume())
            self._task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _consume(self) -> None:
        assert self._on_event is not None
        error: SandboxError | None = None
        try:
            async with asyncio.timeout(self._timeout):
                async for event in self._watch.events():
                    out = self._on_event(event)
                    if inspect.isawaitable(out):
                        await out
        except builtins.TimeoutError:
            pass  # the watch's own time ran out: a clean end
        except SandboxError as exc:
            error = self._error = exc
        finally:
            with contextlib.suppress(SandboxError):
                await self._watch.stop()
        if self._on_exit is not None:
            out = self._on_exit(error)
            if inspect.isawaitable(out):
                await out

    @property
    def error(self) -> SandboxError | None:
        """Why the watch ended, if it ended with an error (with ``on_event``)."""
        return self._error

    async def get_new_events(self) -> list[FilesystemEvent]:
        """The events since the last call (only without ``on_event``). Raises the watch's
        error once it ended with one."""
        if self._task is not None:
            raise SandboxError("this watch hands its events to on_event")
        if self._stopped:
            raise SandboxError("the watch is already stopped")
        return await self._watch.take()

    async def wait(self) -> None:
        """Wait until the watch ends (with ``on_event``): stopped, or its directory or
        sandbox gone; its error is raised."""
        if self._task is not None:
            await asyncio.shield(self._task)
        if self._error is not None:
            raise self._error

    async def stop(self) -> None:
        """Stop watching (idempotent); the inotify watch inside the sandbox is freed."""
        self._stopped = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self._watch.stop()
