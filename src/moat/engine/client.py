"""Host side of the agent protocol: multiplexes calls over one byte stream.

Every frame from the agent is size-limited and schema-validated by the decoder (invariant 6);
a malformed frame, an EOF or a silent agent marks the client dead and fails every pending call
with SandboxDiedError.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from moat.engine.tunnels import Tunnels
from moat.engine.users import root_refusal
from moat.errors import (
    DiskFullError,
    InvalidArgumentError,
    NotFoundError,
    PolicyError,
    SandboxDiedError,
    SandboxError,
)
from moat.errors import TimeoutError as TimeoutError_
from moat.protocol import (
    AGENT_TO_HOST,
    MAX_FRAME,
    PROTOCOL_VERSION,
    Decoder,
    Frame,
    MsgType,
    ProtocolError,
    encode,
)
from moat.runtime.base import SandboxProcess

log = logging.getLogger("moat.engine")

_DEAD = object()
_TCP = frozenset(
    {MsgType.TCP_OPEN, MsgType.TCP_DATA, MsgType.TCP_EOF, MsgType.TCP_CLOSE, MsgType.TCP_ACK}
)


#: Output frames that wait, unread, behind one another are merged up to this many bytes.
MERGE_OUTPUT = 1 << 20
_OUTPUT = frozenset({MsgType.STDOUT, MsgType.STDERR, MsgType.PTY})
#: Output of one call (stdout, stderr, results, errors) queued unread is dropped past this
#: many bytes, and the call reports truncation: a flooding agent can't grow host memory
#: faster than the call's consumer (guard, cap) drains it (invariant 6). Above any per-call
#: output cap an honest call needs (the consumer drains as it goes).
QUEUE_CAP = 64 << 20
_DROPPABLE = frozenset({MsgType.STDOUT, MsgType.STDERR, MsgType.PTY, MsgType.RESULT, MsgType.ERROR})
#: How long one send may wait for the agent to read (a stopped agent fills the pipe): past
#: it the agent is declared dead and the sandbox ends (invariant 6: a silent agent).
SEND_TIMEOUT = 30.0


class _Output:
    """Consecutive STDOUT (or STDERR) payloads of one call, not yet read: joined when read."""

    __slots__ = ("id", "parts", "size", "type")

    def __init__(self, frame: Frame) -> None:
        self.type = frame.type
        self.id = frame.id
        self.parts = [frame.payload]
        self.size = len(frame.payload)


class Call:
    """One request in flight: its frames arrive on a queue.

    A program printing one line per write reaches the host as one frame per line; frames of
    the same stream that queue up before they are read are merged, so the guard, the output
    cap and callbacks run once per batch instead of once per line (order is kept).
    """

    def __init__(self, client: AgentClient, rid: int) -> None:
        self.client = client
        self.id = rid
        self._items: collections.deque[Frame | _Output | object] = collections.deque()
        self._wake = asyncio.Event()
        #: bytes of droppable output queued unread; whether some was dropped (see QUEUE_CAP)
        self.queued = 0
        self.overflowed = False
        #: made as root of the sandbox (``user="root"``): its "unsupported" FAIL is a refusal
        self.root = False

    def put(self, item: Frame | object) -> None:
        """Queue a frame (or the dead marker)."""
        if isinstance(item, Frame) and item.type in _DROPPABLE:
            size = _size(item)
            if self.queued + size > QUEUE_CAP:
                self.overflowed = True
                return
            self.queued += size
        if isinstance(item, Frame) and item.type in _OUTPUT:
            last = self._items[-1] if self._items else None
            if (
                isinstance(last, _Output)
                and last.type is item.type
                and last.size + len(item.payload) <= MERGE_OUTPUT
            ):
                last.parts.append(item.payload)
                last.size += len(item.payload)
                return
            item = _Output(item)
        self._items.append(item)
        self._wake.set()

    def pending(self) -> bool:
        """Whether a frame is waiting to be read."""
        return bool(self._items)

    async def next(self) -> Frame:
        while not self._items:
            self._wake.clear()
            await self._wake.wait()
        item = self._items.popleft()
        if isinstance(item, _Output):
            self.queued -= item.size
        elif isinstance(item, Frame) and item.type in _DROPPABLE:
            self.queued -= _size(item)
        if item is _DEAD:
            self._items.appendleft(_DEAD)  # keep failing
            raise SandboxDiedError(self.client.dead_reason or "the sandbox died")
        if isinstance(item, _Output):
            return Frame(item.type, item.id, {}, b"".join(item.parts))
        assert isinstance(item, Frame)
        return item

    def close(self) -> None:
        self.client.calls.pop(self.id, None)


def _size(frame: Frame) -> int:
    """What a queued frame holds, roughly: its payload, or its text fields' length."""
    if frame.type in _OUTPUT:
        return len(frame.payload)
    return len(frame.payload) + sum(len(str(v)) for v in frame.fields.values())


def fail_to_error(frame: Frame, *, root: bool = False) -> SandboxError:
    """Translate an agent FAIL frame into our exception tree (``root``: of a request made
    as root of the sandbox)."""
    kind = frame.fields["kind"]
    msg = frame.fields["message"]
    if kind == "unsupported" and root:
        # An agent that cannot run calls as root (a guest too old for it): the front door's
        # refusal, never a run as the user (invariant 7; moat.engine.users).
        return root_refusal()
    if kind == "not_found":
        return NotFoundError(msg)
    if kind in ("invalid", "exists", "too_large"):
        return InvalidArgumentError(msg)
    if kind == "no_space":  # the message is the host's: the kind is all that is needed
        return DiskFullError("not enough disk space in the sandbox")
    if kind == "unsupported":  # invariant 7: said, never silently dropped
        return PolicyError(
            "the sandbox's filesystem lacks the capability for this operation "
            "(such as extended attributes, which file metadata needs)"
        )
    return SandboxError(msg)


class AgentClient:
    """Talks to one agent."""

    def __init__(
        self, proc: SandboxProcess, on_dead: Callable[[str], None], first_id: int = 1
    ) -> None:
        self.proc = proc
        self.calls: dict[int, Call] = {}
        self.dead_reason: str | None = None
        #: a restored agent may still answer its old host's ids: a restore starts elsewhere
        self._ids = itertools.count(first_id)
        #: frames held back while the agent is quiesced (``quiesce``); None otherwise
        self._held: list[bytes] | None = None
        self._unheld = asyncio.Event()
        self._unheld.set()
        #: proxied TCP streams (set once egress is wired up)
        self.tunnels: Tunnels | None = None
        self._on_dead = on_dead
        #: when bytes last moved either way (monotonic): a sandbox's idle timer (issue 11)
        self.last_active = time.monotonic()
        self._ready: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._read_loop())

    async def wait_ready(self, timeout: float) -> Frame:
        try:
            async with asyncio.timeout(timeout):
                frame = await asyncio.shield(self._ready)
        except TimeoutError:
            self._die("the sandbox's agent did not start in time")
            raise SandboxDiedError("the sandbox's agent did not start in time") from None
        if frame.fields.get("version") != PROTOCOL_VERSION:
            self._die("agent protocol version mismatch")
            raise SandboxDiedError("agent protocol version mismatch")
        return frame

    async def _read_loop(self) -> None:
        decoder = Decoder(max_frame=MAX_FRAME, direction=AGENT_TO_HOST)
        reason = "the sandbox's agent exited"
        notify = True
        try:
            while True:
                data = await self.proc.reader.read(1 << 20)
                if not data:
                    break
                self.last_active = time.monotonic()
                for frame in decoder.feed(data):
                    self._route(frame)
        except ProtocolError as exc:
            log.warning("agent protocol violation: %s", exc)
            reason = "the sandbox's agent broke the protocol"
        except (ConnectionError, OSError):
            reason = "the connection to the sandbox's agent broke"
        except asyncio.CancelledError:
            # Only a loop's shutdown cancels a live reader (close() marks it dead first): the
            # engine's loop watcher kills the sandbox then (invariant 5), quietly.
            reason = "the sandbox was stopped"
            notify = False
            raise
        finally:
            self._die(reason, notify)

    def _route(self, frame: Frame) -> None:
        if frame.type in _TCP:
            if self.tunnels is None:
                raise ProtocolError("stream frame before egress was set up")
            self.tunnels.on_frame(frame.type, frame.id, frame.payload, frame.fields)
            return
        if frame.type is MsgType.READY:
            if not self._ready.done():
                self._ready.set_result(frame)
            return
        call = self.calls.get(frame.id)
        if call is not None:
            call.put(frame)
        # else: a late frame for a call we gave up on; drop it.

    def _die(self, reason: str, notify: bool = True) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        if not self._ready.done():
            self._ready.set_exception(SandboxDiedError(reason))
            self._ready.exception()  # mark retrieved
        self._held = None
        self._unheld.set()  # drains waiting for a release fail now
        for call in self.calls.values():
            call.put(_DEAD)
        if notify:
            self._on_dead(reason)

    def send(self, mtype: MsgType, rid: int, fields: dict[str, Any], payload: bytes = b"") -> None:
        if self.dead_reason is not None:
            raise SandboxDiedError(self.dead_reason)
        self.last_active = time.monotonic()
        try:
            data = encode(Frame(mtype, rid, fields, payload))
        except ProtocolError as exc:
            raise InvalidArgumentError("request too large") from exc
        if self._held is not None:  # quiesced for a checkpoint: sent on release
            self._held.append(data)
            return
        try:
            self.proc.writer.write(data)
        except (ConnectionError, RuntimeError, OSError) as exc:
            self._die("the connection to the sandbox's agent broke")
            raise SandboxDiedError(self.dead_reason or "") from exc

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the agent has read what was sent, at most ``timeout`` (default
        SEND_TIMEOUT): an agent that stops reading is dead, and its sandbox ends. While
        the agent is quiesced this waits for the release first (not counted)."""
        while self._held is not None:
            await self._unheld.wait()
        if self.dead_reason is not None:
            raise SandboxDiedError(self.dead_reason)
        try:
            async with asyncio.timeout(SEND_TIMEOUT if timeout is None else timeout):
                await self.proc.writer.drain()
        except TimeoutError:
            self._die("the sandbox's agent stopped reading")
            raise SandboxDiedError("the sandbox's agent stopped reading") from None
        except (ConnectionError, OSError) as exc:
            self._die("the connection to the sandbox's agent broke")
            raise SandboxDiedError(self.dead_reason or "") from exc

    async def open(
        self,
        mtype: MsgType,
        fields: dict[str, Any],
        payload: bytes = b"",
        timeout: float | None = None,
    ) -> Call:
        """Send a request (the send bounded by ``timeout``, default SEND_TIMEOUT); the
        returned Call yields its frames."""
        rid = next(self._ids)
        call = Call(self, rid)
        call.root = fields.get("root") is True
        self.calls[rid] = call
        try:
            self.send(mtype, rid, fields, payload)
            await self.drain(timeout)
        except BaseException:
            call.close()
            raise
        return call

    async def quiesce(self, timeout: float) -> None:
        """Quiesce the agent for a checkpoint (moat.runtime.quiesce.AgentGate): QUIESCE,
        then nothing more is written until ``release``; its DONE within ``timeout``."""
        if self._held is not None:
            raise SandboxError("the sandbox is being checkpointed already")
        rid = next(self._ids)
        call = Call(self, rid)
        self.calls[rid] = call
        try:
            self.send(MsgType.QUIESCE, rid, {})
            self._held = []  # at once: no frame of another task goes out after it
            self._unheld.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.writer.drain()
                    frame = await call.next()
            except TimeoutError:
                # A wedged or hostile agent: it gets its RESUME right behind, so that it
                # goes on whenever it reads them; the sandbox keeps running.
                self.release()
                raise TimeoutError_(
                    "the sandbox's agent did not get ready for the checkpoint in time (it is "
                    "busy or stuck); nothing was saved and the sandbox keeps running"
                ) from None
            except BaseException:
                self.release()
                raise
            if frame.type is not MsgType.DONE:
                self.release()
                raise SandboxError("the sandbox's agent refused the checkpoint; it keeps running")
        finally:
            call.close()

    def release(self) -> None:
        """End a ``quiesce``: RESUME (no nonce: the same host goes on), then what was held."""
        held, self._held = self._held, None
        if held is None:
            return
        try:
            if self.dead_reason is None:
                self.proc.writer.write(encode(Frame(MsgType.RESUME, next(self._ids), {})))
                for data in held:
                    self.proc.writer.write(data)
        except (ConnectionError, RuntimeError, OSError):
            self._die("the connection to the sandbox's agent broke")
        finally:
            self._unheld.set()

    async def request(
        self, mtype: MsgType, fields: dict[str, Any], timeout: float = 30.0, payload: bytes = b""
    ) -> dict[str, Any]:
        """A simple request: wait for DONE (fields) or FAIL (raised)."""
        call = await self.open(mtype, fields, payload)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    frame = await call.next()
                    if frame.type is MsgType.DONE:
                        return frame.fields
                    if frame.type is MsgType.FAIL:
                        raise fail_to_error(frame, root=call.root)
        except TimeoutError:
            self._die("the sandbox's agent stopped answering")
            raise SandboxDiedError("the sandbox's agent stopped answering") from None
        finally:
            call.close()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
