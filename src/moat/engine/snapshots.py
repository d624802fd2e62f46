"""Snapshots and fork: a running sandbox's state to disk, and new sandboxes from it (issue 11).

Trust domain: host engine. A snapshot asks the tier's driver to checkpoint the sandbox with
``leave_running=True`` (the source keeps serving) into a temporary directory of the snapshot
store, writes the record (the frozen ``SandboxConfig``, secrets by reference only: invariant
3) and commits both with one rename; a failure at any step (quota, full disk, driver error)
leaves nothing on disk and the source running. Starting from a snapshot makes a NEW sandbox:
a new id, gateway, guard, audit identity (and, on the server, access tokens), restored from
the checkpoint (left unchanged: many starts may share it), then reseeded like a resume
(``moat.engine.persist.reseed``) so that no two sandboxes share randomness. A fork is a
temporary snapshot, ``count`` starts from it, and the snapshot's removal.

Secret values and sensitive values are never written down; while this process lives they are
held in memory for the snapshot's starts; after a restart a start from a snapshot of a
sandbox that had secrets needs their values again (PolicyError names them). Known gap: a
memory restore keeps the placeholders the source's processes hold in their environment; the
new gateway has its own (docs/persistence.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moat.egress import GatewayConfig, Secret
from moat.engine import startcmd
from moat.engine.guardhook import make_guard
from moat.engine.persist import fits_warm, into_warm, reseed, restored_spec, take_warm
from moat.engine.resolve import guard_policy, secrets_of
from moat.engine.session import Session
from moat.engine.tiers import require
from moat.errors import (
    DiskFullError,
    InvalidArgumentError,
    NotFoundError,
    PolicyError,
    QuotaExceededError,
    SandboxError,
)
from moat.model import SandboxConfig, SnapshotInfo
from moat.runtime.base import Checkpointable
from moat.store.paused import disk_usage
from moat.store.snapshots import SnapshotStore, new_snapshot_id

if TYPE_CHECKING:
    from moat.engine.engine import Engine

log = logging.getLogger("moat.engine")

__all__ = ["SNAPSHOT_PREFIX", "Snapshot", "Snapshots", "info_of", "is_snapshot_id"]

SNAPSHOT_PREFIX = "snap-"
_SNAP_ID = re.compile(r"snap-[0-9a-f]{16}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_snapshot_id(value: Any) -> bool:
    """Whether ``value`` has the shape of a snapshot id."""
    return isinstance(value, str) and _SNAP_ID.fullmatch(value) is not None


def check_name(name: Any) -> str | None:
    """A snapshot's name: None, or 1-64 of letters, digits, ``.``, ``_``, ``-``."""
    if name is None:
        return None
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgumentError(
            "snapshot name must be 1-64 letters, digits, '.', '_' or '-' (a letter or digit first)"
        )
    return name


@dataclass
class Snapshot:
    """A snapshot as the engine lists it."""

    snapshot_id: str
    tenant: str
    record: dict[str, Any]
    size: int

    @property
    def name(self) -> str | None:
        name = self.record.get("name")
        return name if isinstance(name, str) else None

    @property
    def sandbox_id(self) -> str:
        return str(self.record["sandbox_id"])

    @property
    def created(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.record["created"])

    @property
    def tier(self) -> str:
        return str(self.record["tier"])


@dataclass
class _Held:
    """What a snapshot's starts need that is never written down (this process's memory)."""

    secrets: Mapping[str, Secret]
    sensitive: dict[str, str]
    gateway_config: GatewayConfig | None


class Snapshots:
    """The snapshots of one engine, and the snapshot / start / delete verbs."""

    def __init__(self, engine: Engine, store: SnapshotStore | None = None) -> None:
        self.engine = engine
        self.store = store or SnapshotStore()
        self._all: dict[str, Snapshot] | None = None
        self._loading = threading.Lock()
        self._held: dict[str, _Held] = {}
        self._users: dict[str, int] = {}  # snapshot id -> starts reading its checkpoint now
        self._doomed: set[str] = set()  # deleted while in use: removed by the last start
        #: what the start-up scan removed (half-written snapshots left by a crash)
        self.scan_report: list[str] = []

    # -- the set ---------------------------------------------------------------------------

    def all(self) -> dict[str, Snapshot]:
        """Every snapshot (loaded from disk at first use: they survive restarts). Thread-safe
        as Persistence.paused."""
        if self._all is not None:
            return self._all
        with self._loading:
            return self._load()

    def _load(self) -> dict[str, Snapshot]:
        if self._all is None:
            self.scan_report = self.store.scan()
            loaded: dict[str, Snapshot] = {}
            for sid, record in list(self.store.records()):
                if record.get("temporary"):  # a fork's, left by a crash: never listed
                    self.store.delete(sid)
                    self.scan_report.append(sid)
                    continue
                try:
                    loaded[sid] = _entry(sid, record, self.store.usage(sid))
                except (KeyError, TypeError, ValueError, SandboxError) as exc:
                    log.warning("snapshot %s: bad record (%s); left alone", sid, exc)
            self._all = loaded
        return self._all

    async def loaded(self) -> dict[str, Snapshot]:
        """``all()``, read off the loop the first time (disk I/O)."""
        if self._all is None:
            await asyncio.to_thread(self.all)
        assert self._all is not None
        return self._all

    async def find(self, tenant: str, snapshot_id: str) -> Snapshot | None:
        """The tenant's snapshot, or None (another tenant's is unknown: invariant 11)."""
        if not is_snapshot_id(snapshot_id):
            return None
        entry = (await self.loaded()).get(snapshot_id)
        return entry if entry is not None and entry.tenant == tenant else None

    def usage(self, tenant: str) -> int:
        """Bytes of snapshots the tenant holds."""
        return sum(s.size for s in self.all().values() if s.tenant == tenant)

    # -- verbs -----------------------------------------------------------------------------

    async def take(
        self,
        session: Session,
        *,
        memory: bool,
        name: str | None = None,
        quota_bytes: int | None = None,
        temporary: bool = False,
    ) -> Snapshot:
        """Checkpoint ``session`` with ``leave_running=True`` into a new snapshot. Fails
        closed: nothing on disk, the source runs on. ``quota_bytes`` bounds the tenant's
        snapshots and paused sandboxes together (``snapshot_mb``; one at a time per tenant
        while it is checked and filled: Persistence.quota_lock)."""
        tenant = None if quota_bytes is None else session.tenant
        async with self.engine.persist.quota_lock(tenant):
            return await self._take(
                session, memory=memory, name=name, quota_bytes=quota_bytes, temporary=temporary
            )

    async def _take(
        self,
        session: Session,
        *,
        memory: bool,
        name: str | None,
        quota_bytes: int | None,
        temporary: bool,
    ) -> Snapshot:
        runtime = session.runtime
        if not isinstance(runtime, Checkpointable):
            raise PolicyError(f"the {session.spec.tier} tier can't snapshot sandboxes")
        proc, origin, tenant = session.proc, session.origin, session.tenant
        if proc is None or origin is None or tenant is None:
            raise SandboxError("the sandbox is not ready to be snapshotted")
        snaps = await self.loaded()
        persist = self.engine.persist
        await asyncio.to_thread(persist.paused)
        used = self.usage(tenant) + persist.usage(tenant)
        room = None if quota_bytes is None else quota_bytes - used
        if room is not None and room <= 0:
            raise QuotaExceededError(_quota_message(quota_bytes))
        with contextlib.suppress(AttributeError):  # a process type without the slot
            setattr(proc, "checkpoint_cap", room)  # noqa: B010 - read where a driver can
        snap_id = new_snapshot_id()
        pending = await asyncio.to_thread(self.store.begin, snap_id)
        try:
            await runtime.checkpoint(proc, pending.checkpoint, memory=memory, leave_running=True)
            size = await asyncio.to_thread(disk_usage, pending.tmp)
            if room is not None and size > room:
                raise QuotaExceededError(_quota_message(quota_bytes))
            record = _record(session, snap_id, origin, memory, name, temporary)
            if session.gateway is not None:  # what its processes hold: kept by its starts
                await asyncio.to_thread(session.gateway.identity().save, pending.tmp)
            await asyncio.to_thread(self.store.commit, pending, record)
        except OSError as exc:
            await asyncio.to_thread(self.store.abort, pending)
            if isinstance(exc, SandboxError):  # moat's TimeoutError is an OSError too
                raise
            log.warning("snapshot of %s failed: %s", session.id, exc)  # details: the log only
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(
                    "the host has no room to keep the snapshot; the sandbox keeps running"
                ) from None
            raise SandboxError(
                "the snapshot could not be taken; the sandbox keeps running"
            ) from None
        except BaseException:
            await asyncio.to_thread(self.store.abort, pending)
            raise
        finally:
            with contextlib.suppress(AttributeError):
                setattr(proc, "checkpoint_cap", None)  # noqa: B010
        entry = _entry(snap_id, {"version": 1, **record}, size)
        _config, secrets, sensitive, gateway_config = origin
        self._held[snap_id] = _Held(dict(secrets), dict(sensitive), gateway_config)
        snaps[snap_id] = entry
        return entry

    async def start(
        self,
        snap: Snapshot,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        sensitive: Mapping[str, str] | None = None,
    ) -> Session:
        """A new sandbox (new id, gateway, guard, audit identity) restored from ``snap``,
        then reseeded. Fails closed: a failed start leaves nothing running."""
        engine = self.engine
        record = snap.record
        config = SandboxConfig.from_dict(record["config"])
        held = self._held.get(snap.snapshot_id)
        if held is not None and not secrets:
            brokered: Mapping[str, Secret] = held.secrets
            known = dict(held.sensitive)
            gateway_config = held.gateway_config
        else:
            names = list(record.get("secret_names") or [])
            missing = [n for n in names if n not in (secrets or {})]
            if missing:
                raise PolicyError(
                    "starting from this snapshot needs the values of its secrets again: "
                    + ", ".join(missing)
                )
            brokered = secrets_of(config, {n: (secrets or {})[n] for n in names})
            if record.get("sensitive") and not sensitive and held is None:
                raise PolicyError("starting from this snapshot needs its sensitive values again")
            known = dict(held.sensitive) if held is not None else {}
            known.update(sensitive or {})
            gateway_config = held.gateway_config if held is not None else None
        tier = snap.tier
        runtime = engine._runtime or require(tier)
        if getattr(runtime, "name", tier) != tier or not isinstance(runtime, Checkpointable):
            raise PolicyError(f"the {tier} tier can't start sandboxes from snapshots here")
        audit = await engine._audit_usable()
        sid = engine.new_id()  # its own identity: id, guard, gateway, audit rows
        for s in brokered.values():
            known.setdefault(s.value, "secret")
        guard = make_guard(sid, guard_policy(config.guard), known, audit)
        spec, gateway = await restored_spec(
            sid, tier, runtime, config, record["network"], brokered, self.store,
            snap.snapshot_id, audit=audit, gateway_config=gateway_config,
            inspect=guard.check_egress,
        )  # fmt: skip
        meta = dict(record["metadata"]) if metadata is None else dict(metadata)
        lifetime = config.timeout if timeout is None else timeout
        max_output = int(record["max_output"])
        snap_id = snap.snapshot_id
        if snap_id not in self.all() or snap_id in self._doomed:
            raise NotFoundError(f"snapshot {snap_id} was not found")
        self._users[snap_id] = self._users.get(snap_id, 0) + 1
        # A warm-pool sandbox where the snapshot's shape is the pool's (as a resume does).
        fits_pool = fits_warm(engine, runtime, spec, config, brokered, gateway_config)
        try:
            src = await asyncio.to_thread(self.store.checkpoint, snap_id)
            warm = await take_warm(engine, spec) if fits_pool else None
            session = warm or Session(
                spec, runtime, guard, lifetime, meta, engine._ended, audit=audit,
                gateway=gateway, max_output=max_output,
            )  # fmt: skip
            try:
                if warm is not None:
                    await into_warm(
                        engine, warm, spec, snap.tenant, guard, gateway, meta, max_output,
                        runtime, src,
                    )  # fmt: skip
                else:
                    session.tenant = snap.tenant
                    engine._register(session)
                    await session.start(restore=src)
                session.origin = (config, brokered, known, gateway_config)
                session.face = dict(record.get("face") or {})
                await reseed(session)
                memory = bool(record.get("memory"))
                await startcmd.after_restore(session, config.template, tier, memory)
            except BaseException:
                await session.kill("died: failed to start from a snapshot")
                raise
            if warm is not None:
                warm.begin(lifetime, "warm pool")
        finally:
            if fits_pool:
                engine.pool.refill(tier)
            left = self._users[snap_id] - 1
            if left:
                self._users[snap_id] = left
            else:
                del self._users[snap_id]
                if snap_id in self._doomed:
                    self._doomed.discard(snap_id)
                    await asyncio.to_thread(self.store.delete, snap_id)
        return session

    async def delete(self, snap: Snapshot) -> bool:
        """Forget a snapshot and delete its directory (after the starts reading it)."""
        snap_id = snap.snapshot_id
        if (await self.loaded()).pop(snap_id, None) is None:
            return False
        self._held.pop(snap_id, None)
        if self._users.get(snap_id):
            self._doomed.add(snap_id)
            return True
        return await asyncio.to_thread(self.store.delete, snap_id)


def _record(
    session: Session,
    snap_id: str,
    origin: Any,
    memory: bool,
    name: str | None,
    temporary: bool,
) -> dict[str, Any]:
    config: SandboxConfig = origin[0]
    gateway = session.gateway
    return {
        "snapshot_id": snap_id,
        "sandbox_id": session.id,  # the source
        "tenant": session.tenant,
        "tier": session.spec.tier,  # the checkpoint's tier
        "config": config.to_dict(),  # secrets by reference only (invariant 3)
        "network": gateway.policy.to_dict() if gateway is not None else None,
        "metadata": dict(session.metadata),
        "max_output": session.max_output,
        "created": dt.datetime.now(dt.UTC).isoformat(),
        "memory": memory,
        "name": name,
        "temporary": temporary,
        "secret_names": sorted(r.name for r in config.secrets),
        "sensitive": len(origin[2]),
        "face": dict(session.face),
    }


def _quota_message(quota_bytes: int | None) -> str:
    mb = (quota_bytes or 0) >> 20
    return f"the tenant's snapshot storage quota ({mb} MiB) is used up; the sandbox keeps running"


def _entry(snap_id: str, record: dict[str, Any], size: int) -> Snapshot:
    """A snapshot's listing entry from its record (checked: it is read from disk)."""
    SandboxConfig.from_dict(record["config"])
    tenant = record["tenant"]
    if not isinstance(tenant, str) or record["snapshot_id"] != snap_id:
        raise ValueError("record does not match its directory")
    dt.datetime.fromisoformat(record["created"])
    str(record["sandbox_id"])
    return Snapshot(snap_id, tenant, record, size)


def info_of(snap: Snapshot) -> SnapshotInfo:
    """A snapshot as the faces show it."""
    return SnapshotInfo(
        snap.snapshot_id, snap.sandbox_id, snap.name, snap.tier,
        bool(snap.record.get("memory")), snap.size, snap.created,
    )  # fmt: skip
