"""Pause and resume on a cluster (E2B's ``pause``/``connect``): the clustered front door's
half that deals with the shared paused store (``moat.cluster.paused``; docs/cluster.md,
"Pause and resume"). A mixin of ``ClusterFrontDoor``: the door's own state and calls it
uses are declared below for the type checker only.

Trust domain: host engine (the server's). Secret and sensitive values are held in memory
only (invariant 3); another tenant's paused id answers like an unknown one (invariant 11);
without a store every node reaches, a pause is refused and the sandbox runs on (invariant 7).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from moat.cluster.paused import ClusterPaused, Held
from moat.cluster.records import _Node, _Placed, _remove_pg, _tenant, log
from moat.engine import admission
from moat.engine.persist import Paused
from moat.engine.quota import Ledger
from moat.engine.tenants import TenantPolicies
from moat.errors import (
    InvalidArgumentError,
    IsolationUnavailableError,
    PolicyError,
    SandboxDiedError,
    SandboxError,
)
from moat.model import SandboxConfig, SandboxInfo
from moat.model import validate as v

__all__ = ["REPAIR_AFTER_S", "Pausing"]

#: Seconds after a node's loss before its unfinished paused-store work is repaired (its
#: engine's last kill takes at most moat.cluster.node.LAST_KILL_S, twice: kill and drain).
REPAIR_AFTER_S: Final = 12.0


class Pausing:
    """Pause, resume and the paused store's bookkeeping of the clustered front door."""

    paused_store: ClusterPaused | None
    placed: dict[str, _Placed]
    nodes: dict[str, _Node]
    policy: TenantPolicies
    quota: Ledger
    place_timeout: float
    _repairs: set[asyncio.Task[Any]]

    if TYPE_CHECKING:  # the door's own (moat.cluster.door.ClusterFrontDoor)

        def _route(self, tenant: str, sandbox_id: str, *, ended_ok: bool = False) -> _Node: ...
        async def _up(self, node: _Node) -> None: ...
        async def _remote(self, node: _Node, ref: Any) -> Any: ...
        def _ended(self, sandbox_id: str, *, lost: bool, node_id: str | None = None) -> None: ...
        def _tell(self, sandbox_id: str) -> None: ...
        def _keep(self, task: asyncio.Task[Any]) -> None: ...
        def tiers(self, *, paused: bool = False) -> set[str]: ...
        def _reserve(self, tenant: str, cfg: SandboxConfig) -> int: ...
        async def _place(self, tier: str, memory_mb: int, *, paused: bool) -> tuple[Any, _Node]: ...
        async def _placed_call(self, node: _Node, ref: Any) -> Any: ...
        def _track(self, sandbox_id: str, placed: _Placed) -> None: ...
        async def info(self, tenant: str, sandbox_id: str) -> SandboxInfo: ...
        async def set_timeout(self, tenant: str, sandbox_id: str, seconds: float) -> None: ...

    def _repair_after(self, node: _Node) -> None:
        """A lost node's unfinished work in the paused store is repaired once its engine
        has surely ended (its last kill: moat.cluster.node), so a resume it was running
        leaves the sandbox paused, not claimed for ever."""
        store = self.paused_store
        pid, host = node.info.get("pid"), node.info.get("host_token")
        if store is None or not isinstance(pid, int) or not isinstance(host, str):
            return

        async def later() -> None:
            await asyncio.sleep(REPAIR_AFTER_S)
            removed = await asyncio.to_thread(store.repair, pid, host)
            if removed:
                log.warning("repaired a lost node's paused-store work: %s", ", ".join(removed))

        try:
            task = asyncio.get_running_loop().create_task(later())
            self._repairs.add(task)
            task.add_done_callback(self._repairs.discard)
        except RuntimeError:  # no loop (closing): the next server's first scan repairs it
            pass

    def _to_paused(self, sandbox_id: str, entry: Paused, node_id: str) -> None:
        """A sandbox paused into the shared store: its bundle and quota are released and the
        server tracks it as paused, on no node (its state outlives the node)."""
        placed = self.placed.get(sandbox_id)
        if placed is None or placed.node_id != node_id:
            return
        store = self.paused_store
        if store is None:  # a node paused into a store this server doesn't know: ended here
            log.error("sandbox %s paused into a store this server has not", sandbox_id)
            self._ended(sandbox_id, lost=False, node_id=node_id)
            return
        del self.placed[sandbox_id]
        store.add(entry, placed.held)  # before the faces hear of it (is_paused_now)
        _remove_pg(placed.pg)
        self.quota.release_sandbox(sandbox_id)
        self._tell(sandbox_id)

    async def pause(
        self, tenant: str, sandbox_id: str, memory: bool = False, *, face: Any = None
    ) -> SandboxInfo:
        """Pause on the sandbox's node into the shared store; the server then tracks it as
        paused, on no node. Without a shared store, or on a node that can't reach it:
        PolicyError, and it keeps running (invariant 7)."""
        if not isinstance(memory, bool):
            raise InvalidArgumentError("memory must be a bool")
        _tenant(tenant)
        store = self.paused_store
        sid = v.sandbox_id(sandbox_id)
        if store is None:
            self._route(tenant, sandbox_id)
            raise PolicyError(
                "pausing a sandbox on a cluster needs a paused-sandbox store that every node "
                "reaches (moat serve --paused-dir); none is set"
            )
        async with store.locks.of(sid or "-"):
            if sid is not None and await self._find_paused(tenant, sid) is not None:
                raise SandboxError("the sandbox is already paused")
            node = self._route(tenant, sandbox_id)
            await self._up(node)
            if node.info.get("paused_store") != store.store_id:
                raise PolicyError(
                    "the sandbox's cluster node can't reach the paused-sandbox store; it "
                    "keeps running"
                )
            placed = self.placed.get(sid or "")  # None: ended (the node says how)
            kept = placed.held.face if placed is not None else {}
            quota = self.policy.of(tenant).quotas.snapshot_mb
            room = None
            if quota is not None:  # the tenant's paused state across the cluster
                room = max((quota << 20) - await asyncio.to_thread(store.usage, tenant), 0)
            entry: Paused = await self._remote(
                node,
                node.handle.pause.remote(
                    tenant, sid, memory, kept if face is None else dict(face), room
                ),
            )
            self._to_paused(entry.sandbox_id, entry, node.node_id)
        return entry.info

    async def resume(self, tenant: str, sandbox_id: str, **kw: Any) -> SandboxInfo:
        info, _ = await self.connect(tenant, sandbox_id, **kw)
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
        """The sandbox, resumed if it was paused (placed again, on any node that offers its
        tier and reaches the paused store): (info, whether it was resumed). ``timeout``: a
        running one's lifetime is only extended, as on one host. Secret and sensitive values
        the server held since its create are given again; after a restart of the server the
        caller gives them.

        Cancelled, a resume runs on in the background and its sandbox is tracked as running
        (never killed: that would lose the paused state)."""
        _tenant(tenant)
        if timeout is not None:
            timeout = v.number("timeout", timeout, 1, v.MAX_TIMEOUT)
        sid = v.sandbox_id(sandbox_id)
        store = self.paused_store
        if store is not None and sid is not None:
            async with store.locks.of(sid):
                paused = await self._find_paused(tenant, sid)
                if paused is not None:
                    task = asyncio.ensure_future(
                        self._resume(tenant, paused, timeout, secrets, sensitive)
                    )
                    self._keep(task)
                    return await asyncio.shield(task), True
        info = await self.info(tenant, sandbox_id)
        if timeout is not None:
            now = _dt.datetime.now(_dt.UTC)
            if info.end_at < now + _dt.timedelta(seconds=timeout):
                await self.set_timeout(tenant, sandbox_id, timeout)
                info = await self.info(tenant, sandbox_id)
        return info, False

    async def _resume(
        self, tenant: str, paused: Paused, timeout: float | None,
        secrets: Mapping[str, str] | None, sensitive: Mapping[str, str] | list[str] | None,
    ) -> SandboxInfo:  # fmt: skip
        store = self.paused_store
        if store is None:
            raise SandboxError("no paused-sandbox store")
        sid = paused.sandbox_id
        config = SandboxConfig.from_dict(paused.record["config"])
        tier = str(paused.record["tier"])
        admission.check_config(self.policy.of(tenant), config)  # the tenant's policy now
        if tier not in self.tiers(paused=True):
            raise IsolationUnavailableError(
                f"isolation tier {tier!r} is not offered by any node of the cluster that "
                "reaches the paused-sandbox store"
            )
        was = store.held.get(sid) or Held()
        held = Held(
            dict(was.secrets if secrets is None else secrets),
            was.sensitive if sensitive is None else sensitive,
            dict(was.face),
        )
        token = self._reserve(tenant, config)
        # A node lost under the resume (the GCS still offers a dying node for ~3 s) did
        # nothing to the paused state: place it again, within the placing time.
        deadline = time.monotonic() + self.place_timeout
        while True:
            pg = node = None
            try:
                pg, node = await self._place(tier, config.limits.memory_mb, paused=True)
                if node.info.get("paused_store") != store.store_id:
                    raise PolicyError(
                        "the cluster node chosen to resume the sandbox can't reach the "
                        "paused-sandbox store"
                    )
                info: SandboxInfo = await self._placed_call(
                    node,
                    node.handle.resume.remote(
                        tenant, sid, timeout, held.secrets or None, held.sensitive
                    ),
                )
                break
            except SandboxDiedError:
                if pg is not None:
                    _remove_pg(pg)
                gone = node is None or node.node_id not in self.nodes
                if not gone or time.monotonic() > deadline:
                    self.quota.release(token)
                    raise
                log.warning("resume of %s: its node was lost; placing it again", sid)
                await asyncio.sleep(0.5)
            except BaseException:
                self.quota.release(token)
                if pg is not None:
                    _remove_pg(pg)
                raise
        store.take(sid)
        self._track(sid, _Placed(tenant, node.node_id, pg, token, held))
        return info

    async def _find_paused(self, tenant: str, sandbox_id: str) -> Paused | None:
        """The tenant's paused sandbox (invariant 11: another tenant's is unknown)."""
        store = self.paused_store
        sid = v.sandbox_id(sandbox_id)
        if store is None or sid is None:
            return None
        if store.is_loaded:
            return store.find(tenant, sid)
        return await asyncio.to_thread(store.find, tenant, sid)  # loads from disk once

    def paused_report(self) -> list[str]:
        """Half-written paused states the first load of the store removed."""
        if self.paused_store is None:
            return []
        self.paused_store.loaded()
        return list(self.paused_store.report)

    # What faces keep beside a sandbox for persistence: the face's names travel with a
    # paused sandbox (in the server's memory while it runs; with the record when it pauses).

    def set_face(self, tenant: str, sandbox_id: str, face: Any) -> None:
        self._route(tenant, sandbox_id)
        placed = self.placed.get(sandbox_id)
        if placed is not None:
            placed.held.face = dict(face)

    def is_paused_now(self, tenant: str, sandbox_id: str) -> bool:
        return self.paused_store is not None and self.paused_store.known(tenant, sandbox_id)

    async def face_data(self, tenant: str, sandbox_id: str) -> dict[str, Any] | None:
        paused = await self._find_paused(tenant, sandbox_id)
        return None if paused is None else dict(paused.record.get("face") or {})

    def keeps_memory(self, tenant: str, sandbox_id: str) -> bool:
        """A pause left to choose keeps the files (docs/cluster.md)."""
        return False
