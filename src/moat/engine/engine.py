"""The engine: creates sessions on the right tier, tracks them, sweeps, cleans up at exit."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any

from moat.egress import Gateway, GatewayConfig, Secret, proxy_env
from moat.engine.guardhook import make_guard
from moat.engine.output import DEFAULT_MAX_OUTPUT
from moat.engine.pool import WarmPool, pool_sizes, poolable
from moat.engine.session import CA_BUNDLE_PATH, PROXY_PORT, Session
from moat.engine.tiers import TIERS, choose_tier, require, runtime_for
from moat.guard import GuardPolicy
from moat.runtime.spec import SandboxSpec
from moat.store import AuditLog, shared_audit_log

log = logging.getLogger("moat.engine")

#: Seconds between two sweeps of one tier by one engine.
SWEEP_INTERVAL = 60.0


class Engine:
    """Owns every live session of this process. Embedded by default (``default_engine()``)."""

    def __init__(self, pool: dict[str, int] | None = None) -> None:
        """``pool``: warm sandboxes per tier (default: ``MOAT_WARM_POOL``, see pool.py)."""
        self.sessions: dict[str, Session] = {}
        self._swept: dict[str, float] = {}  # tier -> when the next sweep is due
        self._mu = threading.Lock()
        self._audit: AuditLog | None = None
        self.pool = WarmPool(pool_sizes() if pool is None else pool, self._start_pooled)

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
        spec_args: dict[str, Any],
        isolation: str | None,
        trust: str,
        timeout: float,
        metadata: dict[str, str],
        guard: GuardPolicy | None = None,
        sensitive: Mapping[str, str] | None = None,
        network: Any = None,
        secrets: Mapping[str, Secret] | None = None,
        gateway_config: GatewayConfig | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> Session:
        """Start a sandbox on the tier ``isolation`` / ``trust`` selects.

        Every sandbox gets an egress gateway (deny-all unless ``network`` opens hosts) and a
        guard over everything it returns, which knows its secrets and ``sensitive`` values
        (value -> label).
        """
        tier = choose_tier(isolation, trust)
        runtime = require(tier)  # probes are cached after the first: cheap
        audit = await self._audit_usable()
        if self._sweep_due(tier):
            await asyncio.to_thread(self._sweep, tier)
        warm = poolable(spec_args, secrets, gateway_config)
        if warm:
            pooled: Session | None = self.pool.take(tier)
            if pooled is not None:
                session = pooled
                the_guard = make_guard(
                    session.id, guard or GuardPolicy(), dict(sensitive or {}), audit
                )
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
        gateway = Gateway(
            sandbox_id,
            network,
            secrets,
            audit=audit,
            config=gateway_config,
            inspect=the_guard.check_egress,  # canaries and sensitive values leaving by network
        )
        env = dict(spec_args.pop("envs", ()))
        env.update(proxy_env(PROXY_PORT, CA_BUNDLE_PATH))  # moat's own names win
        env.update(gateway.placeholders())
        spec = SandboxSpec(
            sandbox_id=sandbox_id, tier=tier, envs=tuple(sorted(env.items())), **spec_args
        )
        session = Session(
            spec, runtime, the_guard, timeout, metadata, self._ended, audit=audit,
            gateway=gateway, max_output=max_output,
        )  # fmt: skip
        with self._mu:
            self.sessions[spec.sandbox_id] = session
        try:
            await session.start()
        except BaseException:
            await session.kill("died: failed to start")
            raise
        if warm:
            self.pool.refill(tier)
        return session

    async def _start_pooled(self, tier: str) -> Session:
        """A sandbox of the default shape for the warm pool: deny-all, no lifetime yet."""
        sandbox_id = self.new_id()
        audit = self.audit
        gateway = Gateway(sandbox_id, None, None, audit=audit)
        spec = SandboxSpec(
            sandbox_id=sandbox_id,
            tier=tier,
            envs=tuple(sorted(proxy_env(PROXY_PORT, CA_BUNDLE_PATH).items())),
        )
        placeholder_guard = make_guard(sandbox_id, GuardPolicy(), {}, audit)  # replaced on adopt
        session = Session(
            spec, runtime_for(tier), placeholder_guard, 300.0, {}, self._ended, audit=audit,
            gateway=gateway,
        )  # fmt: skip
        with self._mu:
            self.sessions[sandbox_id] = session
        try:
            await session.start(pooled=True)
        except BaseException:
            await session.kill("died: failed to start")
            raise
        return session

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

    def _ended(self, session: Session) -> None:
        with self._mu:
            self.sessions.pop(session.id, None)

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
