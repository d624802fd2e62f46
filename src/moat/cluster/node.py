"""The node: one long-lived Ray actor per machine hosting moat's unchanged front door.

Trust domain: host engine (the node's). The actor runs the node's own ``FrontDoor`` and
``Engine`` (runtimes, egress gateway, guard, audit, warm pool, sweep) exactly as a single
host does; what leaves it is what the front door returns: guarded results and events
(invariant 4). Frames, the gateway and secrets' substitution never leave the node.

Errors cross as ``("err", packed)`` values, never as raised exceptions: Ray would append
the node's traceback to the message (invariant 8), and moat's errors carry structured
fields that plain pickling of an exception loses. Streams (code, commands, terminals)
cross by pulling: a pump per stream moves the front door's events into a bounded queue,
and the server takes up to ``PULL_MAX_ITEMS`` / ``PULL_MAX_BYTES`` per call, waiting at
most ``wait`` seconds for the first one (a long poll: one Ray call per batch, not per event).

The node's sandboxes die with it (invariant 5): a thread watches the raylet (this worker's
parent); when it dies the actor kills every sandbox, drains the reaper and exits, and what a
harder death leaves is owned by a dead process, which ``moat node``'s sweep removes before
the node advertises capacity again.

Pause and resume (``pause``, ``resume``) go through the cluster's shared paused store
(``moat.cluster.paused``) when the node has one: this engine keeps none of its paused
sandboxes in memory (the server tracks them), and reports the ones that paused by
themselves (``on_timeout="pause"``) with its ended ones.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

from moat import errors
from moat.cluster.paused import configured_dir, read_store_id
from moat.cluster.ports import NodePorts
from moat.engine.persist import Persistence
from moat.errors import InvalidArgumentError, NotFoundError, PolicyError, SandboxError
from moat.store.paused import PausedStore, host_token

log = logging.getLogger("moat.cluster.node")

__all__ = ["NodeActor", "pack_error", "unpack_error"]

#: Events one pull returns at most, and the text/bytes they carry at most (a pull of a
#: chatty command stays a bounded Ray object).
PULL_MAX_ITEMS: Final = 512
PULL_MAX_BYTES: Final = 1 << 20
#: Events a stream's pump holds unread before it waits for the server (backpressure).
STREAM_QUEUE: Final = 1024
#: How often the raylet watcher looks, and how long the node's last kill may take.
WATCH_PERIOD_S: Final = 0.2
LAST_KILL_S: Final = 5.0
#: Ended sandbox ids a node remembers for the server's watch.
MAX_ENDED_IDS: Final = 4096
#: Directory watches one node keeps open at once (each sandbox has its own, lower cap).
MAX_WATCHES: Final = 4096

#: The front door's methods a server may call as plain request/reply.
PLAIN: Final = frozenset(
    {
        "kill", "set_timeout", "info", "is_running", "list_sandboxes", "metrics",
        "update_network", "audit", "create_context", "list_contexts", "restart_context",
        "remove_context", "send_pty_input", "resize_pty", "send_stdin", "close_stdin",
        "signal", "list_commands", "read_file", "list_dir", "stat", "remove", "make_dir",
        "move",
    }
)  # fmt: skip
#: The front door's methods that return a stream of events.
STREAMS: Final = frozenset({"run_code", "start_command", "connect_command", "start_pty"})

_END = object()
#: The fields of an ingress audit row the server sends (AuditLog.record_ingress's).
_INGRESS_ROW: Final = ("method", "port", "allowed", "reason", "bytes_up", "bytes_down")


def pack_error(exc: BaseException) -> tuple[str, str, dict[str, Any]]:
    """A moat error as plain data (class name, message, fields); anything else becomes a
    bare SandboxError whose message names no host detail (invariant 8)."""
    if isinstance(exc, SandboxError) and getattr(errors, type(exc).__name__, None) is type(exc):
        plain = (str, int, float, list, type(None))
        fields = {k: v for k, v in vars(exc).items() if isinstance(v, plain)}
        return type(exc).__name__, str(exc), fields
    log.error("node call failed: %r", exc)  # the detail stays in the node's log
    return "SandboxError", "internal error on the cluster node", {}


def unpack_error(packed: tuple[str, str, dict[str, Any]]) -> SandboxError:
    """The error :func:`pack_error` packed, rebuilt on this side (a fresh traceback)."""
    name, message, fields = packed
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SandboxError)):
        return SandboxError("internal error on the cluster node")
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    for key, value in fields.items():
        setattr(exc, key, value)
    return exc


def _size(event: Any) -> int:
    for name in ("text", "data", "line"):
        value = getattr(event, name, None)
        if isinstance(value, (str, bytes)):
            return len(value)
    return 64


class _Pump:
    """One stream's events, moved into a bounded queue by a task on the actor's loop."""

    def __init__(self, events: AsyncIterator[Any]) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=STREAM_QUEUE)
        self.task = asyncio.get_running_loop().create_task(self._run(events))

    async def _run(self, events: AsyncIterator[Any]) -> None:
        try:
            async for event in events:
                await self.queue.put(event)
            await self.queue.put(_END)
        except SandboxError as exc:
            await self.queue.put(exc)
        except Exception as exc:  # noqa: BLE001 - packed by pull(): no host detail crosses
            await self.queue.put(exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the server closed the stream
            # the call was cancelled under us (its sandbox was killed): the server must learn
            # it ended, or its pull would wait on a stream that never ends
            await self.queue.put(errors.SandboxDiedError("the call ended with its sandbox"))
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()

    async def pull(self, wait: float) -> tuple[list[Any], bool, Any]:
        """(events, done, packed error or None)."""
        try:
            first = await asyncio.wait_for(self.queue.get(), wait)
        except TimeoutError:
            return [], False, None
        out: list[Any] = []
        size = 0
        item = first
        while True:
            if item is _END:
                return out, True, None
            if isinstance(item, BaseException):
                return out, True, pack_error(item)
            out.append(item)
            size += _size(item)
            if len(out) >= PULL_MAX_ITEMS or size >= PULL_MAX_BYTES:
                return out, False, None
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                return out, False, None

    async def close(self) -> None:
        if not self.task.done():
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


class NodeActor:
    """The node's front door behind Ray calls. Created by the clustered server with
    ``num_cpus=0`` and hard node affinity (``moat.cluster.door``); every method is async
    (one event loop: the engine's)."""

    def __init__(self) -> None:
        from moat.engine.api import FrontDoor
        from moat.engine.tenants import TenantPolicies

        # Quotas and tenancy limits are the server's, across nodes; the node enforces what a
        # sandbox's own config says (limits, network, guard), as any host does.
        self.front = FrontDoor(policy=TenantPolicies())
        self.paused_root = configured_dir()
        if self.paused_root is not None:  # the cluster's shared store (moat.cluster.paused)
            engine = self.front.engine
            engine.persist = Persistence(engine, PausedStore(self.paused_root), shared=True)
        self._pausing: set[str] = set()  # pauses the server waits on
        self._resuming: set[str] = set()
        self._paused_out: dict[str, Any] = {}  # sid -> Paused entry, for pause()'s reply
        self.streams: dict[str, _Pump] = {}
        self.ports = NodePorts()  # ingress streams (moat.cluster.ports)
        self.watches: dict[str, Any] = {}  # directory watches (WatchStream) by their id
        self.loop: asyncio.AbstractEventLoop | None = None
        self.parent = os.getppid()  # the raylet that started this worker
        self.lost = False  # the raylet is gone: every call answers "lost" from now on
        #: sandboxes that ended, for the server (``ended_since``): (id, its Paused entry when
        #: it paused by itself, else None); bounded
        self._ended: collections.deque[tuple[str, Any]] = collections.deque(maxlen=MAX_ENDED_IDS)
        self._ended_base = 0  # how many ids fell off the deque's front
        self._ended_event: asyncio.Event | None = None
        self.front.on_ended(self._on_end)
        threading.Thread(target=self._watch_raylet, name="moat-raylet-watch", daemon=True).start()

    def _on_end(self, sandbox_id: str) -> None:
        entry = None
        if self.paused_root is not None:  # paused into the shared store: the server's now
            entry = self.front.engine.persist.forget(sandbox_id)
        if entry is not None and sandbox_id in self._pausing:
            self._paused_out[sandbox_id] = entry  # pause()'s reply carries it
            return
        if entry is not None and sandbox_id in self._resuming:
            return  # a resume that failed: still paused, resume()'s error says why
        if len(self._ended) == self._ended.maxlen:
            self._ended_base += 1
        self._ended.append((sandbox_id, entry))
        if self._ended_event is not None:
            self._ended_event.set()

    async def ended_since(
        self, cursor: int, wait: float
    ) -> tuple[int, list[tuple[str, Any]], bool]:
        """Sandboxes that ended after ``cursor`` (a long poll of up to ``wait`` seconds) as
        (id, Paused entry if it paused by itself), and whether this node is lost (its
        sandboxes then are lost, not ended)."""
        if self._ended_event is None:
            self._ended_event = asyncio.Event()
        end = self._ended_base + len(self._ended)
        if cursor >= end and not self.lost:
            self._ended_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended_event.wait(), min(max(wait, 0.0), 30.0))
            end = self._ended_base + len(self._ended)
        if self.lost:
            return cursor, [], True
        start = max(cursor - self._ended_base, 0)
        return end, list(self._ended)[start:], False

    # -- lifecycle of the node -----------------------------------------------------------

    async def ready(self) -> dict[str, Any]:
        """Who this node is: its Ray node id, host name, usable tiers and memory."""
        import ray

        self.loop = asyncio.get_running_loop()
        probes = await asyncio.to_thread(self.front.engine.doctor)
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "probed": [t for t, why in probes.items() if why is None],
            "paused_store": await asyncio.to_thread(read_store_id, self.paused_root),
            "host_token": host_token(),  # names this engine's work in the paused store
            "rss_bytes": _rss(),
        }

    async def stats(self) -> dict[str, Any]:
        return {"rss_bytes": _rss(), "sandboxes": len(self.front.engine.sessions)}

    async def kill_all(self) -> int:
        """Kill every sandbox of this node (the server's shutdown)."""
        sessions = list(self.front.engine.sessions.values())
        await asyncio.gather(*(s.kill("killed") for s in sessions), return_exceptions=True)
        return len(sessions)

    def _watch_raylet(self) -> None:
        """Invariant 5: the raylet died (SIGKILL, a lost machine): kill every sandbox of this
        node and exit; the server then finds the actor dead (and, sooner, answered "lost").

        Ray's own worker may exit at any moment once its raylet is gone, cutting a cleanup
        short; so first a detached sweeper starts that waits for this process to end and
        then sweeps what it left (the sweep removes only what dead owners held)."""
        while os.getppid() == self.parent:
            time.sleep(WATCH_PERIOD_S)
        log.warning("the raylet is gone: killing this node's sandboxes")
        self.lost = True
        loop = self.loop
        if loop is not None and self._ended_event is not None:
            loop.call_soon_threadsafe(self._ended_event.set)
        tiers = sorted(self.front.engine._swept)  # the tiers this engine used
        if tiers:
            with contextlib.suppress(OSError):
                subprocess.Popen(
                    [sys.executable, "-m", "moat.cluster.launch", "--sweep-after",
                     str(os.getpid()), *tiers],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
        if loop is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.kill_all(), loop).result(LAST_KILL_S)
        from moat.runtime import reaper

        reaper.drain(LAST_KILL_S)
        os._exit(1)

    # -- calls ------------------------------------------------------------------------

    async def create(
        self,
        tenant: str,
        config: Any,
        secrets_: Mapping[str, str] | None,
        sensitive: Any,
    ) -> tuple[str, Any]:
        if self.lost:
            return "lost", None
        try:
            info = await self.front.create(tenant, config, secrets=secrets_, sensitive=sensitive)
        except Exception as exc:  # noqa: BLE001 - every failure crosses as data (invariant 8)
            return "err", pack_error(exc)
        return "ok", info

    async def pause(
        self, tenant: str, sandbox_id: str, memory: bool, face: Any, room: int | None
    ) -> tuple[str, Any]:
        """Pause into the shared store: ("ok", its Paused entry). ``room``: bytes left of the
        tenant's paused-state quota across the cluster (the server's count)."""
        if self.lost:
            return "lost", None
        if self.paused_root is None:
            return "err", pack_error(PolicyError("this cluster node has no paused store"))
        self._pausing.add(sandbox_id)
        try:
            await self.front.pause(tenant, sandbox_id, memory, face=face, quota_bytes=room)
        except Exception as exc:  # noqa: BLE001 - every failure crosses as data (invariant 8)
            return "err", pack_error(exc)
        finally:
            self._pausing.discard(sandbox_id)
            entry = self._paused_out.pop(sandbox_id, None)
        if entry is None:
            return "err", pack_error(SandboxError("the sandbox could not be paused"))
        return "ok", entry

    async def resume(
        self, tenant: str, sandbox_id: str, timeout: float | None, secrets_: Any, sensitive: Any
    ) -> tuple[str, Any]:
        """Resume a sandbox of the shared store here: ("ok", its info)."""
        if self.lost:
            return "lost", None
        if self.paused_root is None:
            return "err", pack_error(PolicyError("this cluster node has no paused store"))
        persist = self.front.engine.persist
        self._resuming.add(sandbox_id)
        try:
            async with persist.lock(sandbox_id):
                found = await asyncio.to_thread(persist.adopt, sandbox_id)
            if found is None or found.tenant != tenant:
                persist.forget(sandbox_id)
                raise NotFoundError(f"sandbox {sandbox_id} was not found")
            info, _ = await self.front.connect(
                tenant, sandbox_id, timeout=timeout, secrets=secrets_, sensitive=sensitive
            )
        except Exception as exc:  # noqa: BLE001 - every failure crosses as data (invariant 8)
            persist.forget(sandbox_id)  # still paused on disk: the server's to track
            return "err", pack_error(exc)
        finally:
            self._resuming.discard(sandbox_id)
        return "ok", info

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.lost:
            return "lost", None
        if method not in PLAIN:
            return "err", pack_error(InvalidArgumentError(f"no node call {method!r}"))
        try:
            return "ok", await getattr(self.front, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure crosses as data (invariant 8)
            return "err", pack_error(exc)

    async def write_file(
        self, tenant: str, sandbox_id: str, path: str, data: bytes, metadata: Any,
        user: str = "user",
    ) -> tuple[str, Any]:  # fmt: skip
        if self.lost:
            return "lost", None
        try:
            entry = await self.front.write_file(tenant, sandbox_id, path, data, metadata, user)
        except Exception as exc:  # noqa: BLE001 - every failure crosses as data (invariant 8)
            return "err", pack_error(exc)
        return "ok", entry

    async def open_stream(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[str, Any]:
        """Start a streaming call: ("ok", (stream id, pid or None))."""
        if self.lost:
            return "lost", None
        if method not in STREAMS:
            return "err", pack_error(InvalidArgumentError(f"no node stream {method!r}"))
        try:
            result = getattr(self.front, method)(*args, **kwargs)
            if asyncio.iscoroutine(result):
                result = await result
        except Exception as exc:  # noqa: BLE001 - every failure crosses as data (invariant 8)
            return "err", pack_error(exc)
        pid = getattr(result, "pid", None)
        events = result.events() if hasattr(result, "events") else result
        sid = secrets.token_hex(8)
        self.streams[sid] = _Pump(events)
        return "ok", (sid, pid)

    async def pull(self, stream_id: str, wait: float) -> tuple[str, Any]:
        """("ok", (events, done, packed error or None)), or ("lost", None)."""
        if self.lost:
            return "lost", None
        pump = self.streams.get(stream_id)
        if pump is None:
            return "ok", ([], True, pack_error(errors.NotFoundError("no such stream")))
        events, done, err = await pump.pull(min(max(wait, 0.0), 30.0))
        if done:
            self.streams.pop(stream_id, None)
        if self.lost:  # lost while waiting: what it saw is not a normal end
            return "lost", None
        return "ok", (events, done, err)

    # -- directory watches: the front door's WatchStream, kept here under an id ----------

    async def watch_open(
        self, tenant: str, sandbox_id: str, path: str, recursive: bool, include_entry: bool
    ) -> tuple[str, Any]:
        """("ok", watch id): the front door's watch (names guarded here, invariant 4)."""
        if self.lost:
            return "lost", None
        try:
            if len(self.watches) >= MAX_WATCHES:
                raise PolicyError("too many directory watches on this cluster node")
            stream = await self.front.watch_dir(
                tenant, sandbox_id, path, recursive=recursive, include_entry=include_entry
            )
        except Exception as exc:  # noqa: BLE001 - every failure crosses as data (invariant 8)
            return "err", pack_error(exc)
        wid = secrets.token_hex(8)
        self.watches[wid] = stream
        return "ok", wid

    async def watch_take(self, wid: str) -> tuple[str, Any]:
        """("ok", (events up until now, ended, packed error or None)): the polling form."""
        if self.lost:
            return "lost", None
        stream = self.watches.get(wid)
        if stream is None:
            return "ok", ([], True, None)
        try:
            events = await stream.take()
        except Exception as exc:  # noqa: BLE001 - every failure crosses as data (invariant 8)
            self.watches.pop(wid, None)
            return "ok", ([], True, pack_error(exc))
        if stream.done:
            self.watches.pop(wid, None)
        return "ok", (events, stream.done, None)

    async def watch_pump(self, wid: str) -> tuple[str, Any]:
        """The streaming form: the watch's events move into a pump under the same id, which
        the server pulls like a command's (``pull``, ``close_stream``)."""
        if self.lost:
            return "lost", None
        stream = self.watches.get(wid)
        if stream is None:
            return "err", pack_error(NotFoundError("no such watch"))
        if wid not in self.streams:
            self.streams[wid] = _Pump(stream.events())
        return "ok", None

    async def watch_stop(self, wid: str) -> tuple[str, Any]:
        stream = self.watches.pop(wid, None)
        await self.close_stream(wid)
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.stop()
        return "ok", None

    # -- ingress (moat.cluster.ports): bytes to and from a port inside a sandbox ----------

    async def port_open(self, tenant: str, sandbox_id: str, port: int) -> tuple[str, Any]:
        """("ok", stream id) of a stream to 127.0.0.1:port inside the tenant's sandbox."""
        if self.lost:
            return "lost", None
        try:
            reader, writer = await self.front.open_port(tenant, sandbox_id, port)
            return "ok", self.ports.add(reader, writer)
        except Exception as exc:  # noqa: BLE001 - every failure crosses as data (invariant 8)
            return "err", pack_error(exc)

    async def port_read(self, conn: str, wait: float) -> tuple[str, Any]:
        """("ok", (bytes, at end)): a bounded piece, long-polling ``wait`` s for the first."""
        if self.lost:
            return "lost", None
        return "ok", await self.ports.read(conn, wait)

    async def port_write(self, conn: str, data: bytes) -> tuple[str, Any]:
        """("ok", taken?): a bounded piece, once the sandbox's stream took it (its credit)."""
        if self.lost:
            return "lost", None
        return "ok", await self.ports.write(conn, data)

    async def port_close(self, conn: str) -> tuple[str, Any]:
        self.ports.close(conn)
        return "ok", None

    async def record_ingress(self, sandbox_id: str, row: dict[str, Any]) -> None:
        """The server's audit row of an ingress connection, in this node's trail (the trail
        of the sandbox's node, as its egress rows)."""
        record = getattr(self.front.engine.audit, "record_ingress", None)
        if record is not None:
            try:
                record(sandbox_id, **{k: row[k] for k in _INGRESS_ROW if k in row})
            except Exception:  # a bad row is logged, never raised to the server
                log.exception("ingress audit failed")

    async def close_stream(self, stream_id: str) -> None:
        pump = self.streams.pop(stream_id, None)
        if pump is not None:
            await pump.close()


def _rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
