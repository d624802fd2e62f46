"""A directory watch as the front door hands it to a face: guarded model events.

Trust domain: host engine. Every name passes the sandbox's guard before a face sees it
(invariant 4); the entry of an event (``include_entry``) is the front door's ``stat``,
guarded likewise. Two ways to read: ``events()`` (a stream; leaving it stops the watch) and
``take()`` (what is queued now: E2B's polling form).
"""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from moat.errors import NotFoundError, SandboxError
from moat.model import EntryInfo, FilesystemEvent

if TYPE_CHECKING:
    from moat.engine.session import DirWatch, Session

__all__ = ["WatchStream"]

#: Event types whose entry may still exist (a removed or renamed-away one has none).
_WITH_ENTRY = frozenset({"create", "write", "chmod"})


class WatchStream:
    """A running watch of ``path``: guarded FilesystemEvents, and ``stop()``."""

    def __init__(self, session: Session, watch: DirWatch, path: str, include_entry: bool) -> None:
        self._session = session
        self._watch = watch
        self.path = path
        self.include_entry = include_entry

    @property
    def done(self) -> bool:
        """Whether the watch has ended (stopped, its directory gone, or the sandbox)."""
        return self._watch.done and not self._watch.queue

    @property
    def error(self) -> SandboxError | None:
        """Why the watch ended, if not cleanly."""
        return self._watch.error

    async def _event(self, raw: tuple[str, str]) -> FilesystemEvent:
        name, kind = raw
        guard = self._session.guard
        entry: EntryInfo | None = None
        if self.include_entry and name and kind in _WITH_ENTRY:
            try:  # stat of the raw name: the sandbox's own path, resolved inside
                entry = await self._session.stat(posixpath.join(self.path, name))
            except NotFoundError:
                entry = None  # gone again already: best effort, as envd's
        text = guard.redact_text(name, "files") if name else name
        return FilesystemEvent(name=text, type=kind, entry=entry)  # type: ignore[arg-type]

    async def take(self) -> list[FilesystemEvent]:
        """Every event up until now (the agent's pending ones included). Once the watch
        has ended and nothing is left, its error is raised (a clean end: an empty list)."""
        await self._watch.flush()
        raw = self._watch.take()
        if not raw and self._watch.done and self._watch.error is not None:
            raise self._watch.error
        return [await self._event(r) for r in raw]

    async def events(self) -> AsyncIterator[FilesystemEvent]:
        """The events as they come, until the watch ends (its error raised, if any).
        Leaving the iteration early stops the watch."""
        try:
            while True:
                raw = await self._watch.next()
                if raw is None:
                    return
                yield await self._event(raw)
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop watching (idempotent)."""
        await self._watch.stop()
