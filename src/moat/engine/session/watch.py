"""Directory watches: the agent's inotify events, bounded and checked on the host.

Trust domain: host engine. Every FS_EVENTS frame is checked against its schema
(``moat.protocol.watch.check_events``; anything off it ends the sandbox, invariant 6); events
wait in a queue of at most MAX_QUEUED_EVENTS events and MAX_QUEUED_CHARS characters of names
per watch, past which they are dropped and one ``overflow`` marker tells the reader (never
unbounded memory, never a silent loss). Names are guarded by the front door when they are
handed out (invariant 4). A watch ends when it is stopped, when its directory goes away, or
with the sandbox (its error typed like every call's).
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib

from moat.engine.client import AgentClient, Call
from moat.engine.session.core import SessionCore, ended_error
from moat.errors import PolicyError, SandboxDiedError, SandboxError
from moat.protocol import MsgType, ProtocolError
from moat.protocol.replies import check_reply
from moat.protocol.watch import MAX_QUEUED_EVENTS, MAX_WATCHERS, check_events

__all__ = ["MAX_QUEUED_CHARS", "OVERFLOW", "DirWatch", "WatchCalls"]

#: Characters of names queued unread per watch (with MAX_QUEUED_EVENTS: the host's bound).
MAX_QUEUED_CHARS = 1 << 20
#: The marker queued where events were lost.
OVERFLOW = ("", "overflow")
#: How long a stop waits for the agent to end the watch before giving up on it.
STOP_WAIT = 5.0


class DirWatch:
    """One watch: its events queue here as the agent sends them (bounded)."""

    def __init__(self, session: WatchCalls, call: Call) -> None:
        self.session = session
        self.call = call
        self.queue: collections.deque[tuple[str, str]] = collections.deque()
        self.chars = 0
        #: an overflow marker is queued and not read yet (one marks a whole run of losses)
        self._marked = False
        #: why the watch ended (None: cleanly, or still running)
        self.error: SandboxError | None = None
        self.done = False
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._pump())

    # -- the agent's side -------------------------------------------------------------------

    def _put(self, event: tuple[str, str]) -> None:
        if len(self.queue) >= MAX_QUEUED_EVENTS or self.chars + len(event[0]) > MAX_QUEUED_CHARS:
            self._lose()
            return
        self.queue.append(event)
        self.chars += len(event[0])

    def _lose(self) -> None:
        if not self._marked:
            self._marked = True
            self.queue.append(OVERFLOW)

    async def _pump(self) -> None:
        s = self.session
        try:
            while True:
                frame = await self.call.next()
                if frame.type is MsgType.FS_EVENTS:
                    try:
                        events, lost = check_events(frame.fields)
                    except ProtocolError:
                        raise s._violation("bad watch event") from None
                    for event in events:
                        self._put(event)
                    if lost:
                        self._lose()
                elif frame.type is MsgType.DONE:
                    try:
                        check_reply(MsgType.WATCH_START, frame.fields)
                    except ProtocolError:
                        raise s._violation("bad reply in a watch") from None
                    return
                elif frame.type is MsgType.FAIL:
                    self.error = s._fail(frame)
                    return
                else:
                    raise s._violation("unexpected frame in a watch")
                self._wake.set()
        except SandboxError as exc:
            self.error = ended_error(s.ended) if s.ended is not None else exc
        finally:
            self.done = True
            self.call.close()
            s._watches.discard(self)
            self._wake.set()

    # -- the reader's side ------------------------------------------------------------------

    def _pop(self) -> tuple[str, str]:
        event = self.queue.popleft()
        if event is OVERFLOW:
            self._marked = False
        self.chars -= len(event[0])
        return event

    async def flush(self) -> None:
        """Have the agent send what the kernel holds for this watch now, and queue it here:
        after it, ``take`` has every event up until the call (E2B's polling semantics)."""
        if self.done:
            return
        with contextlib.suppress(SandboxError):  # the watch ended meanwhile: nothing pending
            await self.session.request(MsgType.WATCH_FLUSH, {"target": self.call.id})
        for _ in range(1000):  # the pump queues what arrived first (bounded: a flood)
            if not self.call.pending() or self.done:
                break
            await asyncio.sleep(0)

    def take(self) -> list[tuple[str, str]]:
        """What is queued now, without waiting (the polling form)."""
        return [self._pop() for _ in range(len(self.queue))]

    async def next(self) -> tuple[str, str] | None:
        """The next event; None once the watch ended cleanly; its error if it did not."""
        while not self.queue:
            if self.done:
                if self.error is not None:
                    raise self.error
                return None
            self._wake.clear()
            await self._wake.wait()
        return self._pop()

    async def stop(self) -> None:
        """Stop the watch (the agent frees its inotify instance). Idempotent."""
        if self.done:
            return
        with contextlib.suppress(SandboxError):
            await self.session.request(MsgType.WATCH_STOP, {"target": self.call.id})
        try:
            async with asyncio.timeout(STOP_WAIT):
                await asyncio.shield(self._task)
        except builtins.TimeoutError:
            # An agent that does not end it: the host forgets the watch all the same.
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


class WatchCalls(SessionCore):
    """Watches of the sandbox's directories."""

    _watches: set[DirWatch]
    #: watches being started (counted against the cap until they are in _watches)
    _watch_starting: int = 0

    async def watch_dir(self, path: str, recursive: bool) -> DirWatch:
        """Start watching ``path`` (a directory inside the sandbox)."""
        client = self._check()
        if len(self._watches) + self._watch_starting >= MAX_WATCHERS:
            raise PolicyError(
                f"too many directory watches in this sandbox (at most {MAX_WATCHERS})"
            )
        # Held from here, across the awaits, until the watch is in _watches or failed: racing
        # starts can't pass the cap together (against a hostile agent that accepts them all).
        self._watch_starting += 1
        try:
            return await self._start_watch(client, path, recursive)
        finally:
            self._watch_starting -= 1

    async def _start_watch(self, client: AgentClient, path: str, recursive: bool) -> DirWatch:
        await self._prepare_guard()
        call = await client.open(MsgType.WATCH_START, {"path": path, "recursive": recursive})
        try:
            async with asyncio.timeout(60):  # a recursive watch walks its whole tree first
                frame = await call.next()
        except builtins.TimeoutError:
            call.close()
            await self.kill("died: the agent did not start a watch")
            raise SandboxDiedError("the sandbox's agent stopped answering") from None
        except BaseException:
            call.close()
            raise
        if frame.type is MsgType.FAIL:
            call.close()
            if frame.fields["kind"] == "busy":
                self._fail(frame)  # guarded like every message, and reported as a limit
                raise PolicyError(frame.fields["message"])
            raise self._fail(frame)
        if frame.type is not MsgType.WATCHING:
            call.close()
            raise self._violation("expected a watching frame")
        watch = DirWatch(self, call)
        self._watches.add(watch)
        return watch
