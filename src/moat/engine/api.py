"""The engine's front door: the one API every face calls (embedded SDK, server, tools).

Trust domain: host engine. Typed requests in, model types and async event streams out.
Every call names its caller's tenant; a sandbox of another tenant answers exactly like an
unknown id (invariant 11). Validation, defaults, profiles and tier choice happen here (through
``moat.engine.resolve``), and everything that leaves has passed the sandbox's guard
(invariant 4), whichever face called.

Pause and resume (``moat.engine.persist``) work on tiers whose driver is Checkpointable; on
another tier they raise PolicyError naming the missing capability (invariant 7: never a quiet
no-op). Snapshots, starts from a snapshot and fork: ``moat.engine.snapshots``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import IO, Any, Literal

from moat.egress import GatewayConfig, NetworkPolicy, Secret
from moat.engine import admission, templating
from moat.engine.activity import Activity, Call
from moat.engine.auditview import OfflineScrub, guard_rows, guard_trail, sandbox_audit
from moat.engine.engine import DEFAULT_TENANT, Engine, default_engine
from moat.engine.output import off_loop
from moat.engine.persist import Paused, Persistence
from moat.engine.resolve import (
    network_policy,
    resolve,
    secrets_of,
    sensitive_values,
    validate_config,
)
from moat.engine.session import Session, ended_error, file_chunks
from moat.engine.snapshots import Snapshot, check_name, info_of, is_snapshot_id
from moat.engine.tenants import TenantPolicies, load_tenants
from moat.engine.tmplbuild import TemplateBuilds, UploadTooLarge
from moat.engine.users import DEFAULT_USER
from moat.engine.users import as_root as _as_root
from moat.engine.watching import WatchStream
from moat.errors import (
    InvalidArgumentError,
    NotFoundError,
    PolicyError,
    QuotaExceededError,
    SandboxError,
)
from moat.guard import Guard, GuardBudgetError, GuardPolicy
from moat.model import (
    LANGUAGES,
    PROXY_PORT,
    Context,
    End,
    EntryInfo,
    ErrorEvent,
    Event,
    Execution,
    ExecutionError,
    NetworkConfig,
    Output,
    ProcessInfo,
    PtyOutput,
    PtySize,
    Result,
    ResultEvent,
    SandboxConfig,
    SandboxInfo,
    SandboxMetrics,
    SnapshotInfo,
    Started,
)
from moat.model import validate as v
from moat.protocol import MsgType
from moat.protocol.frames import MAX_PTY_SIDE
from moat.runtime.base import Checkpointable

__all__ = [
    "CAPABILITIES",
    "DEFAULT_TENANT",
    "MISSING_CAPABILITIES",
    "CommandStream",
    "FrontDoor",
    "GatewayConfig",
    "GuardPolicy",
    "NetworkPolicy",
    "Secret",
    "TemplateBuilds",
    "TenantPolicies",
    "UploadTooLarge",
    "WatchStream",
    "default_template",
    "e2b_template",
    "file_chunks",
    "is_snapshot_id",
    "kill_everything",
    "load_tenants",
    "require_template",
]

# Template names as the faces see them (the front door's: faces import nothing else of the
# engine): the default's name, E2B's default names mapped, and a name checked as built.
default_template = templating.default_template
e2b_template = templating.e2b_template
require_template = templating.require

#: What this engine can do for every tier.
CAPABILITIES = frozenset(
    {
        "sandboxes.create", "sandboxes.kill", "sandboxes.set_timeout", "sandboxes.info",
        "sandboxes.list", "code.run", "code.contexts", "commands.start", "commands.stdin",
        "commands.close_stdin", "commands.signal", "commands.list", "files.read",
        "files.write", "files.list", "files.stat", "files.move", "files.remove",
        "files.make_dir", "commands.connect", "files.watch", "pty.create", "pty.input",
        "pty.resize", "network.update", "audit.query", "sandboxes.metrics", "ports.open",
        "sandboxes.pause", "sandboxes.resume", "sandboxes.snapshot", "sandboxes.fork",
    }
)  # fmt: skip
#: Declared, not there yet: each raises PolicyError naming itself.
MISSING_CAPABILITIES: frozenset[str] = frozenset()
#: The most sandboxes one fork starts (E2B's bound).
MAX_FORKS = 20
_STATES = ("running", "paused", "ended")
_SIGNALS = {"SIGKILL": 9, "SIGTERM": 15, "SIGINT": 2, "SIGHUP": 1}
#: What a terminal runs unless told otherwise (E2B's: an interactive login shell).
PTY_COMMAND = "/bin/bash -i -l"
#: Released terminal output waiting for a slow reader: past it the PTY's pump waits (and
#: behind it the call's queue caps what the agent may send ahead).
PTY_BACKLOG = 4 << 20

_DONE = object()
log = logging.getLogger("moat.engine")


class _Stream:
    """Events of one call, produced by a task on the engine's loop, read in order once.

    A failure of the call is raised by the iterator after the events that preceded it;
    leaving the iteration early cancels the call.
    """

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.backlog = 0  # bytes of PtyOutput queued unread
        self._drained = asyncio.Event()
        self._closed = False  # the reader left: nothing queued from now on is read

    def push(self, event: Event) -> None:
        self.queue.put_nowait(event)

    async def push_pty(self, data: bytes) -> None:
        """Terminal output, once the reader has taken all but PTY_BACKLOG bytes."""
        while self.backlog > PTY_BACKLOG and not self._closed:
            self._drained.clear()
            await self._drained.wait()
        if self._closed:
            return  # nobody will read it: never hold it
        self.backlog += len(data)
        self.queue.put_nowait(PtyOutput(data))

    def run(self, work: Callable[[], Any]) -> None:
        async def main() -> None:
            try:
                self.push(await work())
            except BaseException as exc:  # handed to the reader, raised there
                self.queue.put_nowait(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                self.queue.put_nowait(_DONE)

        self.task = asyncio.get_running_loop().create_task(main())
        # Retrieve a failure even if nobody reads, so it is never reported as lost.
        self.task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def events(self) -> AsyncIterator[Event]:
        try:
            while True:
                item = await self.queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, PtyOutput):
                    self.backlog -= len(item.data)
                    self._drained.set()
                yield item
        finally:
            self._closed = True
            self._drained.set()  # a writer waiting for room goes on, and drops its output
            if self.task is not None and not self.task.done():
                self.task.cancel()
                with contextlib.suppress(BaseException):
                    await self.task


class CommandStream:
    """A started command: its pid, and its events (Output..., then End with its exit code)."""

    def __init__(self, pid: int, stream: _Stream) -> None:
        self.pid = pid
        self._stream = stream

    def events(self) -> AsyncIterator[Event]:
        return self._stream.events()


class FrontDoor:
    """The engine API. One per engine; every method takes the caller's tenant first.

    ``policy``: the tenants' quotas and limits (``moat.engine.tenants``); default: the state
    dir's ``tenants.toml`` when there is one, else none (no limits)."""

    def __init__(self, engine: Engine | None = None, policy: TenantPolicies | None = None) -> None:
        self.engine = engine or default_engine()
        if policy is not None and not isinstance(policy, TenantPolicies):
            raise InvalidArgumentError("policy must be a TenantPolicies")
        self.policy = load_tenants() if policy is None else policy
        #: recent calls per sandbox, code and guarded output (the dashboard's view)
        self.activity = Activity()
        #: templates tenants build through a face (E2B's template API; issue 12)
        self.template_builds = TemplateBuilds(self)

    # -- configuration ------------------------------------------------------------------

    @staticmethod
    def resolve(**kwargs: Any) -> SandboxConfig:
        """Caller input (keyword arguments of ``Sandbox.create``, or a profile) -> config."""
        return resolve(**kwargs)

    @staticmethod
    def template_exists(name: str, tenant: str | None = None) -> bool:
        """Whether ``name`` is a template this engine can run (``host`` or a built one), and
        given ``tenant``, one that tenant may use (another tenant's is unknown: invariant 11)."""
        try:
            if tenant is not None and not templating.visible_to(tenant, name):
                return False
            return templating.exists(name)
        except InvalidArgumentError:
            return False

    def tenant_template_sizes(self, tenant: str, name: str) -> dict[str, int] | None:
        """The sandbox sizes (``cpus``, ``memory_mb``) the tenant's own template ``name``
        was built with, or None."""
        _tenant(tenant)
        return self.template_builds.sizes_of(tenant, name)

    @staticmethod
    def tenant_template(tenant: str, name: str) -> str | None:
        """The id of the tenant's own template ``name`` names (built through the server;
        issue 12), or None: another tenant's is unknown here (invariant 11)."""
        _tenant(tenant)
        try:
            return templating.own_template(tenant, name)
        except InvalidArgumentError:
            return None

    def default_tier(self, tenant: str) -> str | None:
        """The tier the tenant's policy gives a request that names none (None: not set)."""
        _tenant(tenant)
        return self.policy.of(tenant).default_tier

    def capabilities(self) -> frozenset[str]:
        return CAPABILITIES

    # -- lifecycle ----------------------------------------------------------------------

    async def create(
        self,
        tenant: str,
        config: SandboxConfig | Mapping[str, Any],
        *,
        secrets: Mapping[str, str] | None = None,
        sensitive: Mapping[str, str] | list[str] | None = None,
        gateway_config: GatewayConfig | None = None,
    ) -> SandboxInfo:
        """Start a sandbox for ``tenant``. ``secrets`` holds the value of each of the
        config's secret references (by variable name); ``sensitive`` adds values the guard
        must never let through (a list, or value -> label)."""
        _tenant(tenant)
        cfg = validate_config(config)
        if not templating.visible_to(tenant, cfg.template):  # another tenant's (invariant 11)
            raise InvalidArgumentError(f"template {cfg.template[:64]!r} was not found")
        brokered = secrets_of(cfg, secrets or {})
        known = sensitive_values(sensitive)
        if gateway_config is not None and not isinstance(gateway_config, GatewayConfig):
            raise InvalidArgumentError("gateway_config must be a GatewayConfig")
        policy = self.policy.of(tenant)
        admission.check_config(policy, cfg)
        ledger = self.engine.quota
        token = self._reserve(tenant, policy, cfg)
        try:
            session = await self.engine.create(
                cfg, tenant=tenant, secrets=brokered, sensitive=known,
                gateway_config=gateway_config,
            )  # fmt: skip
        except BaseException:  # failed or cancelled start: its room is free again
            ledger.release(token)
            raise
        ledger.bind(token, session.id)
        self.activity.note_secrets(session.id, [(r.name, r.hosts) for r in cfg.secrets])
        if self.engine.get(session.id) is None:  # it ended already: the end freed nothing
            ledger.release_sandbox(session.id)
        self._arm(tenant, session, cfg)
        return session.info()

    async def kill(self, tenant: str, sandbox_id: str) -> bool:
        """Kill a sandbox. False if it had ended already, or there is no such sandbox."""
        _tenant(tenant)
        persist = self.engine.persist
        sid = v.sandbox_id(sandbox_id)
        killed = False
        try:
            session = self._session(tenant, sandbox_id)
        except SandboxError:  # paused, unknown, another tenant's, or ended already
            session = None
        if session is not None:
            # At once, not after a pause in progress (it holds the lock below): a sandbox
            # can't stretch its kill by making its checkpoint slow. That pause then fails.
            await session.kill("killed")
            killed = True
        if sid is not None:
            async with persist.lock(sid):
                paused = await off_loop_paused(persist, tenant, sid)
                if paused is not None:  # its state on disk goes with it (a pause that
                    return await persist.delete(paused) or killed  # won the race too)
        return killed

    def on_ended(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Subscribe ``listener(sandbox_id)`` to the end of every sandbox (kill, timeout,
        death), so a face can drop what it keeps per sandbox; returns the unsubscriber."""
        return self.engine.on_ended(listener)

    async def set_timeout(self, tenant: str, sandbox_id: str, seconds: float) -> None:
        """Give the sandbox ``seconds`` more to live, from now. ``0`` ends it now: its
        timeout's action (kill, or pause where ``on_timeout="pause"``) runs at once, as
        E2B's ``set_timeout(0)`` does."""
        self._session(tenant, sandbox_id).set_timeout(v.number("seconds", seconds, 0, 86400))

    async def info(self, tenant: str, sandbox_id: str) -> SandboxInfo:
        paused = await self._paused(tenant, sandbox_id)
        if paused is not None:
            return paused.info
        session = self._find(tenant, sandbox_id)
        if isinstance(session, Session):
            return session.info()
        return session[2]

    async def is_running(self, tenant: str, sandbox_id: str) -> bool:
        if await self._paused(tenant, sandbox_id) is not None:
            return False
        session = self._find(tenant, sandbox_id)
        return isinstance(session, Session) and session.is_running()

    async def list_sandboxes(
        self,
        tenant: str,
        *,
        metadata: Mapping[str, str] | None = None,
        state: str | None = "running",
    ) -> list[SandboxInfo]:
        """The tenant's sandboxes whose metadata holds every pair of ``metadata``."""
        _tenant(tenant)
        want = v.metadata(metadata)
        if state is not None:
            v.choice("state", state, _STATES)
        paused = await asyncio.to_thread(self.engine.persist.paused)  # loads once from disk
        with self.engine._mu:
            live = [s for s in self.engine.sessions.values() if s.tenant == tenant]
            gone = [e[2] for e in self.engine.ended.values() if e[0] == tenant]
        held = [p.info for p in list(paused.values()) if p.tenant == tenant]
        infos = [s.info() for s in live if s.ended is None] if state in (None, "running") else []
        if state in (None, "paused"):
            infos += held
        if state in (None, "ended"):
            infos += gone
        return [i for i in infos if all(i.metadata.get(k) == x for k, x in want.items())]

    async def metrics(
        self,
        tenant: str,
        sandbox_id: str,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
    ) -> list[SandboxMetrics]:
        """Resource samples of a running sandbox, oldest first, within ``[start, end]``
        (timezone-aware; either bound open when None). Read from the host's kernel."""
        for name, bound in (("start", start), ("end", end)):
            if bound is not None and (
                not isinstance(bound, dt.datetime) or bound.utcoffset() is None
            ):
                raise InvalidArgumentError(f"{name} must be a timezone-aware datetime")
        return self._session(tenant, sandbox_id).metrics.between(start, end)

    async def open_port(self, tenant: str, sandbox_id: str, port: int) -> tuple[Any, Any]:
        """Ingress: a byte stream ``(reader, writer)`` to ``127.0.0.1:port`` inside the
        sandbox (asyncio StreamReader/StreamWriter shapes). Raises PortNotOpenError when
        nothing listens there. What flows is not guarded: it is the user's own app talking
        to its client (the faces audit every connection)."""
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidArgumentError("port must be an integer from 1 to 65535")
        session = self._session(tenant, sandbox_id)
        if port == PROXY_PORT:
            # The agent's proxy port is the sandbox's way out through its gateway, which
            # brokers the sandbox's secrets: reached from outside it would lend them (and the
            # sandbox's egress) to whoever holds the traffic token (invariant 3).
            raise PolicyError(f"port {PROXY_PORT} is the sandbox's egress proxy: not reachable")
        tunnel = await session.open_port(port)
        return tunnel.reader, tunnel.writer

    async def pause(
        self,
        tenant: str,
        sandbox_id: str,
        memory: bool = False,
        *,
        face: Mapping[str, Any] | None = None,
        quota_bytes: int | None = None,
    ) -> SandboxInfo:
        """Stop the sandbox and keep its state on disk under its id (``resume``/``connect``
        bring it back). ``memory=True`` keeps processes and memory where the tier can, else
        PolicyError (never a quiet filesystem-only pause); ``False`` keeps the files.
        ``face``: a face's own non-secret fields, kept with it (``face_data``).
        ``quota_bytes``: a lower bound on the paused state's room than the tenant's own quota
        (a cluster's server passes what is left of it across nodes). Fails closed: on any
        error (disk full, quota) the sandbox keeps running."""
        if not isinstance(memory, bool):
            raise InvalidArgumentError("memory must be a bool")
        _tenant(tenant)
        persist = self.engine.persist
        sid = v.sandbox_id(sandbox_id)
        async with persist.lock(sid or "-"):
            if sid is not None and await self._paused(tenant, sid) is not None:
                raise SandboxError("the sandbox is already paused")
            session = self._session(tenant, sandbox_id)
            runtime = session.runtime
            if not isinstance(runtime, Checkpointable):
                raise PolicyError(
                    f"the {session.spec.tier} tier lacks the capability 'sandboxes.pause' "
                    "(its driver can't checkpoint)"
                )
            quota = self.policy.of(tenant).quotas.snapshot_mb
            room = None if quota is None else quota << 20
            if quota_bytes is not None:  # only ever lower (invariant 11: quotas hold)
                room = quota_bytes if room is None else min(room, quota_bytes)
            entry = await persist.pause(session, memory=memory, face=face, quota_bytes=room)
        return entry.info

    async def resume(
        self,
        tenant: str,
        sandbox_id: str,
        *,
        timeout: float | None = None,
        secrets: Mapping[str, str] | None = None,
        sensitive: Mapping[str, str] | list[str] | None = None,
    ) -> SandboxInfo:
        """Bring a paused sandbox back under its id (a running one: its info)."""
        info, _ = await self.connect(
            tenant, sandbox_id, timeout=timeout, secrets=secrets, sensitive=sensitive
        )
        return info

    async def connect(
        self,
        tenant: str,
        sandbox_id: str,
        *,
        timeout: float | None = None,
        secrets: Mapping[str, str] | None = None,
        sensitive: Mapping[str, str] | list[str] | None = None,
    ) -> tuple[SandboxInfo, bool]:
        """The sandbox, resumed if it was paused: (info, whether it was resumed).

        ``timeout``: its lifetime from now (a running one's is only extended). After a
        restart of this engine, a sandbox with secrets or sensitive values needs them again.
        """
        _tenant(tenant)
        if timeout is not None:
            timeout = v.number("timeout", timeout, 1, v.MAX_TIMEOUT)
        persist = self.engine.persist
        sid = v.sandbox_id(sandbox_id)
        async with persist.lock(sid or "-"):
            paused = None if sid is None else await self._paused(tenant, sid)
            if paused is None:
                session = self._session(tenant, sandbox_id)
                if timeout is not None and session.end_at < dt.datetime.now(dt.UTC) + dt.timedelta(
                    seconds=timeout
                ):
                    session.set_timeout(timeout)
                return session.info(), False
            known = sensitive_values(sensitive) if sensitive is not None else None
            config = SandboxConfig.from_dict(paused.record["config"])
            policy = self.policy.of(tenant)
            admission.check_config(policy, config)  # the tenant's policy as it is now
            ledger = self.engine.quota
            token = self._reserve(tenant, policy, config)
            try:
                session = await persist.resume(
                    paused, timeout=timeout, secrets=secrets, sensitive=known
                )
            except BaseException:
                ledger.release(token)
                raise
            ledger.bind(token, session.id)
            if self.engine.get(session.id) is None:
                ledger.release_sandbox(session.id)
            session.face = dict(paused.record.get("face") or {})
            self._arm(tenant, session, config)
            return session.info(), True

    def set_face(self, tenant: str, sandbox_id: str, face: Mapping[str, Any]) -> None:
        """A face's own non-secret names for a running sandbox, kept with it when it pauses
        (by request or at its timeout) and given back by ``face_data``."""
        self._session(tenant, sandbox_id).face = dict(face)

    def _arm(self, tenant: str, session: Session, cfg: SandboxConfig) -> None:
        """Its lifetime's end: a pause (``on_timeout="pause"``), and its idle timer."""
        if session.ended is not None:
            return
        if cfg.on_timeout == "pause":
            persist = self.engine.persist
            runtime = session.runtime

            async def expire() -> None:
                async with persist.lock(session.id):
                    if session.ended is not None:
                        return
                    quota = self.policy.of(tenant).quotas.snapshot_mb
                    await persist.pause(
                        session,
                        memory=isinstance(runtime, Checkpointable) and bool(runtime.keeps_memory),
                        quota_bytes=None if quota is None else quota << 20,
                    )

            session.on_expiry = expire
        if cfg.idle_timeout is not None:
            session.watch_idle(cfg.idle_timeout)

    def is_paused_now(self, tenant: str, sandbox_id: str) -> bool:
        """Whether the tenant's sandbox is paused, from memory only (for end listeners: a
        pause ends the session after its state is recorded)."""
        paused = self.engine.persist._paused
        entry = None if paused is None else paused.get(sandbox_id)
        return entry is not None and entry.tenant == tenant

    def keeps_memory(self, tenant: str, sandbox_id: str) -> bool:
        """Whether a pause of this running sandbox can keep its processes and memory."""
        runtime = self._session(tenant, sandbox_id).runtime
        return isinstance(runtime, Checkpointable) and bool(runtime.keeps_memory)

    async def face_data(self, tenant: str, sandbox_id: str) -> dict[str, Any] | None:
        """What a face kept with a paused sandbox (``pause(face=...)``); None if not paused."""
        paused = await self._paused(tenant, sandbox_id)
        return None if paused is None else dict(paused.record.get("face") or {})

    def paused_report(self) -> list[str]:
        """Half-written paused states the start-up scan removed (after a crash)."""
        self.engine.persist.paused()
        return list(self.engine.persist.scan_report)

    # -- snapshots and fork (moat.engine.snapshots) -------------------------------------

    async def create_snapshot(
        self,
        tenant: str,
        sandbox_id: str,
        name: str | None = None,
        memory: bool | None = None,
    ) -> SnapshotInfo:
        """Snapshot a running sandbox; it keeps running and serving. ``memory`` None: the
        most the tier keeps (processes and memory where it can); True where it can't:
        PolicyError. Counts against the tenant's ``snapshot_mb`` with its paused sandboxes."""
        _tenant(tenant)
        name = check_name(name)
        if memory is not None and not isinstance(memory, bool):
            raise InvalidArgumentError("memory must be a bool")
        sid = v.sandbox_id(sandbox_id)
        async with self.engine.persist.lock(sid or "-"):  # not while it pauses
            session = self._session(tenant, sandbox_id)
            snap = await self._take(tenant, session, memory, name, temporary=False)
        return info_of(snap)

    async def _take(
        self, tenant: str, session: Session, memory: bool | None, name: str | None,
        *, temporary: bool,
    ) -> Snapshot:  # fmt: skip
        runtime = session.runtime
        if not isinstance(runtime, Checkpointable):
            raise PolicyError(
                f"the {session.spec.tier} tier lacks the capability 'sandboxes.snapshot' "
                "(its driver can't checkpoint)"
            )
        keeps = bool(runtime.keeps_memory)
        if memory and not keeps:
            raise PolicyError(f"the {session.spec.tier} tier can't keep memory in a snapshot")
        quota = self.policy.of(tenant).quotas.snapshot_mb
        return await self.engine.snapshots.take(
            session, memory=keeps if memory is None else memory, name=name,
            quota_bytes=None if quota is None else quota << 20, temporary=temporary,
        )  # fmt: skip

    async def list_snapshots(
        self, tenant: str, sandbox_id: str | None = None, name: str | None = None
    ) -> list[SnapshotInfo]:
        """The tenant's snapshots (of one sandbox, or with one name), oldest first."""
        _tenant(tenant)
        snaps = await self.engine.snapshots.loaded()
        rows = [
            info_of(s)
            for s in list(snaps.values())
            if s.tenant == tenant and not s.record.get("temporary")
            and (sandbox_id is None or s.sandbox_id == sandbox_id)
            and (name is None or s.name == name)
        ]  # fmt: skip
        return sorted(rows, key=lambda i: (i.created, i.snapshot_id))

    async def delete_snapshot(self, tenant: str, snapshot_id: str) -> bool:
        """Delete the tenant's snapshot and its directory. False: no such snapshot (or
        another tenant's: invariant 11)."""
        _tenant(tenant)
        snap = await self.engine.snapshots.find(tenant, snapshot_id)
        return False if snap is None else await self.engine.snapshots.delete(snap)

    async def snapshot_face(self, tenant: str, snapshot_id: str) -> dict[str, Any] | None:
        """What a face kept with the snapshot's source (``set_face``); None: no such one."""
        snap = await self.engine.snapshots.find(tenant, snapshot_id)
        return None if snap is None else dict(snap.record.get("face") or {})

    async def create_from_snapshot(
        self,
        tenant: str,
        snapshot_id: str,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        sensitive: Mapping[str, str] | list[str] | None = None,
    ) -> SandboxInfo:
        """A new sandbox (its own id, gateway, guard, audit identity) from the tenant's
        snapshot, reseeded. Another tenant's snapshot is NotFoundError like an unknown one."""
        _tenant(tenant)
        if timeout is not None:
            timeout = v.number("timeout", timeout, 1, v.MAX_TIMEOUT)
        want = v.metadata(metadata) if metadata is not None else None
        snap = await self.engine.snapshots.find(tenant, snapshot_id)
        if snap is None:
            shown = snapshot_id if is_snapshot_id(snapshot_id) else "(malformed id)"
            raise NotFoundError(f"snapshot {shown} was not found")
        known = sensitive_values(sensitive) if sensitive is not None else None
        session = await self._start_from(tenant, snap, timeout, want, secrets, known)
        return session.info()

    async def _start_from(
        self, tenant: str, snap: Snapshot, timeout: float | None,
        metadata: Mapping[str, str] | None, secrets: Mapping[str, str] | None,
        sensitive: Mapping[str, str] | None,
    ) -> Session:  # fmt: skip
        config = SandboxConfig.from_dict(snap.record["config"])
        policy = self.policy.of(tenant)
        admission.check_config(policy, config)  # the tenant's policy as it is now
        ledger = self.engine.quota
        token = self._reserve(tenant, policy, config)
        try:
            session = await self.engine.snapshots.start(
                snap, timeout=timeout, metadata=metadata, secrets=secrets, sensitive=sensitive
            )
        except BaseException:
            ledger.release(token)
            raise
        ledger.bind(token, session.id)
        if self.engine.get(session.id) is None:
            ledger.release_sandbox(session.id)
        self._arm(tenant, session, config)
        return session

    async def fork(
        self, tenant: str, sandbox_id: str, count: int = 1, *, timeout: float | None = None
    ) -> list[SandboxInfo | SandboxError]:
        """``count`` (1..20) new sandboxes from the running sandbox's state now: a temporary
        snapshot, ``count`` starts from it, the snapshot deleted. One entry per fork, in
        order: its info, or the error that stopped it (the others still start)."""
        _tenant(tenant)
        count = v.integer("count", count, 1, MAX_FORKS)
        if timeout is not None:
            timeout = v.number("timeout", timeout, 1, v.MAX_TIMEOUT)
        sid = v.sandbox_id(sandbox_id)
        async with self.engine.persist.lock(sid or "-"):
            session = self._session(tenant, sandbox_id)
            snap = await self._take(tenant, session, None, None, temporary=True)
        try:
            got = await asyncio.gather(
                *(self._start_from(tenant, snap, timeout, None, None, None) for _ in range(count)),
                return_exceptions=True,
            )
        finally:
            await self.engine.snapshots.delete(snap)
        out: list[SandboxInfo | SandboxError] = []
        for r in got:
            if isinstance(r, Session):
                out.append(r.info())
            elif isinstance(r, SandboxError):
                out.append(r)
            elif isinstance(r, Exception):
                log.warning("fork of %s failed: %r", sandbox_id, r)
                out.append(SandboxError("the fork could not be started"))
            else:
                raise r
        return out

    def guard(self, tenant: str, sandbox_id: str) -> Guard:
        """The sandbox's guard (embedded faces: ``register(value, label)``, ``canary()``)."""
        guard: Guard = self._session(tenant, sandbox_id).guard  # type: ignore[assignment]
        return guard

    async def update_network(
        self, tenant: str, sandbox_id: str, network: NetworkPolicy | Mapping[str, Any] | None
    ) -> None:
        """Replace the egress policy; open tunnels it no longer allows are closed."""
        session = self._session(tenant, sandbox_id)
        if isinstance(network, NetworkConfig):
            policy = network_policy(network)
        else:
            policy = NetworkPolicy.parse(network)
        admission.check_network(self.policy.of(tenant), policy)  # the tenant's ceiling
        await session.update_network(policy)

    async def audit(
        self, tenant: str, sandbox_id: str, *, denied_only: bool = False, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """The sandbox's audit rows: egress decisions, executions, guard findings."""
        if await self._paused(tenant, sandbox_id) is None:  # else: no session while paused
            found = self._find(tenant, sandbox_id)
            if isinstance(found, Session):  # guarded by its own guard (invariant 4)
                return await sandbox_audit(
                    found, self.engine.audit, denied_only=denied_only, limit=limit
                )
        # an ended (or paused) sandbox has no guard running: the offline one (default rules,
        # canary shapes)
        rows = await asyncio.to_thread(
            self.engine.audit.query,
            sandbox_id=v.sandbox_id(sandbox_id),
            denied_only=denied_only,
            limit=limit,
        )
        return await asyncio.to_thread(guard_rows, rows, OfflineScrub())

    async def audit_trail(
        self,
        tenant: str | None,
        *,
        sandbox_id: str | None = None,
        denied_only: bool = False,
        since: float | None = None,
        until: float | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        """Audit rows of every sandbox of ``tenant``, newest first, guarded (a live
        sandbox's by its own guard, invariant 4). ``tenant`` None: every tenant's rows, for
        a face that has established its caller is the host's operator (the dashboard's
        admin); a tenant sees only rows stamped with its name (invariant 11)."""
        if tenant is not None:
            _tenant(tenant)
        sid = v.sandbox_id(sandbox_id) if sandbox_id is not None else None
        if sandbox_id is not None and sid is None:
            return []  # a malformed id matches nothing, like an unknown one
        rows = await asyncio.to_thread(
            self.engine.audit.query, sandbox_id=sid, denied_only=denied_only, limit=limit,
            tenant=tenant, since=since, until=until,
        )  # fmt: skip

        def live(row_sid: str) -> Guard | None:
            with self.engine._mu:
                session = self.engine.sessions.get(row_sid)
            if session is None or (tenant is not None and session.tenant != tenant):
                return None
            guard = session.guard
            return guard if isinstance(guard, Guard) else None

        return await asyncio.to_thread(guard_trail, rows, live)

    # -- code and contexts ------------------------------------------------------------

    def run_code(
        self,
        tenant: str,
        sandbox_id: str,
        code: str,
        *,
        language: str = "python",
        context: str = "default",
        timeout: float | None = 60,
        envs: Mapping[str, str] | None = None,
    ) -> AsyncIterator[Event]:
        """Run code in a context: Output, ResultEvent and ErrorEvent as they come, then End.

        A timeout, a blocked leak or a dead sandbox is raised by the iterator."""
        session = self._session(tenant, sandbox_id)
        code = v.text("code", code)
        lang = v.choice("language", language, LANGUAGES)
        ctx = v.context_id(context)
        t = v.MAX_TIMEOUT if timeout is None else v.timeout("timeout", timeout)
        env = v.envs(envs)
        stream = _Stream()
        call = self._recorded(session, "code", lang, code)

        async def out(text: str, name: Literal["stdout", "stderr"]) -> None:
            call.add(name, text)  # guarded already, as the caller gets it (invariant 4)
            stream.push(Output(name, text))

        async def on_result(r: Result) -> None:
            if r.text is not None:
                call.add("result", r.text)
            stream.push(ResultEvent(r))

        async def on_error(e: ExecutionError) -> None:
            call.add("error", f"{e.name}: {e.value}")
            stream.push(ErrorEvent(e))

        async def work() -> End:
            try:
                ex: Execution = await session.run_code(
                    code, lang, ctx, t, env,
                    lambda s: out(s, "stdout"), lambda s: out(s, "stderr"), on_result, on_error,
                )  # fmt: skip
            except BaseException:
                call.end("failed")
                raise
            call.end("error" if ex.error is not None else "ok")
            return End(truncated=ex.truncated, execution_count=ex.execution_count)

        stream.run(work)
        return stream.events()

    async def create_context(
        self, tenant: str, sandbox_id: str, language: str = "python", cwd: str | None = None
    ) -> Context:
        session = self._session(tenant, sandbox_id)
        lang = v.choice("language", language, LANGUAGES)
        return await session.create_context(lang, v.path(cwd) if cwd is not None else None)

    async def list_contexts(self, tenant: str, sandbox_id: str) -> list[Context]:
        return await self._session(tenant, sandbox_id).list_contexts()

    async def restart_context(self, tenant: str, sandbox_id: str, context: str) -> None:
        await self._session(tenant, sandbox_id).restart_context(v.context_id(context))

    async def remove_context(self, tenant: str, sandbox_id: str, context: str) -> None:
        await self._session(tenant, sandbox_id).remove_context(v.context_id(context))

    # -- commands ---------------------------------------------------------------------

    async def start_command(
        self,
        tenant: str,
        sandbox_id: str,
        cmd: str,
        *,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bool = False,
        user: str = DEFAULT_USER,
    ) -> CommandStream:
        """Start ``cmd`` with bash as ``user`` ("user" or "root": docs/users.md); its events
        stream from the returned handle."""
        session = self._session(tenant, sandbox_id)
        root = _as_root(session.spec, user)
        cmd = v.text("cmd", cmd)
        env = v.envs(envs)
        if cwd is not None:
            cwd = v.path(cwd)
        if not isinstance(stdin, bool):
            raise InvalidArgumentError("stdin must be a bool")
        stream = _Stream()
        record = self._recorded(session, "command", "bash", cmd)

        async def out(text: str, name: Literal["stdout", "stderr"]) -> None:
            record.add(name, text)  # guarded already (invariant 4)
            stream.push(Output(name, text))

        try:
            pid, call, sink = await session.start_command(
                cmd, env, cwd, stdin, lambda s: out(s, "stdout"), lambda s: out(s, "stderr"),
                root=root,
            )  # fmt: skip
        except BaseException:
            record.end("failed")
            raise
        stream.push(Started(pid))

        async def work() -> End:
            try:
                result = await session.wait_command(call, sink, None, pid)
            except BaseException:
                record.end("failed")
                raise
            record.end("ok" if result.exit_code == 0 else "error", result.exit_code)
            return End(truncated=result.truncated, exit_code=result.exit_code)

        stream.run(work)
        return CommandStream(pid, stream)

    async def connect_command(self, tenant: str, sandbox_id: str, pid: int) -> CommandStream:
        """Re-attach to a running command or PTY: Started, its output from now on (Output,
        or PtyOutput for a PTY), then End."""
        session = self._session(tenant, sandbox_id)
        stream = _Stream()
        call, is_pty = await session.attach(v.pid(pid))
        stream.push(Started(pid))
        if is_pty:
            return _pty_stream(session, stream, call, pid, MsgType.CMD_CONNECT)

        async def out(text: str, name: Literal["stdout", "stderr"]) -> None:
            stream.push(Output(name, text))

        sink = session._sink(lambda s: out(s, "stdout"), lambda s: out(s, "stderr"))

        async def work() -> End:
            result = await session.wait_command(call, sink, None, pid, MsgType.CMD_CONNECT)
            return End(truncated=result.truncated, exit_code=result.exit_code)

        stream.run(work)
        return CommandStream(pid, stream)

    # -- terminals ----------------------------------------------------------------------

    async def start_pty(
        self,
        tenant: str,
        sandbox_id: str,
        size: PtySize,
        *,
        cmd: str | None = None,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str = DEFAULT_USER,
    ) -> CommandStream:
        """Start ``cmd`` (default: an interactive login shell) on a new pseudo-terminal
        inside the sandbox as ``user``: Started, PtyOutput (guarded bytes) as it comes, then
        End."""
        session = self._session(tenant, sandbox_id)
        root = _as_root(session.spec, user)
        cols, rows = _size(size)
        cmd = v.text("cmd", PTY_COMMAND if cmd is None else cmd)
        env = v.envs(envs)
        if cwd is not None:
            cwd = v.path(cwd)
        pid, call = await session.start_pty(cmd, env, cwd, cols, rows, root=root)
        stream = _Stream()
        stream.push(Started(pid))
        return _pty_stream(session, stream, call, pid, MsgType.CMD_START)

    async def send_pty_input(self, tenant: str, sandbox_id: str, pid: int, data: bytes) -> None:
        """Bytes typed into a PTY (0x03 interrupts, 0x04 at an empty line is EOF)."""
        if not isinstance(data, bytes):
            raise InvalidArgumentError("data must be bytes")
        await self._session(tenant, sandbox_id).send_pty_input(v.pid(pid), data)

    async def resize_pty(self, tenant: str, sandbox_id: str, pid: int, size: PtySize) -> None:
        """Give a PTY a new size (its programs get SIGWINCH)."""
        session = self._session(tenant, sandbox_id)
        await session.resize_pty(v.pid(pid), *_size(size))

    async def send_stdin(
        self, tenant: str, sandbox_id: str, pid: int, data: bytes, eof: bool = False
    ) -> None:
        if not isinstance(data, bytes):
            raise InvalidArgumentError("data must be bytes")
        await self._session(tenant, sandbox_id).send_stdin(v.pid(pid), data, bool(eof))

    async def close_stdin(self, tenant: str, sandbox_id: str, pid: int) -> None:
        await self._session(tenant, sandbox_id).send_stdin(v.pid(pid), b"", True)

    async def signal(self, tenant: str, sandbox_id: str, pid: int, signal: str = "SIGKILL") -> bool:
        """Signal a command's process group. False if it had already ended."""
        session = self._session(tenant, sandbox_id)
        v.choice("signal", signal, tuple(_SIGNALS))
        return await session.kill_command(v.pid(pid), _SIGNALS[signal])

    async def list_commands(self, tenant: str, sandbox_id: str) -> list[ProcessInfo]:
        return await self._session(tenant, sandbox_id).list_commands()

    # -- files ------------------------------------------------------------------------

    async def read_file(
        self,
        tenant: str,
        sandbox_id: str,
        path: str,
        format: Literal["text", "bytes"] = "text",
        user: str = DEFAULT_USER,
    ) -> str | bytes:
        """A file's content, read as ``user``, guarded like any output (invariant 4)."""
        session = self._session(tenant, sandbox_id)
        root = _as_root(session.spec, user)
        path = v.path(path)
        fmt = v.choice("format", format, ("text", "bytes"))
        data = await session.read_file(path, root=root)
        guard = session.guard
        # Scanned off the event loop when large (a costly file must not stall the others).
        try:
            if fmt == "bytes":
                return await off_loop(len(data), guard.redact_bytes, data, "files")
            text = data.decode("utf-8", "replace")
            return await off_loop(len(text), guard.redact_text, text, "files")
        except GuardBudgetError:
            session.audit_budget("files")
            raise

    async def write_file(
        self,
        tenant: str,
        sandbox_id: str,
        path: str,
        data: str | bytes | IO[Any] | AsyncIterator[bytes],
        metadata: Mapping[str, str] | None = None,
        user: str = DEFAULT_USER,
    ) -> EntryInfo:
        """Write a file from str, bytes, a readable file object or an async byte stream, as
        ``user`` (who then owns a new file).

        ``metadata`` replaces the file's user metadata (``user.e2b.*`` extended attributes;
        ``{}`` clears it); None leaves it as it is."""
        session = self._session(tenant, sandbox_id)
        root = _as_root(session.spec, user)
        path = v.path(path)
        meta = None if metadata is None else v.file_metadata(metadata)
        if hasattr(data, "__aiter__"):
            chunks: Any = data
        elif isinstance(data, (str, bytes, bytearray, memoryview)) or hasattr(data, "read"):
            chunks = file_chunks(data)
        else:
            raise InvalidArgumentError("data must be str, bytes or a readable file object")
        return await session.write_file(path, chunks, metadata=meta, root=root)

    async def list_dir(
        self,
        tenant: str,
        sandbox_id: str,
        path: str = ".",
        depth: int = 1,
        user: str = DEFAULT_USER,
    ) -> list[EntryInfo]:
        session = self._session(tenant, sandbox_id)
        root = _as_root(session.spec, user)
        depth = int(v.number("depth", depth, 1, 32))
        return await session.list_dir(v.path(path), depth, root=root)

    async def stat(
        self, tenant: str, sandbox_id: str, path: str, user: str = DEFAULT_USER
    ) -> EntryInfo:
        session = self._session(tenant, sandbox_id)
        return await session.stat(v.path(path), root=_as_root(session.spec, user))

    async def remove(
        self, tenant: str, sandbox_id: str, path: str, user: str = DEFAULT_USER
    ) -> None:
        session = self._session(tenant, sandbox_id)
        await session.remove(v.path(path), root=_as_root(session.spec, user))

    async def make_dir(
        self, tenant: str, sandbox_id: str, path: str, user: str = DEFAULT_USER
    ) -> bool:
        """Create a directory (and parents). False if it already existed."""
        session = self._session(tenant, sandbox_id)
        return await session.make_dir(v.path(path), root=_as_root(session.spec, user))

    async def move(
        self,
        tenant: str,
        sandbox_id: str,
        source: str,
        destination: str,
        user: str = DEFAULT_USER,
    ) -> EntryInfo:
        """Rename or move a file or directory (parents made); the entry at ``destination``."""
        session = self._session(tenant, sandbox_id)
        root = _as_root(session.spec, user)
        return await session.move(v.path(source), v.path(destination), root=root)

    async def watch_dir(
        self,
        tenant: str,
        sandbox_id: str,
        path: str,
        *,
        recursive: bool = False,
        include_entry: bool = False,
    ) -> WatchStream:
        """Watch a directory: its guarded FilesystemEvents (create, write, remove, rename,
        chmod; ``overflow`` where events were lost). NotFoundError if ``path`` is not there,
        InvalidArgumentError if it is no directory, PolicyError past the sandbox's watches."""
        session = self._session(tenant, sandbox_id)
        path = v.path(path)
        if not isinstance(recursive, bool) or not isinstance(include_entry, bool):
            raise InvalidArgumentError("recursive and include_entry must be bools")
        watch = await session.watch_dir(path, recursive)
        return WatchStream(session, watch, path, include_entry)

    # -- recent calls -------------------------------------------------------------------

    async def activity_of(self, tenant: str, sandbox_id: str) -> list[Call]:
        """The tenant's sandbox's recent calls, newest first (``moat.engine.activity``);
        NotFoundError for another tenant's, like an unknown id (invariant 11)."""
        found = self._find(tenant, sandbox_id)
        sid = found.id if isinstance(found, Session) else v.sandbox_id(sandbox_id)
        return self.activity.calls(str(sid))

    async def secret_names(self, tenant: str, sandbox_id: str) -> list[tuple[str, tuple[str, ...]]]:
        """The sandbox's brokered secrets by name, with the hosts each may be used on;
        never a value (invariant 3)."""
        found = self._find(tenant, sandbox_id)
        sid = found.id if isinstance(found, Session) else v.sandbox_id(sandbox_id)
        return self.activity.secrets(str(sid))

    def _recorded(self, session: Session, kind: str, language: str, source: str) -> Call:
        """Start the record of a call; its code passes the sandbox's guard first (the
        caller's own text: redacted, but no finding of a leak is reported for it)."""
        guard = session.guard
        scrub = getattr(guard, "scrub_text", None)
        if scrub is None:  # not a moat Guard: keep nothing of the code (fail closed)
            return self.activity.start(session.id, kind, language, "", lambda t: t)
        return self.activity.start(
            session.id, kind, language, source, lambda t: scrub(t, "activity", report=False)
        )

    # -- lookups ----------------------------------------------------------------------

    def _reserve(self, tenant: str, policy: Any, cfg: SandboxConfig) -> int:
        """Room for one more running sandbox, checked and held at once, before any await
        (two racing creates: one slot)."""
        try:
            return self.engine.quota.reserve(
                tenant, policy.quotas, cfg.limits.cpus, cfg.limits.memory_mb
            )
        except QuotaExceededError as exc:
            if exc.retry_after is None:
                exc.retry_after = admission.retry_after(self._end_ats(tenant))
            raise

    async def _paused(self, tenant: str, sandbox_id: str) -> Paused | None:
        """The tenant's paused sandbox (invariant 11: another tenant's is unknown)."""
        _tenant(tenant)
        sid = v.sandbox_id(sandbox_id)
        if sid is None:
            return None
        return await off_loop_paused(self.engine.persist, tenant, sid)

    def _end_ats(self, tenant: str) -> list[Any]:
        with self.engine._mu:
            return [s.end_at for s in self.engine.sessions.values() if s.tenant == tenant]

    def _find(self, tenant: str, sandbox_id: str) -> Session | tuple[str, str, SandboxInfo]:
        """The tenant's live session, or the record of its ended one (invariant 11: another
        tenant's sandbox is NotFoundError with the very message of an unknown id)."""
        _tenant(tenant)
        sid = v.sandbox_id(sandbox_id)
        if sid is not None:
            with self.engine._mu:
                session = self.engine.sessions.get(sid)
                ended = self.engine.ended.get(sid)
            if session is not None and session.tenant == tenant:
                return session
            if ended is not None and ended[0] == tenant:
                return ended
            paused = self.engine.persist._paused  # loaded by any earlier paused lookup
            if paused is not None and (p := paused.get(sid)) is not None and p.tenant == tenant:
                raise NotFoundError(f"sandbox {sid} is paused (connect resumes it)")
        raise NotFoundError(f"sandbox {sid or '(malformed id)'} was not found")

    def _session(self, tenant: str, sandbox_id: str) -> Session:
        """The tenant's live session; a sandbox that ended raises why it ended."""
        found = self._find(tenant, sandbox_id)
        if isinstance(found, Session):
            return found
        raise ended_error(found[1])


async def off_loop_paused(persist: Persistence, tenant: str, sid: str) -> Paused | None:
    """``persist.find``, loading the paused set off the loop the first time (disk I/O)."""
    if persist._paused is None:
        await asyncio.to_thread(persist.paused)
    return persist.find(tenant, sid)


def _size(size: Any) -> tuple[int, int]:
    if not isinstance(size, PtySize):
        raise InvalidArgumentError("size must be a PtySize(cols, rows)")
    return v.integer("cols", size.cols, 1, MAX_PTY_SIDE), v.integer(
        "rows", size.rows, 1, MAX_PTY_SIDE
    )


def _pty_stream(
    session: Session, stream: _Stream, call: Any, pid: int, request: MsgType
) -> CommandStream:
    """Stream a PTY's call: its guarded output as PtyOutput, then End."""
    sink = session.pty_sink(stream.push_pty)

    async def work() -> End:
        code, truncated = await session.wait_pty(call, sink, pid, request)
        return End(truncated=truncated, exit_code=code)

    stream.run(work)
    return CommandStream(pid, stream)


def _tenant(tenant: Any) -> None:
    if not isinstance(tenant, str) or not 0 < len(tenant) <= 128:
        raise InvalidArgumentError("tenant must be a non-empty str")


async def kill_everything(engine: Engine | None = None) -> None:
    """Kill every sandbox of ``engine`` (default: this process's) and what still runs on
    this loop for it: the end of an embedding program (invariant 5)."""
    eng = engine or default_engine()
    await eng.end_loop()  # this loop's pool and sessions; its watcher stands by (engine.py)
    await asyncio.gather(
        *(s.kill("killed") for s in list(eng.sessions.values())), return_exceptions=True
    )
    # Whatever still runs on this loop (a warm-pool start, a reader) ends here too.
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
    await asyncio.gather(
        *(s.kill("killed") for s in list(eng.sessions.values())), return_exceptions=True
    )
