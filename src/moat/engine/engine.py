"""The engine: creates sessions on the right tier, tracks them, sweeps, cleans up at exit."""

from __future__ import annotations

import asyncio
import atexit
import logging
import secrets
import threading
from typing import Any

from moat.engine.session import Guard, Session
from moat.engine.tiers import TIERS, choose_tier, require, runtime_for
from moat.runtime.spec import SandboxSpec

log = logging.getLogger("moat.engine")


class Engine:
    """Owns every live session of this process. Embedded by default (``default_engine()``)."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self._swept: set[str] = set()
        self._mu = threading.Lock()

    def new_id(self) -> str:
        return "sbx-" + secrets.token_hex(8)

    async def create(
        self,
        spec_args: dict[str, Any],
        isolation: str | None,
        trust: str,
        timeout: float,
        metadata: dict[str, str],
        guard: Guard,
        audit: Any = None,
    ) -> Session:
        tier = choose_tier(isolation, trust)
        runtime = await asyncio.to_thread(require, tier)
        await asyncio.to_thread(self._sweep_once, tier)
        spec = SandboxSpec(sandbox_id=self.new_id(), tier=tier, **spec_args)
        session = Session(spec, runtime, guard, timeout, metadata, self._ended, audit=audit)
        with self._mu:
            self.sessions[spec.sandbox_id] = session
        try:
            await session.start()
        except BaseException:
            await session.kill("died: failed to start")
            raise
        return session

    def _sweep_once(self, tier: str) -> None:
        """First use of a tier in this process: clean what a crashed process left (inv. 5)."""
        with self._mu:
            if tier in self._swept:
                return
            self._swept.add(tier)
        try:
            n = runtime_for(tier).sweep()
            if n:
                log.warning("swept %d leftover %s sandbox resources", n, tier)
        except Exception:  # noqa: BLE001 - a failed sweep must not block new sandboxes
            log.exception("sweep of %s failed", tier)

    def _ended(self, session: Session) -> None:
        with self._mu:
            self.sessions.pop(session.id, None)

    def get(self, sandbox_id: str) -> Session | None:
        with self._mu:
            return self.sessions.get(sandbox_id)

    def doctor(self) -> dict[str, str | None]:
        """tier -> None if usable here, else the reason."""
        return {tier: runtime_for(tier).probe() for tier in TIERS}


_default: Engine | None = None
_default_mu = threading.Lock()


def default_engine() -> Engine:
    global _default
    with _default_mu:
        if _default is None:
            _default = Engine()
        return _default
