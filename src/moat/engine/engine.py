"""The engine: creates sessions on the right tier, tracks them, sweeps, cleans up at exit."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from moat.egress import Gateway, GatewayConfig, Secret, proxy_env
from moat.engine import startcmd, templating
from moat.engine.guardhook import make_guard
from moat.engine.persist import Persistence
from moat.engine.pool import WarmPool, parse_pool, plain, poolable, pooled_spec
from moat.engine.quota import Ledger
from moat.engine.resolve import guard_policy, network_policy
from moat.engine.session import Session
from moat.engine.snapshots import Snapshots
from moat.engine.tiers import TIERS, require, runtime_for
from moat.errors import PolicyError, SandboxError
from moat.guard import GuardPolicy
from moat.model import CA_BUNDLE_PATH, PROXY_PORT, SandboxConfig, SandboxInfo
from moat.runtime.base import Runtime
from moat.runtime.spec import SandboxSpec
from moat.store import AuditLog, shared_audit_log

log = logging.getLogger("moat.engine")

#: The tenant of the embedded SDK (a process that embeds the engine is one tenant).
DEFAULT_TENANT = "default"
#: How many ended sandboxes an engine remembers (to answer calls on them with why they ended).
MAX_ENDED = 4096
#: Seconds between two sweeps of one tier by one engine.
SWEEP_INTERVAL = 60.0


#: Every engine's loop watcher: at a loop's shutdown each one waits for the loop's other tasks,
#: never for another engine's watcher, which is waiting too (two engines on one loop waited
#: out each other's 10 s deadline).
_LOOP_WATCHERS: weakref.WeakSet[asyncio.Task[None]] = weakref.WeakSet()


class Engine:
    """Owns every live session of this process. Embedded by default (``default_engine()``)."""

    def __init__(self, pool: dict[str, int] | None = None, runtime: Runtime | None = None) -> None:
        """``pool``: warm sandboxes per tier (default: ``MOAT_WARM_POOL``, see pool.py).

        ``runtime`` replaces every tier's driver (tests: ``moat.testing.fake_front_door``);
        such an engine has no warm pool, and its sandboxes report the runtime's name as
        their tier. No trust level or ``isolation=`` can choose it.
        """
        self._runtime = runtime
        if runtime is not None:
            pool = {}
        self.sessions: dict[str, Session] = {}
        #: sandboxes that ended lately: id -> (tenant, why, last info), newest last, bounded
        self.ended: collections.OrderedDict[str, tuple[str, str, SandboxInfo]] = (
            collections.OrderedDict()
        )
        self._swept: dict[str, float] = {}  # tier -> when the next sweep is due
        self._mu = threading.Lock()
        self._audit: AuditLog | None = None
        self.pool = WarmPool(parse_pool() if pool is None else pool, self._start_pooled)
        #: sandbox id -> id of the event loop it lives on (a session belongs to one loop)
        self._loop_of: dict[str, int] = {}
        #: event loop id -> the task that ends that loop's sandboxes when the loop shuts down
        self._watchers: dict[int, asyncio.Task[None]] = {}
        self._ending: set[int] = set()  # loops whose sandboxes are being ended
        #: called with a sandbox's id once it has ended, however it ended (``on_ended``)
        self._end_listeners: list[Callable[[str], None]] = []
        #: per-tenant quota reservations of this engine's sandboxes (every front door's)
        self.quota = Ledger()
        #: paused sandboxes (on disk under the state dir) and the pause/resume verbs
        self.persist = Persistence(self)
        #: snapshots (on disk under the state dir), start from one, fork
        self.snapshots = Snapshots(self)

    def new_id(self) -> str:
        return "sbx-" + secrets.token_hex(8)

    @property
    def audit(self) -> AuditLog:
        """The audit trail (SQLite, WAL) under moat's state directory (reopened when closed;
        in a forked child that fails closed: moat.store.audit)."""
        with self._mu:
            if self._audit is None or self._audit.closed:
                self._audit = shared_audit_log()
            return self._audit

    async def _audit_usable(self) -> AuditLog:
        """The audit trail, or :class:`~moat.errors.AuditUnavailableError`: a sandbox never
        runs unaudited (invariant 7). Waits off the loop only on the store's first use."""
        audit = self._audit
        if audit is None or audit.closed or not audit.checked:
            audit = await asyncio.to_thread(self._checked_audit)  # opening it is file I/O
        audit.check()  # answers at once now
        return audit

    def _checked_audit(self) -> AuditLog:
        audit = self.audit
        audit.check()
        return audit

    async def create(
        self,
        config: SandboxConfig,
        *,
        tenant: str = DEFAULT_TENANT,
        secrets: Mapping[str, Secret] | None = None,
        sensitive: Mapping[str, str] | None = None,
        gateway_config: GatewayConfig | None = None,
    ) -> Session:
        """Start a sandbox for ``tenant`` as ``config`` (from ``moat.engine.resolve``) says.

        Every sandbox gets an egress gateway (deny-all unless the config's network opens
        hosts) and a guard over everything it returns, which knows its ``secrets`` (the
        config's references joined with their values) and ``sensitive`` values (value ->
        label). Callers reach this through the front door (``moat.engine.api``).
        """
        tier = config.tier if self._runtime is None else self._runtime.name
        timeout = config.timeout
        metadata = dict(config.metadata)
        guard = guard_policy(config.guard)
        network = network_policy(config.network)
        max_output = config.max_output_bytes
        spec_args: dict[str, Any] = {
            "template": config.template,
            "envs": config.envs,
            "mounts": config.mounts,
            "limits": config.limits,
        }
        shape = dict(spec_args)  # as asked, before the template fills it in (pool.poolable)
        runtime = self._runtime or require(tier)  # probes are cached after the first: cheap
        audit = await self._audit_usable()
        # the template's root (issue 12): found and checked off the loop (reads its files once)
        found = await asyncio.to_thread(templating.lookup, config.template)
        if found is not None:
            spec_args.update(templating.spec_args(found, config.envs))
        if self._runtime is None and self._sweep_due(tier):
            await asyncio.to_thread(self._sweep, tier)
        warm = plain(found) and poolable(shape, secrets, gateway_config)
        if warm:
            pooled: Session | None = await self.pool.take(tier)
            if pooled is not None and pooled.pool_template != (found.id if found else None):
                # started on another default (the setting changed since): never another root
                await pooled.kill("killed")
                pooled = None
            if pooled is not None:
                session = pooled
                the_guard = make_guard(
                    session.id, guard or GuardPolicy(), dict(sensitive or {}), audit
                )
                session.tenant = tenant  # adopted by this tenant alone (invariant 11)
                session.origin = (config, dict(secrets or {}), dict(sensitive or {}), None)
                try:
                    await session.adopt(
                        the_guard, the_guard.check_egress, network, timeout, metadata, max_output
                    )
                except BaseException:
                    await session.kill("died: failed to start")
                    raise
                return session
        sandbox_id = self.new_id()
        known = dict(sensitive or {})
        known.update({s.value: name for name, s in (secrets or {}).items()})
        the_guard = make_guard(sandbox_id, guard or GuardPolicy(), known, audit)
        env = dict(spec_args.pop("envs"))
        gateway: Gateway | None = None
        if getattr(runtime, "provides_network", True):
            gateway = Gateway(
                sandbox_id,
                network,
                secrets,
                audit=audit,
                config=gateway_config,
                inspect=the_guard.check_egress,  # canaries, sensitive values leaving by network
            )
            env.update(proxy_env(PROXY_PORT, CA_BUNDLE_PATH))  # moat's own names win
            env.update(gateway.placeholders())
        elif secrets:
            raise PolicyError("this runtime has no network, so it can't broker secrets")
        spec = SandboxSpec(
            sandbox_id=sandbox_id, tier=tier, envs=tuple(sorted(env.items())), **spec_args
        )
        session = Session(
            spec, runtime, the_guard, timeout, metadata, self._ended, audit=audit,
            gateway=gateway, max_output=max_output,
        )  # fmt: skip
        session.tenant = tenant
        session.origin = (config, dict(secrets or {}), dict(sensitive or {}), gateway_config)
        self._register(session)
        try:
            await session.start()
            if found is not None and (found.start_cmd or found.ready_cmd):
                await startcmd.run(session, found.start_cmd, found.ready_cmd)
        except BaseException:
            await session.kill("died: failed to start")
            raise
        if warm:
            self.pool.refill(tier)
        return session

    async def _start_pooled(self, tier: str) -> Session:
        """A sandbox of the default shape for the warm pool: deny-all, no lifetime yet."""
        # the default template as a create naming none gets it (checked again at hand-out)
        found = await asyncio.to_thread(templating.lookup, "default")
        if not plain(found):
            raise PolicyError("the default template has a start command: it is not pooled")
        sandbox_id = self.new_id()
        audit = self.audit
        gateway = Gateway(sandbox_id, None, None, audit=audit)
        spec = pooled_spec(sandbox_id, tier, found)
        placeholder_guard = make_guard(sandbox_id, GuardPolicy(), {}, audit)  # replaced on adopt
        session = Session(
            spec, runtime_for(tier), placeholder_guard, 300.0, {}, self._ended, audit=audit,
            gateway=gateway,
        )  # fmt: skip
        session.pool_template = found.id if found else None
        self._register(session)
        try:
            await session.start(pooled=True)
        except BaseException:
            await session.kill("died: failed to start")
            raise
        return session

    def _rekey(self, session: Session, spec: SandboxSpec) -> None:
        """Give a warm sandbox (taken from the pool, nobody's yet) the id of ``spec``, which
        differs from its own in nothing else (a resume into it: ``moat.engine.persist``).

        Its own id goes from this engine's registry and from the audit trail's scrubbers; it
        wrote no audit row, and the caller replaces the gateway and guard that carry it.
        """
        old = session.id
        if session.tenant is not None or dataclasses.replace(spec, sandbox_id=old) != session.spec:
            raise SandboxError("that sandbox can't take another identity")  # a bug, not input
        with self._mu:
            if spec.sandbox_id in self.sessions:
                raise SandboxError(f"sandbox {spec.sandbox_id} is running already")
            self.sessions.pop(old, None)
            loop = self._loop_of.pop(old, None)
            session.spec = spec
            session.id = spec.sandbox_id
            self.sessions[session.id] = session
            if loop is not None:
                self._loop_of[session.id] = loop
        set_scrubber = getattr(session.audit, "set_scrubber", None)
        if set_scrubber is not None:
            set_scrubber(old, None)

    def _register(self, session: Session) -> None:
        """Track a new session as this loop's, and make sure this loop's end ends it."""
        loop = asyncio.get_running_loop()
        with self._mu:
            self.sessions[session.id] = session
            self._loop_of[session.id] = id(loop)
            watcher = self._watchers.get(id(loop))
            if watcher is None or watcher.done() or watcher.get_loop() is not loop:
                self._ending.discard(id(loop))  # a loop that was ended is in use again
                watcher = loop.create_task(self._watch_loop(), name="moat-loop-watch")
                # Only a shutdown that cancels tasks (asyncio.run, the SDK's loop thread) ends
                # it; a loop closed with tasks pending must not report this one as lost.
                watcher._log_destroy_pending = False  # type: ignore[attr-defined]
                self._watchers[id(loop)] = watcher
                _LOOP_WATCHERS.add(watcher)

    async def _watch_loop(self) -> None:
        """Wait for the loop's shutdown, then end every sandbox that lives on it.

        ``asyncio.run`` cancels every task when the program's main coroutine returns; this
        one answers by killing the loop's warm pool and sessions (invariant 5: a program that
        ends leaves nothing) and waiting for the work that starts. ``kill_everything`` (the
        SDK's loop thread, the server) does the same itself and tells this one to stand by.
        """
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if id(asyncio.get_running_loop()) not in self._ending:
                await self.end_loop(wait_tasks=True)
            raise

    async def end_loop(self, wait_tasks: bool = False) -> None:
        """Kill this loop's warm pool and sessions; with ``wait_tasks``, then wait (10 s at
        most) until every other task of the loop is done, as a loop's shutdown does."""
        loop = asyncio.get_running_loop()
        self._ending.add(id(loop))
        try:
            await self.pool.close()
            with self._mu:
                mine = [s for i, s in self.sessions.items() if self._loop_of.get(i) == id(loop)]
            await asyncio.gather(*(s.kill("killed") for s in mine), return_exceptions=True)
            # Kills spawn work of their own (an agent's reader noticing the end, a gateway's
            # connections closing): let it finish, so that no task of ours is left pending.
            me, deadline = asyncio.current_task(), loop.time() + 10.0
            while wait_tasks and loop.time() < deadline:
                rest = [
                    t
                    for t in asyncio.all_tasks()
                    if t is not me and not t.done() and t not in _LOOP_WATCHERS
                ]
                if not rest:
                    break
                await asyncio.wait(rest, timeout=deadline - loop.time())
        finally:
            if wait_tasks:
                self._ending.discard(id(loop))

    def _sweep_due(self, tier: str) -> bool:
        with self._mu:
            return time.monotonic() >= self._swept.get(tier, 0.0)

    def _sweep(self, tier: str) -> None:
        """Clean what a crashed engine left (invariant 5): at first use of a tier, then at
        most once a minute (another engine on this host may crash while we run)."""
        with self._mu:
            if time.monotonic() < self._swept.get(tier, 0.0):
                return
            self._swept[tier] = time.monotonic() + SWEEP_INTERVAL
        try:
            n = runtime_for(tier).sweep()
            if n:
                log.warning("swept %d leftover %s sandbox resources", n, tier)
        except Exception:
            log.exception("sweep of %s failed", tier)  # must not block new sandboxes

    def on_ended(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(sandbox_id)`` whenever a sandbox of this engine ends (kill,
        timeout, death); it runs on the sandbox's loop and must not block. Returns the
        function that unsubscribes it."""
        with self._mu:
            self._end_listeners.append(listener)

        def unsubscribe() -> None:
            with self._mu, contextlib.suppress(ValueError):
                self._end_listeners.remove(listener)

        return unsubscribe

    def _ended(self, session: Session) -> None:
        with self._mu:
            self.sessions.pop(session.id, None)
            self._loop_of.pop(session.id, None)
            if session.tenant is not None:
                info = session.info()
                info.state = "ended"
                self.ended[session.id] = (session.tenant, session.ended or "killed", info)
                while len(self.ended) > MAX_ENDED:
                    self.ended.popitem(last=False)
            listeners = list(self._end_listeners)
        for listener in listeners:
            try:
                listener(session.id)
            except Exception:  # one face's bookkeeping must not stop a kill
                log.exception("end listener failed for %s", session.id)
        self.quota.release_sandbox(session.id)  # any end: kill, timeout, death, failed start

    def get(self, sandbox_id: str) -> Session | None:
        with self._mu:
            return self.sessions.get(sandbox_id)

    def doctor(self) -> dict[str, str | None]:
        """tier -> None if usable here, else the reason."""
        return {tier: runtime_for(tier).probe() for tier in TIERS}


_default_mu = threading.Lock()

_default: Engine | None = None


def default_engine() -> Engine:
    global _default
    with _default_mu:
        if _default is None:
            _default = Engine()
        return _default
