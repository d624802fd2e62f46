"""Per-tenant quota bookkeeping: what each tenant's running sandboxes hold, and its creates.

Trust domain: host engine. One ledger per engine (every front door over it shares it), so a
tenant's usage is its real usage whichever face created its sandboxes (invariant 11: quotas
keep one tenant from starving the others).

A create *reserves* before it starts anything: the check and the reservation happen under
one lock with no await between them, so two creates racing for the last slot can't both
pass. The reservation is bound to the sandbox's id once it exists and released when that
sandbox ends for any reason (the engine's end callback: kill, timeout, death), or at once
when the start fails or is cancelled.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from moat.engine.tenants import Quotas
from moat.errors import PolicyError, QuotaExceededError

__all__ = ["WINDOW_S", "Ledger"]

#: The window of ``creates_per_minute``, in seconds (sliding).
WINDOW_S = 60.0


@dataclass
class _Tenant:
    held: dict[int, tuple[float, int]] = field(default_factory=dict)  # token -> (cpus, MiB)
    creates: collections.deque[float] = field(default_factory=collections.deque)


class Ledger:
    """Reservations per tenant. Thread-safe (an engine may serve several loops)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._mu = threading.Lock()
        self._tenants: dict[str, _Tenant] = {}
        self._tokens: dict[int, str] = {}  # token -> tenant
        self._sandboxes: dict[str, int] = {}  # sandbox id -> token
        self._next = itertools.count(1)

    def reserve(self, tenant: str, quotas: Quotas, cpus: float, memory_mb: int) -> int:
        """Check ``quotas`` and hold room for one sandbox; a token to bind or release.

        QuotaExceededError when the tenant is at a quota (``retry_after`` set for the
        creates window; None for the rest, which only an end of a sandbox frees);
        PolicyError when one sandbox asks more than the tenant's whole quota (retrying can't
        help)."""
        _never(quotas, cpus, memory_mb)
        with self._mu:
            now = self._clock()
            t = self._tenants.setdefault(tenant, _Tenant())
            while t.creates and t.creates[0] <= now - WINDOW_S:
                t.creates.popleft()
            per_min = quotas.creates_per_minute
            if per_min is not None and len(t.creates) >= per_min:
                wait = t.creates[-per_min] + WINDOW_S - now
                raise QuotaExceededError(
                    f"this tenant's quota of {per_min} creates per minute is reached",
                    retry_after=max(wait, 0.001),
                )
            if quotas.sandboxes is not None and len(t.held) >= quotas.sandboxes:
                raise QuotaExceededError(
                    f"this tenant's quota of {quotas.sandboxes} running sandboxes is reached"
                )
            used_mem = sum(m for _, m in t.held.values())
            if quotas.memory_mb is not None and used_mem + memory_mb > quotas.memory_mb:
                raise QuotaExceededError(
                    f"this tenant's memory quota ({quotas.memory_mb} MiB) would be exceeded "
                    f"({used_mem} MiB in use, {memory_mb} MiB asked)"
                )
            used_cpu = sum(c for c, _ in t.held.values())
            if quotas.cpus is not None and used_cpu + cpus > quotas.cpus + 1e-9:
                raise QuotaExceededError(
                    f"this tenant's CPU quota ({quotas.cpus:g}) would be exceeded "
                    f"({used_cpu:g} in use, {cpus:g} asked)"
                )
            token = next(self._next)
            t.held[token] = (cpus, memory_mb)
            t.creates.append(now)
            self._tokens[token] = tenant
            return token

    def bind(self, token: int, sandbox_id: str) -> None:
        """The reservation now belongs to ``sandbox_id`` (released when it ends)."""
        with self._mu:
            if token in self._tokens:
                self._sandboxes[sandbox_id] = token

    def release(self, token: int) -> None:
        """Give the room back (idempotent)."""
        with self._mu:
            self._drop(token)

    def release_sandbox(self, sandbox_id: str) -> None:
        """The sandbox ended: its room is free (idempotent; unknown ids are ignored)."""
        with self._mu:
            token = self._sandboxes.pop(sandbox_id, None)
            if token is not None:
                self._drop(token)

    def usage(self, tenant: str) -> tuple[int, float, int]:
        """(sandboxes, cpus, MiB) the tenant holds now."""
        with self._mu:
            t = self._tenants.get(tenant)
            if t is None:
                return 0, 0.0, 0
            held = list(t.held.values())
        return len(held), sum(c for c, _ in held), sum(m for _, m in held)

    def _drop(self, token: int) -> None:
        tenant = self._tokens.pop(token, None)
        if tenant is None:
            return
        t = self._tenants.get(tenant)
        if t is not None:
            t.held.pop(token, None)
            if not t.held and not t.creates:
                del self._tenants[tenant]  # bounded by the tenants that hold something


def _never(quotas: Quotas, cpus: float, memory_mb: int) -> None:
    """Requests no wait can satisfy are refused as policy, not as a passing quota."""
    if quotas.sandboxes == 0 or quotas.creates_per_minute == 0:
        raise PolicyError("this tenant may not create sandboxes (its quota is 0)")
    if quotas.memory_mb is not None and memory_mb > quotas.memory_mb:
        raise PolicyError(
            f"one sandbox asks {memory_mb} MiB, more than this tenant's whole memory quota "
            f"({quotas.memory_mb} MiB)"
        )
    if quotas.cpus is not None and cpus > quotas.cpus + 1e-9:
        raise PolicyError(
            f"one sandbox asks {cpus:g} CPUs, more than this tenant's whole CPU quota "
            f"({quotas.cpus:g})"
        )
