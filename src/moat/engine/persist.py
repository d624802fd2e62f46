"""Pause and resume: a sandbox's state to disk and back under the same id (issue 11).

Trust domain: host engine. A pause asks the tier's driver (``Checkpointable``) to checkpoint
the sandbox into a temporary directory of the paused store, writes the record (the frozen
``SandboxConfig``, secrets by reference only: invariant 3), commits both with one rename,
and only then kills the sandbox: a failure at any step (a full disk, a quota, a driver
error) leaves the sandbox running and nothing on disk. A resume rebuilds the gateway, the
guard and the secrets from the record (and, in this process, from what was held in memory),
restores through the driver, reseeds the agent's randomness, and deletes the paused state
only once the sandbox serves again: a crash at any moment leaves one complete state.

What is never written down: secret values and the caller's sensitive values. While this
process lives they are held in memory; after a restart, resuming a sandbox that had any
needs them again from the caller (a PolicyError names them), never a weaker guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moat.egress import Gateway, GatewayConfig, NetworkPolicy, Secret, proxy_env
from moat.egress.identity import GatewayIdentity
from moat.engine import startcmd, templating
from moat.engine.auditview import attach_scrubber
from moat.engine.guardhook import make_guard
from moat.engine.pool import poolable
from moat.engine.resolve import guard_policy, secrets_of
from moat.engine.session import Session
from moat.engine.tiers import require
from moat.errors import (
    DiskFullError,
    NotFoundError,
    PolicyError,
    QuotaExceededError,
    SandboxDiedError,
    SandboxError,
)
from moat.model import CA_BUNDLE_PATH, PROXY_PORT, SandboxConfig, SandboxInfo
from moat.model.config import Limits
from moat.protocol import MsgType
from moat.runtime.base import Checkpointable, ReplaysFiles
from moat.runtime.spec import SandboxSpec
from moat.store.paused import CHECKPOINT, PausedStore, disk_usage

if TYPE_CHECKING:
    from moat.engine.engine import Engine

log = logging.getLogger("moat.engine")

__all__ = [
    "KeyedLocks",
    "Paused",
    "Persistence",
    "fits_warm",
    "into_warm",
    "load_paused",
    "reseed",
    "restored_spec",
    "take_warm",
]

#: Bytes of host entropy sent to a restored agent (moat.agent.reseed).
RESEED_BYTES = 64
#: The reason a paused sandbox's session ended with (not an end: it is paused).
PAUSED = "paused"


@dataclass
class Paused:
    """A paused sandbox as the engine lists it."""

    sandbox_id: str
    tenant: str
    record: dict[str, Any]
    info: SandboxInfo
    size: int


@dataclass
class _Held:
    """What a paused sandbox needs that is never written down (this process's memory)."""

    secrets: Mapping[str, Secret]
    sensitive: dict[str, str]
    gateway_config: GatewayConfig | None
    guard: Any


class Persistence:
    """The paused sandboxes of one engine, and the pause and resume verbs."""

    def __init__(
        self, engine: Engine, store: PausedStore | None = None, *, shared: bool = False
    ) -> None:
        """``shared``: ``store`` is a cluster's shared store (``moat.cluster.paused``), whose
        sandboxes the clustered server lists and tracks: this engine loads none of them up
        front (nor scans the store), only the one it is asked to resume (``adopt``)."""
        self.engine = engine
        self.store = store or PausedStore()
        self._paused: dict[str, Paused] | None = {} if shared else None
        self._held: dict[str, _Held] = {}
        self._busy = KeyedLocks()
        self._quota_locks = KeyedLocks()
        self._loading = threading.Lock()
        #: removals of resumed sandboxes' paused states under way (asyncio holds tasks weakly)
        self._removals: set[asyncio.Task[None]] = set()
        #: what the start-up scan removed (half-written pauses left by a crash)
        self.scan_report: list[str] = []

    # -- the paused set ---------------------------------------------------------------

    def paused(self) -> dict[str, Paused]:
        """Every paused sandbox (loaded from disk at first use: they survive restarts).
        Thread-safe: two first uses at once (callers run it off the loop) load once, and no
        entry a pause adds meanwhile is lost to a second load."""
        if self._paused is not None:
            return self._paused
        with self._loading:
            return self._load()

    def _load(self) -> dict[str, Paused]:
        if self._paused is None:
            self._paused, self.scan_report = load_paused(self.store)
        return self._paused

    def adopt(self, sandbox_id: str) -> Paused | None:
        """Load one paused sandbox from the store into this engine's set (a shared store:
        paused by another node's engine). None: it is not in the store."""
        try:
            record = self.store.load(sandbox_id)
            entry = _entry(sandbox_id, record, self.store.usage(sandbox_id))
        except (OSError, KeyError, TypeError, ValueError, SandboxError):
            return None
        self.paused()[sandbox_id] = entry
        return entry

    def forget(self, sandbox_id: str) -> Paused | None:
        """Drop a paused sandbox from this engine's set and memory, its state left on disk
        (a shared store's sandboxes are the clustered server's to track)."""
        self._held.pop(sandbox_id, None)
        return self.paused().pop(sandbox_id, None)

    def find(self, tenant: str, sandbox_id: str) -> Paused | None:
        """The tenant's paused sandbox, or None (another tenant's is unknown: invariant 11)."""
        entry = self.paused().get(sandbox_id)
        return entry if entry is not None and entry.tenant == tenant else None

    def usage(self, tenant: str) -> int:
        """Bytes of paused state the tenant holds."""
        return sum(p.size for p in self.paused().values() if p.tenant == tenant)

    def lock(self, sandbox_id: str) -> asyncio.Lock:
        """Serialises pause, resume and delete of one sandbox."""
        return self._busy.of(sandbox_id)

    # -- verbs ------------------------------------------------------------------------

    def quota_lock(self, tenant: str | None) -> contextlib.AbstractAsyncContextManager[Any]:
        """Serialises the tenant's pauses and snapshots while its ``snapshot_mb`` quota is
        checked and filled (None: no quota, nothing to serialise): each one sees the room
        the ones before it left, so together they can't overrun it."""
        if tenant is None:
            return contextlib.nullcontext()
        return self._quota_locks.of(tenant)

    async def pause(
        self,
        session: Session,
        *,
        memory: bool,
        quota_bytes: int | None = None,
        face: Mapping[str, Any] | None = None,
    ) -> Paused:
        """Checkpoint ``session`` to disk, then kill it. Fails closed: the sandbox runs on."""
        async with self.quota_lock(None if quota_bytes is None else session.tenant):
            return await self._pause(session, memory=memory, quota_bytes=quota_bytes, face=face)

    async def _pause(
        self,
        session: Session,
        *,
        memory: bool,
        quota_bytes: int | None,
        face: Mapping[str, Any] | None,
    ) -> Paused:
        runtime = session.runtime
        if not isinstance(runtime, Checkpointable):
            raise PolicyError(f"the {session.spec.tier} tier can't pause sandboxes")
        proc = session.proc
        origin = session.origin
        if proc is None or origin is None or session.tenant is None:
            raise SandboxError("the sandbox is not ready to be paused")
        paused = await asyncio.to_thread(self.paused)  # read from disk the first time
        used = self.usage(session.tenant)
        room = None if quota_bytes is None else quota_bytes - used
        if room is not None and room <= 0:
            raise QuotaExceededError(_quota_message(quota_bytes))
        with contextlib.suppress(AttributeError):  # a process type without the slot
            setattr(proc, "checkpoint_cap", room)  # noqa: B010 - read where a driver can
        # (the microVM saves its memory for memory=False too: its files live in guest RAM)
        if room is not None and runtime.keeps_memory and (memory or session.spec.tier == "microvm"):
            # A memory checkpoint stops the sandbox before its size is known: refuse up front
            # what could not fit (its memory in use bounds it), so a refusal leaves it running.
            estimate = proc.stats().get("memory_bytes") or (session.spec.limits.memory_mb << 20)
            if estimate > room:
                raise QuotaExceededError(_quota_message(quota_bytes))
        pending = await asyncio.to_thread(self.store.begin, session.id)
        saved = False
        try:
            await runtime.checkpoint(proc, pending.checkpoint, memory=memory, leave_running=False)
            saved = True
            size = await asyncio.to_thread(disk_usage, pending.tmp)
            if room is not None and size > room:
                raise QuotaExceededError(_quota_message(quota_bytes))
            record = self._record(session, origin, memory, face)
            if session.gateway is not None:  # what its processes hold: kept on resume
                await asyncio.to_thread(session.gateway.identity().save, pending.tmp)
            await asyncio.to_thread(self.store.commit, pending, record)
        except BaseException as exc:
            await asyncio.to_thread(self.store.abort, pending)
            # (moat's own TimeoutError is an OSError too: only a host's OSError is the disk's)
            host_os = isinstance(exc, OSError) and not isinstance(exc, SandboxError)
            if host_os:
                log.warning("pause of %s failed: %s", session.id, exc)  # details: the log only
            if saved and session.spec.tier != "container":
                # The checkpoint stopped it (gVisor, microVM) and what follows failed: it
                # can't run on, so it ends, and the error says so (never "keeps running").
                await session.kill("died: its pause failed after it was stopped")
                why = "the host's disk" if host_os else type(exc).__name__
                raise SandboxDiedError(
                    f"the sandbox was stopped to be paused, then could not be kept ({why}); "
                    "it has ended"
                ) from None
            if host_os:
                if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFullError(
                        "the host has no room to keep the paused sandbox; it keeps running"
                    ) from None
                raise SandboxError("the sandbox could not be paused; it keeps running") from None
            raise
        entry = _entry(session.id, {"version": 1, **record}, size)
        _config, secrets, sensitive, gateway_config = origin
        self._held[session.id] = _Held(secrets, sensitive, gateway_config, session.guard)
        paused[session.id] = entry
        await session.kill(PAUSED)
        with self.engine._mu:
            self.engine.ended.pop(session.id, None)  # paused, not ended
        return entry

    def _record(
        self, session: Session, origin: Any, memory: bool, face: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        config: SandboxConfig = origin[0]
        gateway = session.gateway
        network = gateway.policy.to_dict() if gateway is not None else None
        return {
            "sandbox_id": session.id,
            "tenant": session.tenant,
            "tier": session.spec.tier,  # the checkpoint's tier
            "config": config.to_dict(),  # secrets by reference only (invariant 3)
            "network": network,  # the egress policy as it is now (update_network kept)
            "metadata": dict(session.metadata),
            "max_output": session.max_output,
            "started_at": session.started_at.isoformat(),
            "paused_at": dt.datetime.now(dt.UTC).isoformat(),
            "memory": memory,
            "secret_names": sorted(r.name for r in config.secrets),
            "sensitive": len(origin[2]),
            "face": dict(session.face if face is None else face),
        }

    async def resume(
        self,
        paused: Paused,
        *,
        timeout: float | None = None,
        secrets: Mapping[str, str] | None = None,
        sensitive: Mapping[str, str] | None = None,
    ) -> Session:
        """Start the paused sandbox again under its id; its paused state is deleted once it
        serves. Fails closed: a failed restore leaves the paused state as it was."""
        sid, record = paused.sandbox_id, paused.record
        engine = self.engine
        config = SandboxConfig.from_dict(record["config"])
        held = self._held.get(sid)
        if held is not None:
            brokered: Mapping[str, Secret] = held.secrets
            known = dict(held.sensitive)
            gateway_config = held.gateway_config
        else:
            missing = [n for n in record["secret_names"] if n not in (secrets or {})]
            if missing:
                raise PolicyError(
                    "resuming this sandbox after a restart needs the values of its secrets "
                    f"again: {', '.join(missing)}"
                )
            brokered = secrets_of(config, {n: (secrets or {})[n] for n in record["secret_names"]})
            if record["sensitive"] and not sensitive:
                raise PolicyError(
                    "resuming this sandbox after a restart needs its sensitive values again"
                )
            known = dict(sensitive or {})
            gateway_config = None
        tier = record["tier"]
        runtime = engine._runtime or require(tier)
        if getattr(runtime, "name", tier) != tier or not isinstance(runtime, Checkpointable):
            raise PolicyError(f"the {tier} tier can't resume sandboxes here")
        audit = await engine._audit_usable()
        if held is not None:
            guard = held.guard
            # The pause's "ended" row dropped the trail's hook on it: the resumed sandbox's
            # audit rows are scrubbed by its guard again (invariants 3 and 4).
            attach_scrubber(audit, sid, guard)
        else:
            for s in brokered.values():
                known.setdefault(s.value, "secret")
            guard = make_guard(sid, guard_policy(config.guard), known, audit)
        # The template's root and settings, as at create; its gateway's identity as it was.
        spec, gateway = await restored_spec(
            sid, tier, runtime, config, record["network"], brokered, self.store, sid,
            audit=audit, gateway_config=gateway_config, inspect=guard.check_egress,
        )  # fmt: skip
        lifetime = config.timeout if timeout is None else timeout
        metadata = dict(record["metadata"])
        max_output = int(record["max_output"])
        # Claimed by a rename: one process resumes it; a crash from here on is repaired by
        # the next start's scan (the paused state goes back, whole).
        try:
            claimed = await asyncio.to_thread(self.store.claim, sid)
        except NotFoundError:
            self.paused().pop(sid, None)  # another engine on this state dir took it
            raise
        fits_pool = fits_warm(engine, runtime, spec, config, brokered, gateway_config)
        warm = await take_warm(engine, spec) if fits_pool else None
        session = warm or Session(
            spec, runtime, guard, lifetime, metadata, engine._ended, audit=audit,
            gateway=gateway, max_output=max_output,
        )  # fmt: skip
        try:
            if warm is not None:
                await into_warm(
                    engine, warm, spec, paused.tenant, guard, gateway, metadata, max_output,
                    runtime, claimed / CHECKPOINT,
                )  # fmt: skip
            else:
                session.tenant = paused.tenant
                engine._register(session)
                await session.start(restore=claimed / CHECKPOINT)
            session.origin = (config, brokered, known, gateway_config)
            with contextlib.suppress(ValueError):
                session.started_at = dt.datetime.fromisoformat(record["started_at"])
            await reseed(session)
            await startcmd.after_restore(session, config.template, tier, bool(record["memory"]))
        except BaseException:
            await session.kill("died: failed to resume")
            with engine._mu:
                engine.ended.pop(sid, None)  # still paused: its state is untouched
            await asyncio.to_thread(self.store.unclaim, claimed, sid)
            if fits_pool:
                engine.pool.refill(tier)
            raise
        if warm is not None:
            warm.begin(lifetime, "warm pool")
        if fits_pool:
            engine.pool.refill(tier)  # once the files are in (their replay got the CPU)
        self.paused().pop(sid, None)
        self._held.pop(sid, None)
        # One rename now (microseconds: on the loop, no thread hop on the resume's path);
        # the fsync and the removal go on in the background (a crash leaves a .del- that
        # the next start's scan removes).
        gone = self.store.retire(claimed, sid)
        removal = asyncio.get_running_loop().create_task(asyncio.to_thread(self.store.remove, gone))
        self._removals.add(removal)
        removal.add_done_callback(self._removals.discard)
        session._audit_life("resumed", None)
        return session

    async def delete(self, paused: Paused) -> bool:
        """Forget a paused sandbox and delete its state (kill of a paused sandbox)."""
        self.paused().pop(paused.sandbox_id, None)
        self._held.pop(paused.sandbox_id, None)
        return await asyncio.to_thread(self.store.delete, paused.sandbox_id)


class KeyedLocks:
    """One asyncio lock per key (a sandbox id, a tenant)."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def of(self, key: str) -> asyncio.Lock:
        # Locks nobody holds or waits on are dropped here, so ids callers make up (valid
        # shape, unknown) never pile up.
        if len(self._locks) > 256:
            for k, idle in list(self._locks.items()):
                if not idle.locked() and not getattr(idle, "_waiters", None):
                    del self._locks[k]
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock


def load_paused(store: PausedStore, *, scan: bool = True) -> tuple[dict[str, Paused], list[str]]:
    """Every paused sandbox of ``store`` (id -> entry), after the start-up ``scan`` (what it
    removed is the second value). A bad record is said and left alone."""
    report = store.scan() if scan else []
    loaded: dict[str, Paused] = {}
    for sid, record in store.records():
        try:
            loaded[sid] = _entry(sid, record, store.usage(sid))
        except (KeyError, TypeError, ValueError, SandboxError) as exc:
            log.warning("paused sandbox %s: bad record (%s); left alone", sid, exc)
    return loaded, report


def fits_warm(
    engine: Engine,
    runtime: object,
    spec: SandboxSpec,
    config: SandboxConfig,
    brokered: Mapping[str, Secret],
    gateway_config: GatewayConfig | None,
) -> bool:
    """Whether a warm-pool sandbox can be the one restored as ``spec``: the tier replays
    files into a running sandbox, and the frozen shape is the pool's (``poolable``: the
    default template, no secrets, mounts, envs or other limits). :func:`take_warm` then
    checks the warm one's spec is ``spec``'s but for the id."""
    shape = {
        "template": config.template,
        "envs": config.envs,
        "mounts": config.mounts,
        "limits": config.limits,
    }
    return (
        engine._runtime is None
        and isinstance(runtime, ReplaysFiles)
        and poolable(shape, brokered, gateway_config)
    )


async def take_warm(engine: Engine, spec: SandboxSpec) -> Session | None:
    """A warm-pool sandbox whose spec is ``spec`` but for the id, or None. One of another
    shape (started on a default template the setting has changed since) is killed, never
    used: a restore gets the root it was paused with."""
    warm: Session | None = await engine.pool.take(spec.tier, refill=False)
    if warm is not None and dataclasses.replace(warm.spec, sandbox_id=spec.sandbox_id) != spec:
        await warm.kill("killed")
        return None
    return warm


async def into_warm(
    engine: Engine,
    warm: Session,
    spec: SandboxSpec,
    tenant: str,
    guard: Any,
    gateway: Gateway | None,
    metadata: dict[str, str],
    max_output: int,
    runtime: object,
    src: Path,
) -> None:
    """Make a warm sandbox (nobody's, never used) the one restored as ``spec`` from ``src``:
    its id, tenant, guard, gateway and metadata (invariant 11), then the checkpoint's files.
    The caller kills it on failure and starts its lifetime (``begin``) on success."""
    engine._rekey(warm, spec)
    warm.tenant = tenant
    await warm.assume(guard, gateway, metadata, max_output)
    if not isinstance(runtime, ReplaysFiles) or warm.proc is None:
        raise SandboxError("the warm sandbox can't take the checkpoint's files")
    await runtime.restore_into(warm.proc, src)


async def restored_spec(
    sid: str,
    tier: str,
    runtime: object,
    config: SandboxConfig,
    network: Any,
    brokered: Mapping[str, Secret],
    store: PausedStore,
    saved_id: str,
    *,
    audit: Any,
    gateway_config: GatewayConfig | None,
    inspect: Callable[[bytes], object],
) -> tuple[SandboxSpec, Gateway | None]:
    """The spec and new gateway of sandbox ``sid`` restored from the saved state
    ``saved_id`` of ``store`` (a resume, a snapshot start, a fork), as at create: the
    template's root and settings (templating.restore_args), the egress policy ``network``,
    and the gateway's placeholders and CA as they were (moat.egress.identity: its processes
    may hold them)."""
    spec_args, env = await templating.restore_args(config.template, config.envs)
    gateway: Gateway | None = None
    if getattr(runtime, "provides_network", True):
        saved = await asyncio.to_thread(_identity, store, saved_id)
        gateway = Gateway(
            sid, NetworkPolicy.parse(network), brokered, audit=audit, config=gateway_config,
            inspect=inspect, identity=saved,
        )  # fmt: skip
        env.update(proxy_env(PROXY_PORT, CA_BUNDLE_PATH))
        env.update(gateway.placeholders())
    spec = SandboxSpec(
        sandbox_id=sid, tier=tier, template=config.template, envs=tuple(sorted(env.items())),
        mounts=config.mounts, limits=config.limits, **spec_args,
    )  # fmt: skip
    return spec, gateway


def _identity(store: PausedStore, saved_id: str) -> GatewayIdentity | None:
    try:
        return GatewayIdentity.load(store.checkpoint(saved_id).parent)
    except NotFoundError:
        return None  # reported where the restore reads its checkpoint


async def reseed(session: Session) -> None:
    """Fresh host entropy into the restored agent and its kernels (moat.agent.reseed)."""
    await session.request(MsgType.RESEED, {}, payload=os.urandom(RESEED_BYTES))


def _quota_message(quota_bytes: int | None) -> str:
    mb = (quota_bytes or 0) >> 20
    return (
        f"the tenant's paused-sandbox storage quota ({mb} MiB) is used up; the sandbox keeps "
        "running"
    )


def _entry(sid: str, record: dict[str, Any], size: int) -> Paused:
    """A paused sandbox's listing entry from its record (checked: it is read from disk)."""
    config = SandboxConfig.from_dict(record["config"])
    tenant = record["tenant"]
    if not isinstance(tenant, str) or record["sandbox_id"] != sid:
        raise ValueError("record does not match its directory")
    paused_at = dt.datetime.fromisoformat(record["paused_at"])
    info = SandboxInfo(
        sandbox_id=sid,
        tier=str(record["tier"]),
        template=config.template,
        limits=config.limits if isinstance(config.limits, Limits) else Limits(),
        started_at=dt.datetime.fromisoformat(record["started_at"]),
        end_at=paused_at,
        metadata={str(k): str(v) for k, v in dict(record["metadata"]).items()},
        state="paused",
    )
    return Paused(sid, tenant, record, info, size)
