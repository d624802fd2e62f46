"""The clustered server's front door: the ``FrontDoor`` API, placed and routed over Ray.

Trust domain: host engine (the server's). Every face call keeps its shape; what changes is
where it runs:

* **create**: tenancy and quotas are checked here, across nodes (invariant 11); the tier
  must be advertised by a live node (else IsolationUnavailableError: invariant 7, never a
  downgrade); one placement-group bundle (``resources.bundle_for``) is reserved, waited for
  a bounded time (else CapacityError: 503 over the wire), and the sandbox is created by
  the node actor owning the bundle. No Ray worker per sandbox: the node's actor hosts all.
* **every other call** goes to the node recorded for the sandbox; another tenant's id
  answers like an unknown one (invariant 11).
* **streams** (code, commands, terminals) are pulled from the node in bounded batches
  (``moat.cluster.node``); only guarded events cross (invariant 4).
* **node loss** (the GCS declares the node dead, or a call finds its actor dead): each of
  its sandboxes becomes lost: its bundle is released, its quota freed, the faces told it
  ended, and the next call raises SandboxLostError ("was not found": 502 over the wire).
  It is never re-created elsewhere.

* **pause and resume** (with a shared paused store: ``--paused-dir``,
  ``moat.cluster.paused``): a pause runs on the sandbox's node, into the store; the sandbox's
  bundle and quota are released and the server tracks it as paused (no node). A resume
  places it again, on any node that advertises its tier and reaches the store, under the
  same id. Without a store a pause is refused (PolicyError).
* **a cancelled create** (a dropped request, an MCP cancel) runs on to its end in the
  background, and the sandbox it made, if any, is killed on arrival: nothing is left that
  nobody tracks (invariant 5). A cancelled resume runs on too, and the sandbox is tracked
  as running (killing it would lose the user's paused state).

Ingress (``open_port``) runs on the sandbox's node, its bytes in bounded pieces through the
node's actor (``moat.cluster.ports``), its audit rows in the node's trail. Directory watches
are kept on the node (its guard names the files); the server takes or pulls their events.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import IO, Any, Final

from moat.cluster import raycfg
from moat.cluster.node import NodeActor, unpack_error
from moat.cluster.paused import ClusterPaused, Held, configured_dir
from moat.cluster.pausing import Pausing
from moat.cluster.ports import RemoteReader, RemoteWriter
from moat.cluster.records import _Node, _Placed, _remove_pg, _tenant
from moat.cluster.resources import NODE, PAUSED, bundle_for, tiers_of
from moat.engine import admission
from moat.engine.api import CAPABILITIES
from moat.engine.quota import Ledger
from moat.engine.resolve import resolve, validate_config
from moat.engine.session import file_chunks
from moat.engine.tenants import TenantPolicies
from moat.errors import (
    CapacityError,
    InvalidArgumentError,
    IsolationUnavailableError,
    NotFoundError,
    PolicyError,
    QuotaExceededError,
    SandboxDiedError,
    SandboxError,
    SandboxLostError,
)
from moat.model import Event, SandboxConfig, SandboxInfo
from moat.model import validate as v

log = logging.getLogger("moat.cluster")

__all__ = ["ClusterFrontDoor", "cluster_capabilities"]

#: Seconds a create waits for a bundle before CapacityError (issue 13: bounded).
PLACE_TIMEOUT_S: Final = 10.0
#: Seconds between two looks at the cluster's nodes (a dead node is seen within this plus
#: the GCS's own detection, raycfg.HEALTH).
MONITOR_PERIOD_S: Final = 0.25
#: Long-poll of one stream pull, and of a node's ended sandboxes.
PULL_WAIT_S: Final = 5.0
#: Ended or lost sandboxes remembered (to answer calls on them with why they ended).
MAX_ENDED: Final = 4096
#: Seconds a node actor gets to start (a worker process, the engine's imports).
NODE_START_S: Final = 120.0
#: The largest file body a write carries across the cluster.
MAX_WRITE_BYTES: Final = 256 << 20
_MISSING: Final = frozenset({"sandboxes.snapshot", "sandboxes.fork"})
#: Seconds a closing server waits for the creates and resumes in flight (placing: 10 s).
CLOSE_WAIT_S: Final = 30.0


def cluster_capabilities() -> frozenset[str]:
    return CAPABILITIES - _MISSING


class _EngineShim:
    """What the server's shared code reads of ``front.engine`` (no local engine here)."""

    def __init__(self, door: ClusterFrontDoor) -> None:
        self._door = door
        self.audit = _NodeAudit(door)

    async def end_loop(self) -> None:
        await self._door.close()


class _NodeAudit:
    """The server's ingress rows (moat.server.ingress), written on the sandbox's node: its
    trail holds every row of the sandbox, and ``audit`` reads them back naming the node."""

    def __init__(self, door: ClusterFrontDoor) -> None:
        self._door = door

    def record_ingress(self, sandbox_id: str, **row: Any) -> None:
        placed = self._door.placed.get(sandbox_id)
        node = self._door.nodes.get(placed.node_id) if placed is not None else None
        if node is not None:  # fire and forget, as one host's audit queue
            node.handle.record_ingress.remote(sandbox_id, row)


class ClusterFrontDoor(Pausing):
    """The server's front door over a Ray cluster (``moat serve --cluster``); pause and
    resume are its ``Pausing`` half (moat.cluster.pausing)."""

    def __init__(
        self,
        address: str,
        policy: TenantPolicies | None = None,
        *,
        place_timeout: float = PLACE_TIMEOUT_S,
        paused_dir: str | None = None,
    ) -> None:
        """``paused_dir``: the shared store of paused sandboxes (default ``$MOAT_PAUSED_DIR``;
        none: pause is refused)."""
        import ray

        if policy is not None and not isinstance(policy, TenantPolicies):
            raise InvalidArgumentError("policy must be a TenantPolicies")
        self.policy = policy or TenantPolicies()
        self.place_timeout = place_timeout
        self.quota = Ledger()
        self.engine = _EngineShim(self)
        self.nodes: dict[str, _Node] = {}
        self.dead: set[str] = set()
        self.placed: dict[str, _Placed] = {}
        #: ended or lost sandboxes: id -> (tenant, node id, lost?)
        self.ended: collections.OrderedDict[str, tuple[str, str, bool]] = collections.OrderedDict()
        self._listeners: list[Callable[[str], None]] = []
        self._monitor: asyncio.Task[None] | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()  # creates and resumes (they run on if
        self._repairs: set[asyncio.Task[Any]] = set()  # their caller leaves), kills, repairs
        root = configured_dir() if paused_dir is None else Path(paused_dir)
        self.paused_store = ClusterPaused(root) if root is not None else None
        if not ray.is_initialized():
            ray.init(
                address=address, namespace=raycfg.NAMESPACE, log_to_driver=False,
                configure_logging=False, include_dashboard=False,
            )  # fmt: skip
        self._actor_cls = ray.remote(NodeActor)

    # -- nodes -----------------------------------------------------------------------------

    async def start(self, min_nodes: int = 0, timeout: float = NODE_START_S) -> None:
        """Watch the cluster; return once ``min_nodes`` node actors answer."""
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._watch_nodes())
        deadline = time.monotonic() + timeout
        while True:
            await self._refresh()
            up = [n for n in self.nodes.values() if n.ready.done() and not n.ready.exception()]
            if len(up) >= min_nodes:
                return
            if time.monotonic() > deadline:
                raise SandboxError(f"only {len(up)} of {min_nodes} cluster nodes came up")
            await asyncio.sleep(MONITOR_PERIOD_S)

    async def _watch_nodes(self) -> None:
        while not self._closed:
            try:
                await self._refresh()
            except Exception:  # the GCS briefly unreachable: look again
                log.exception("cluster refresh failed")
            await asyncio.sleep(MONITOR_PERIOD_S)

    async def _refresh(self) -> None:
        import ray

        listed = await asyncio.to_thread(ray.nodes)
        alive = {n["NodeID"]: n for n in listed if n.get("Alive")}
        for nid in list(self.nodes):
            if nid not in alive:
                self._lose_node(nid, "the GCS declared it dead")
        for nid, n in alive.items():
            res = n.get("Resources") or {}
            if res.get(NODE) and nid not in self.nodes and nid not in self.dead:
                self._start_node(nid, tiers_of(res), paused=res.get(PAUSED, 0) > 0)

    def _start_node(self, node_id: str, tiers: list[str], *, paused: bool = False) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        handle = self._actor_cls.options(
            num_cpus=0,  # the actor reserves nothing: the sandboxes' bundles do
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            max_restarts=0,  # a lost node's sandboxes are lost, never re-created
            max_concurrency=1000,
        ).remote()
        node = _Node(node_id, handle, tiers, asyncio.get_running_loop().create_task(
            self._ready(node_id, handle)), paused=paused)  # fmt: skip
        node.ready.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.nodes[node_id] = node
        log.info("cluster node %s joined with tiers %s", node_id[:12], ",".join(tiers))

    async def _ready(self, node_id: str, handle: Any) -> dict[str, Any]:
        info: dict[str, Any] = await asyncio.wait_for(handle.ready.remote(), NODE_START_S)
        node = self.nodes.get(node_id)
        if node is not None:
            node.info = info
            node.watcher = asyncio.get_running_loop().create_task(self._watch_ended(node))
        return info

    async def _watch_ended(self, node: _Node) -> None:
        """Learn of sandboxes that ended on the node by themselves (timeout, death)."""
        cursor = 0
        while not self._closed and node.node_id in self.nodes:
            try:
                reply = await node.handle.ended_since.remote(cursor, PULL_WAIT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the actor is dead: so is its node for us
                if _is_ray_death(exc):
                    self._lose_node(node.node_id, "its actor died")
                    return
                log.exception("ended watch failed")
                await asyncio.sleep(1.0)
                continue
            try:
                cursor, ids, lost = reply
            except (TypeError, ValueError):
                log.error("unexpected reply of a node's ended watch: %r", reply)
                await asyncio.sleep(1.0)
                continue
            if lost:
                self._lose_node(node.node_id, "it lost its raylet")
                return
            for sid, entry in ids:
                if entry is not None:  # it paused by itself (on_timeout="pause")
                    self._to_paused(sid, entry, node.node_id)
                else:
                    self._ended(sid, lost=False, node_id=node.node_id)

    def _lose_node(self, node_id: str, why: str) -> None:
        node = self.nodes.pop(node_id, None)
        self.dead.add(node_id)
        if node is None:
            return
        gone = [sid for sid, p in self.placed.items() if p.node_id == node_id]
        log.warning("cluster node %s lost (%s): %d sandboxes lost", node_id[:12], why, len(gone))
        for sid in gone:
            self._ended(sid, lost=True)
        self._repair_after(node)
        if node.watcher is not None:
            node.watcher.cancel()
        # Declared dead while its actor still runs (a partition): end it, so that its
        # sandboxes die with it rather than run on unseen (invariant 5).
        with contextlib.suppress(Exception):
            import ray

            ray.kill(node.handle, no_restart=True)

    async def _up(self, node: _Node) -> None:
        """Wait for the node's actor; one that never came up is a lost node."""
        try:
            await node.ready
        except Exception as exc:  # noqa: BLE001 - whatever kept it from starting, it is lost
            self._lose_node(node.node_id, f"its actor did not start ({type(exc).__name__})")
            raise SandboxLostError("the sandbox was not found: its cluster node was lost") from None

    def _ended(self, sandbox_id: str, *, lost: bool, node_id: str | None = None) -> None:
        """A sandbox ended (or was lost): release its bundle and quota, tell the faces.
        ``node_id``: the node that reports it (a late report of a sandbox that paused and
        resumed elsewhere since is not about its new placement)."""
        placed = self.placed.get(sandbox_id)
        if placed is None or (node_id is not None and placed.node_id != node_id):
            return
        del self.placed[sandbox_id]
        self.ended[sandbox_id] = (placed.tenant, placed.node_id, lost)
        while len(self.ended) > MAX_ENDED:
            self.ended.popitem(last=False)
        _remove_pg(placed.pg)
        self.quota.release_sandbox(sandbox_id)
        self._tell(sandbox_id)

    def _tell(self, sandbox_id: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(sandbox_id)
            except Exception:
                log.exception("end listener failed for %s", sandbox_id)

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def tiers(self, *, paused: bool = False) -> set[str]:
        """The tiers some live node advertises (``paused``: a node reaching the paused
        store)."""
        return {t for n in self.nodes.values() if n.paused or not paused for t in n.tiers}

    async def close(self) -> None:
        """Kill every sandbox this server placed (invariant 5) and release their bundles."""
        if self._closed:
            return
        self._closed = True
        if self._monitor is not None:
            self._monitor.cancel()
        for task in list(self._repairs):  # the next server's first scan repairs what's left
            task.cancel()
        if self._tasks:  # creates in flight land before the last kill (invariant 5)
            await asyncio.wait(list(self._tasks), timeout=CLOSE_WAIT_S)
        nodes = list(self.nodes.values())
        await asyncio.gather(
            *(asyncio.wait_for(_await(n.handle.kill_all.remote()), 30) for n in nodes),
            return_exceptions=True,
        )
        for sid in list(self.placed):
            self._ended(sid, lost=False)
        for n in nodes:
            if n.watcher is not None:
                n.watcher.cancel()

    # -- configuration -----------------------------------------------------------------

    @staticmethod
    def resolve(**kwargs: Any) -> SandboxConfig:
        return resolve(**kwargs)

    #: no template builds over a cluster (each node keeps its own template store): the
    #: server's template routes answer 501
    template_builds = None

    @staticmethod
    def template_exists(name: str, tenant: str | None = None) -> bool:
        """Only ``host`` (each node's own store is not the server's to name): any other
        template name is unknown here, a clear error at create."""
        return name == "host"

    @staticmethod
    def tenant_template(tenant: str, name: str) -> str | None:
        return None  # tenants build no templates through a clustered server

    @staticmethod
    def tenant_template_sizes(tenant: str, name: str) -> dict[str, int] | None:
        return None

    def default_tier(self, tenant: str) -> str | None:
        _tenant(tenant)
        return self.policy.of(tenant).default_tier

    def capabilities(self) -> frozenset[str]:
        return cluster_capabilities()

    def on_ended(self, listener: Callable[[str], None]) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    # -- lifecycle ----------------------------------------------------------------------

    async def create(
        self,
        tenant: str,
        config: SandboxConfig | Mapping[str, Any],
        *,
        secrets: Mapping[str, str] | None = None,
        sensitive: Mapping[str, str] | list[str] | None = None,
        gateway_config: Any = None,
    ) -> SandboxInfo:
        """Place and start a sandbox for ``tenant`` (see the module's docstring).

        Cancelled (the caller went away), the create runs on in the background and the
        sandbox it made is killed on arrival: a node must never keep a sandbox nobody tracks
        (invariant 5), and the bundle and quota it held are released with it."""
        task = asyncio.ensure_future(
            self._create(tenant, config, secrets, sensitive, gateway_config)
        )
        self._keep(task)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: self._kill_on_arrival(tenant, t))
            raise

    def _kill_on_arrival(self, tenant: str, task: asyncio.Task[SandboxInfo]) -> None:
        if task.cancelled() or task.exception() is not None:
            return  # nothing was made (the error was the caller's, who left)
        sid = task.result().sandbox_id
        log.warning("a cancelled create's sandbox %s arrived: killed", sid)
        self._keep(asyncio.ensure_future(self._quiet_kill(tenant, sid)))

    async def _quiet_kill(self, tenant: str, sandbox_id: str) -> None:
        try:
            await self.kill(tenant, sandbox_id)
        except Exception:  # its node lost meanwhile: it went with it
            log.exception("kill of %s failed", sandbox_id)

    async def _create(
        self,
        tenant: str,
        config: SandboxConfig | Mapping[str, Any],
        secrets: Mapping[str, str] | None,
        sensitive: Mapping[str, str] | list[str] | None,
        gateway_config: Any,
    ) -> SandboxInfo:
        _tenant(tenant)
        if gateway_config is not None:
            raise PolicyError("a gateway_config is a node's setting in a cluster")
        cfg = validate_config(config)
        if self._monitor is None:
            await self.start()
        policy = self.policy.of(tenant)
        admission.check_config(policy, cfg)
        if cfg.tier not in self.tiers():
            raise IsolationUnavailableError(
                f"isolation tier {cfg.tier!r} is not offered by any node of the cluster"
            )
        token = self._reserve(tenant, cfg)
        pg = None
        try:
            pg, node = await self._place(cfg.tier, cfg.limits.memory_mb, paused=False)
            info: SandboxInfo = await self._placed_call(
                node, node.handle.create.remote(tenant, cfg, dict(secrets or {}), sensitive)
            )
        except BaseException:
            self.quota.release(token)
            if pg is not None:
                _remove_pg(pg)
            raise
        held = Held(dict(secrets or {}), sensitive)
        self._track(info.sandbox_id, _Placed(tenant, node.node_id, pg, token, held))
        return info

    def _reserve(self, tenant: str, cfg: SandboxConfig) -> int:
        """The tenant's quota for one more sandbox, across the cluster (invariant 11)."""
        policy = self.policy.of(tenant)
        try:
            return self.quota.reserve(tenant, policy.quotas, cfg.limits.cpus,
                                      cfg.limits.memory_mb)  # fmt: skip
        except QuotaExceededError as exc:
            if exc.retry_after is None:
                exc.retry_after = 5.0
            raise

    async def _place(self, tier: str, memory_mb: int, *, paused: bool) -> tuple[Any, _Node]:
        """One bundle for a sandbox of ``tier`` (``paused``: a resume, on a node reaching the
        paused store), waited for a bounded time (else CapacityError), and its node (a lost
        one: SandboxDiedError, the bundle removed)."""
        import ray
        from ray.util.placement_group import placement_group

        pg = await asyncio.to_thread(
            placement_group, [bundle_for(tier, memory_mb, paused=paused)], "STRICT_PACK"
        )
        try:
            try:
                await asyncio.wait_for(_await(pg.ready()), self.place_timeout)
            except TimeoutError:
                raise CapacityError(
                    f"no cluster node has room for a {tier} sandbox now; try again later"
                ) from None
            table = await asyncio.to_thread(ray.util.placement_group_table, pg)
            node = self.nodes.get(table["bundles_to_node_id"][0])
            if node is None:
                raise SandboxDiedError("the cluster node chosen for the sandbox was lost")
            await self._up(node)
        except BaseException:
            _remove_pg(pg)
            raise
        return pg, node

    async def _placed_call(self, node: _Node, ref: Any) -> Any:
        """A node's create or resume of a sandbox placed there: its value."""
        try:
            status, value = await ref
        except Exception as exc:
            if _is_ray_death(exc):
                self._lose_node(node.node_id, "its actor died")
                raise SandboxDiedError("the cluster node of the sandbox was lost") from None
            raise
        if status == "lost":
            self._lose_node(node.node_id, "it lost its raylet")
            raise SandboxDiedError("the cluster node of the sandbox was lost")
        if status != "ok":
            raise unpack_error(value)
        return value

    def _track(self, sandbox_id: str, placed: _Placed) -> None:
        self.placed[sandbox_id] = placed
        if placed.token is not None:
            self.quota.bind(placed.token, sandbox_id)
        if placed.node_id not in self.nodes:  # lost while we waited: so is the sandbox
            self._lose_node(placed.node_id, "lost during create")

    def node_of(self, tenant: str, sandbox_id: str) -> dict[str, Any]:
        """Which node hosts the tenant's sandbox (its Ray node id, host, pid)."""
        node = self._route(tenant, sandbox_id)
        return {"node_id": node.node_id, **node.info}

    async def kill(self, tenant: str, sandbox_id: str) -> bool:
        """Kill a sandbox; a paused one's state is deleted from the shared store."""
        _tenant(tenant)
        sid = v.sandbox_id(sandbox_id)
        store = self.paused_store
        if store is not None and sid is not None:
            async with store.locks.of(sid):
                if await self._find_paused(tenant, sid) is not None:
                    return await asyncio.to_thread(store.delete, sid)
        try:
            node = self._route(tenant, sandbox_id)
        except SandboxError:
            return False
        killed = bool(await self._call(node, "kill", tenant, sandbox_id))
        self._ended(sandbox_id, lost=False)
        return killed

    async def set_timeout(self, tenant: str, sandbox_id: str, seconds: float) -> None:
        await self._plain("set_timeout", tenant, sandbox_id, seconds)

    async def info(self, tenant: str, sandbox_id: str) -> SandboxInfo:
        paused = await self._find_paused(tenant, sandbox_id)
        if paused is not None:
            return paused.info
        info: SandboxInfo = await self._plain("info", tenant, sandbox_id, ended_ok=True)
        return info

    async def is_running(self, tenant: str, sandbox_id: str) -> bool:
        if await self._find_paused(tenant, sandbox_id) is not None:
            return False
        try:
            return bool(await self._plain("is_running", tenant, sandbox_id, ended_ok=True))
        except SandboxLostError:
            return False

    async def list_sandboxes(
        self, tenant: str, *, metadata: Mapping[str, str] | None = None,
        state: str | None = "running",
    ) -> list[SandboxInfo]:  # fmt: skip
        """Running and ended sandboxes from the nodes; paused ones from the shared store."""
        _tenant(tenant)
        want = v.metadata(metadata)
        if state is not None:
            v.choice("state", state, ("running", "paused", "ended"))
        nodes = [n for n in self.nodes.values() if n.ready.done() and not n.ready.exception()]
        if state == "paused":
            nodes = []  # a node keeps none (moat.cluster.node)
        got = await asyncio.gather(
            *(self._call(n, "list_sandboxes", tenant, metadata=metadata, state=state)
              for n in nodes),
            return_exceptions=True,
        )  # fmt: skip
        out: list[SandboxInfo] = []
        for part in got:
            if isinstance(part, list):
                out.extend(i for i in part if i.state != "paused")
            elif isinstance(part, (InvalidArgumentError, PolicyError)):
                raise part
        store = self.paused_store
        if store is not None and state in (None, "paused"):
            loaded = await asyncio.to_thread(store.loaded)
            out += [
                p.info for p in list(loaded.values())
                if p.tenant == tenant and all(p.info.metadata.get(k) == x for k, x in want.items())
            ]  # fmt: skip
        return out

    async def metrics(
        self, tenant: str, sandbox_id: str, start: Any = None, end: Any = None
    ) -> Any:
        return await self._plain("metrics", tenant, sandbox_id, start, end)

    async def open_port(self, tenant: str, sandbox_id: str, port: int) -> tuple[Any, Any]:
        """Ingress on the sandbox's node (moat.cluster.ports): its front door opens the
        stream; bytes cross in bounded pieces, reads long-polling like command streams."""
        node = self._route(tenant, sandbox_id)
        await self._up(node)
        conn = await self._remote(node, node.handle.port_open.remote(tenant, sandbox_id, port))

        async def call(method: str, args: tuple[Any, ...]) -> Any:
            return await self._remote(node, getattr(node.handle, method).remote(*args))

        return RemoteReader(call, conn, PULL_WAIT_S), RemoteWriter(call, conn)

    async def activity_of(self, tenant: str, sandbox_id: str) -> list[Any]:
        self._route(tenant, sandbox_id, ended_ok=True)
        return []

    async def secret_names(self, tenant: str, sandbox_id: str) -> list[Any]:
        self._route(tenant, sandbox_id, ended_ok=True)
        return []

    async def audit_trail(self, tenant: str | None, **kw: Any) -> list[dict[str, Any]]:
        raise _missing("audit.trail (use `moat audit --cluster`)")

    # Snapshots and fork: a node's engine keeps its snapshots in its own state dir, where
    # another node can't start them; not carried across the cluster yet (invariant 7: said,
    # 501 over the wire, not a 500). No snapshot exists on a cluster, so lists are empty.

    async def create_snapshot(self, tenant: str, sandbox_id: str, name: str | None = None,
                              memory: bool | None = None) -> Any:  # fmt: skip
        self._route(tenant, sandbox_id)
        raise _missing("sandboxes.snapshot")

    async def fork(self, tenant: str, sandbox_id: str, count: int = 1, **kw: Any) -> Any:
        self._route(tenant, sandbox_id)
        raise _missing("sandboxes.fork")

    async def list_snapshots(self, tenant: str, sandbox_id: str | None = None,
                             name: str | None = None) -> list[Any]:  # fmt: skip
        _tenant(tenant)
        return []

    async def delete_snapshot(self, tenant: str, snapshot_id: str) -> bool:
        _tenant(tenant)
        return False

    async def snapshot_face(self, tenant: str, snapshot_id: str) -> dict[str, Any] | None:
        _tenant(tenant)
        return None

    async def create_from_snapshot(self, tenant: str, snapshot_id: str, **kw: Any) -> Any:
        _tenant(tenant)
        raise NotFoundError("snapshot was not found (snapshots are not kept on a cluster yet)")

    def guard(self, tenant: str, sandbox_id: str) -> Any:
        raise PolicyError("a clustered sandbox's guard lives on its node")

    async def update_network(self, tenant: str, sandbox_id: str, network: Any) -> None:
        """Replace the egress policy; the tenant's ceiling is checked here (invariant 11)."""
        from moat.egress import NetworkPolicy
        from moat.engine.resolve import network_policy
        from moat.model import NetworkConfig

        if isinstance(network, NetworkConfig):
            policy = network_policy(network)
        else:
            policy = NetworkPolicy.parse(network)
        admission.check_network(self.policy.of(tenant), policy)
        await self._plain("update_network", tenant, sandbox_id, network)

    async def audit(
        self, tenant: str, sandbox_id: str, *, denied_only: bool = False, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """The sandbox's audit rows, from its node (guarded there), each naming the node."""
        node = self._route(tenant, sandbox_id, ended_ok=True)
        rows: list[dict[str, Any]] = await self._call(
            node, "audit", tenant, sandbox_id, denied_only=denied_only, limit=limit
        )
        name = node.info.get("host", "?") + "/" + node.node_id[:12]
        return [{**row, "node": name} for row in rows]

    # -- code and contexts ------------------------------------------------------------

    def run_code(
        self, tenant: str, sandbox_id: str, code: str, **kwargs: Any
    ) -> AsyncIterator[Event]:
        async def events() -> AsyncIterator[Event]:
            stream = await self._open("run_code", tenant, sandbox_id, (code,), kwargs)
            async for event in stream.events():
                yield event

        return events()

    async def create_context(self, tenant: str, sandbox_id: str, language: str = "python",
                             cwd: str | None = None) -> Any:  # fmt: skip
        return await self._plain("create_context", tenant, sandbox_id, language, cwd)

    async def list_contexts(self, tenant: str, sandbox_id: str) -> Any:
        return await self._plain("list_contexts", tenant, sandbox_id)

    async def restart_context(self, tenant: str, sandbox_id: str, context: str) -> None:
        await self._plain("restart_context", tenant, sandbox_id, context)

    async def remove_context(self, tenant: str, sandbox_id: str, context: str) -> None:
        await self._plain("remove_context", tenant, sandbox_id, context)

    # -- commands and terminals -------------------------------------------------------

    async def start_command(self, tenant: str, sandbox_id: str, cmd: str, **kw: Any) -> _Remote:
        return await self._open("start_command", tenant, sandbox_id, (cmd,), kw)

    async def connect_command(self, tenant: str, sandbox_id: str, pid: int) -> _Remote:
        return await self._open("connect_command", tenant, sandbox_id, (pid,), {})

    async def start_pty(self, tenant: str, sandbox_id: str, size: Any, **kw: Any) -> _Remote:
        return await self._open("start_pty", tenant, sandbox_id, (size,), kw)

    async def send_pty_input(self, tenant: str, sandbox_id: str, pid: int, data: bytes) -> None:
        await self._plain("send_pty_input", tenant, sandbox_id, pid, data)

    async def resize_pty(self, tenant: str, sandbox_id: str, pid: int, size: Any) -> None:
        await self._plain("resize_pty", tenant, sandbox_id, pid, size)

    async def send_stdin(self, tenant: str, sandbox_id: str, pid: int, data: bytes,
                         eof: bool = False) -> None:  # fmt: skip
        await self._plain("send_stdin", tenant, sandbox_id, pid, data, eof)

    async def close_stdin(self, tenant: str, sandbox_id: str, pid: int) -> None:
        await self._plain("close_stdin", tenant, sandbox_id, pid)

    async def signal(self, tenant: str, sandbox_id: str, pid: int, signal: str = "SIGKILL") -> bool:
        return bool(await self._plain("signal", tenant, sandbox_id, pid, signal))

    async def list_commands(self, tenant: str, sandbox_id: str) -> Any:
        return await self._plain("list_commands", tenant, sandbox_id)

    # -- files ------------------------------------------------------------------------

    async def read_file(self, tenant: str, sandbox_id: str, path: str,
                        format: str = "text", user: str = "user") -> str | bytes:  # fmt: skip
        data: str | bytes = await self._plain("read_file", tenant, sandbox_id, path, format, user)
        return data

    async def write_file(
        self, tenant: str, sandbox_id: str, path: str,
        data: str | bytes | IO[Any] | AsyncIterator[bytes],
        metadata: Mapping[str, str] | None = None, user: str = "user",
    ) -> Any:  # fmt: skip
        node = self._route(tenant, sandbox_id)
        if hasattr(data, "__aiter__"):
            chunks: Any = data
        elif isinstance(data, (str, bytes, bytearray, memoryview)) or hasattr(data, "read"):
            chunks = file_chunks(data)
        else:
            raise InvalidArgumentError("data must be str, bytes or a readable file object")
        body = bytearray()
        async for chunk in chunks:
            body += chunk
            if len(body) > MAX_WRITE_BYTES:
                raise InvalidArgumentError("the file is too large to write across the cluster")
        return await self._remote(
            node,
            node.handle.write_file.remote(
                tenant,
                sandbox_id,
                path,
                bytes(body),
                None if metadata is None else dict(metadata),
                user,
            ),
        )

    async def list_dir(self, tenant: str, sandbox_id: str, path: str = ".", depth: int = 1,
                       user: str = "user") -> Any:  # fmt: skip
        return await self._plain("list_dir", tenant, sandbox_id, path, depth, user)

    async def stat(self, tenant: str, sandbox_id: str, path: str, user: str = "user") -> Any:
        return await self._plain("stat", tenant, sandbox_id, path, user)

    async def remove(self, tenant: str, sandbox_id: str, path: str, user: str = "user") -> None:
        await self._plain("remove", tenant, sandbox_id, path, user)

    async def make_dir(self, tenant: str, sandbox_id: str, path: str, user: str = "user") -> bool:
        return bool(await self._plain("make_dir", tenant, sandbox_id, path, user))

    async def move(self, tenant: str, sandbox_id: str, source: str, destination: str,
                   user: str = "user") -> Any:  # fmt: skip
        return await self._plain("move", tenant, sandbox_id, source, destination, user)

    async def watch_dir(
        self, tenant: str, sandbox_id: str, path: str, *, recursive: bool = False,
        include_entry: bool = False,
    ) -> _RemoteWatch:  # fmt: skip
        """A directory watch on the sandbox's node (its names guarded there): the polling
        form takes what is queued there; the streaming form pulls it like a command."""
        node = self._route(tenant, sandbox_id)
        await self._up(node)
        wid = await self._remote(
            node, node.handle.watch_open.remote(tenant, sandbox_id, path, recursive, include_entry)
        )
        return _RemoteWatch(self, node, wid, path, include_entry)

    # -- routing ----------------------------------------------------------------------

    def _route(self, tenant: str, sandbox_id: str, *, ended_ok: bool = False) -> _Node:
        """The node of the tenant's sandbox (invariant 11: another tenant's is unknown)."""
        _tenant(tenant)
        sid = v.sandbox_id(sandbox_id)
        placed = self.placed.get(sid) if sid is not None else None
        if placed is not None and placed.tenant == tenant:
            node = self.nodes.get(placed.node_id)
            if node is not None:
                return node
            self._ended(sid or "", lost=True)
        ended = self.ended.get(sid) if sid is not None else None
        if ended is not None and ended[0] == tenant:
            if ended[2]:
                raise SandboxLostError(f"sandbox {sid} was not found: its cluster node was lost")
            node = self.nodes.get(ended[1])
            if node is not None and ended_ok:
                return node
            if node is not None:
                return node  # the node answers why it ended (timeout, killed, died)
            raise SandboxLostError(f"sandbox {sid} was not found: its cluster node was lost")
        raise NotFoundError(f"sandbox {sid or '(malformed id)'} was not found")

    async def _plain(self, method: str, tenant: str, sandbox_id: str, *args: Any,
                     ended_ok: bool = False, **kwargs: Any) -> Any:  # fmt: skip
        node = self._route(tenant, sandbox_id, ended_ok=ended_ok)
        return await self._call(node, method, tenant, sandbox_id, *args, **kwargs)

    async def _call(self, node: _Node, method: str, *args: Any, **kwargs: Any) -> Any:
        await self._up(node)
        return await self._remote(node, node.handle.call.remote(method, args, kwargs))

    async def _remote(self, node: _Node, ref: Any) -> Any:
        try:
            status, value = await ref
        except Exception as exc:
            if _is_ray_death(exc):
                self._lose_node(node.node_id, "its actor died")
                raise SandboxLostError(
                    "the sandbox was not found: its cluster node was lost"
                ) from None
            raise
        if status == "lost":
            self._lose_node(node.node_id, "it lost its raylet")
            raise SandboxLostError("the sandbox was not found: its cluster node was lost")
        if status != "ok":
            raise unpack_error(value)
        return value

    async def _open(self, method: str, tenant: str, sandbox_id: str, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> _Remote:  # fmt: skip
        node = self._route(tenant, sandbox_id)
        await self._up(node)
        sid, pid = await self._remote(
            node, node.handle.open_stream.remote(method, (tenant, sandbox_id, *args), kwargs)
        )
        return _Remote(self, node, sid, pid)


class _Remote:
    """A stream on a node: its pid (commands, terminals) and its events, pulled in batches."""

    def __init__(self, door: ClusterFrontDoor, node: _Node, stream_id: str, pid: int | None):
        self._door = door
        self._node = node
        self._id = stream_id
        self.pid = pid if pid is not None else 0

    async def events(self) -> AsyncIterator[Event]:
        node = self._node
        done = False
        try:
            while not done:
                events, done, err = await self._door._remote(
                    node, node.handle.pull.remote(self._id, PULL_WAIT_S)
                )
                for event in events:
                    yield event
                if err is not None:
                    raise unpack_error(err)
        finally:
            if not done:  # the reader left early: the node cancels the call
                with contextlib.suppress(Exception):
                    node.handle.close_stream.remote(self._id)


class _RemoteWatch:
    """A WatchStream's shape (moat.engine.watching) over a watch kept on a node."""

    def __init__(self, door: ClusterFrontDoor, node: _Node, wid: str, path: str,
                 include_entry: bool) -> None:  # fmt: skip
        self._door = door
        self._node = node
        self._id = wid
        self.path = path
        self.include_entry = include_entry
        self.done = False  # as of the last take (the server's Watchers drop ended ones)
        self.error: SandboxError | None = None

    async def take(self) -> list[Any]:
        node = self._node
        events, done, err = await self._door._remote(node, node.handle.watch_take.remote(self._id))
        self.done = bool(done)
        if err is not None:
            self.error = unpack_error(err)
            raise self.error
        return list(events)

    async def events(self) -> AsyncIterator[Any]:
        node = self._node
        try:
            await self._door._remote(node, node.handle.watch_pump.remote(self._id))
            async for event in _Remote(self._door, node, self._id, None).events():
                yield event
        finally:
            await self.stop()

    async def stop(self) -> None:
        if not self.done:
            self.done = True
            with contextlib.suppress(Exception):
                await self._door._remote(self._node, self._node.handle.watch_stop.remote(self._id))


async def _await(ref: Any) -> Any:
    return await ref


def _is_ray_death(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError))


def _missing(capability: str) -> PolicyError:
    return PolicyError(f"this engine lacks the capability {capability!r} (not on a cluster yet)")
