"""What the dashboard's pages show, gathered through the front door for one login.

Trust domain: host (a face). Every read names a tenant: the login's own, or for an admin the
owner of what is shown (found by asking the front door tenant by tenant). A sandbox that is
not the login's answers exactly like an unknown one (None here, one 404 page: invariant 11).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from moat.dashboard.auth import Login
from moat.engine.api import FrontDoor
from moat.errors import SandboxError
from moat.model import SandboxInfo
from moat.store.keys import KeyStore

__all__ = ["Host", "SandboxRow", "Views"]

#: Template names remembered for sandboxes that ended.
MAX_REMEMBERED = 2000


class Host(Protocol):
    """What the dashboard needs of the server it is mounted in (``ServerState``)."""

    front: FrontDoor
    keys: KeyStore

    @property
    def records(self) -> Mapping[str, Any]: ...

    def forget(self, sandbox_id: str) -> None: ...

    def drop(self, sandbox_id: str) -> None: ...

    async def pause_sandbox(self, tenant: str, sandbox_id: str) -> None: ...

    async def resume_sandbox(self, tenant: str, sandbox_id: str) -> None: ...


@dataclass
class SandboxRow:
    """One line of the sandboxes table."""

    sandbox_id: str
    tenant: str
    tier: str
    template: str
    state: str
    started: float
    cpu_pct: float | None = None
    mem_used: int | None = None
    mem_total: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.sandbox_id, "tenant": self.tenant, "tier": self.tier,
            "template": self.template, "state": self.state, "started": self.started,
            "age_s": max(0, round(time.time() - self.started)), "cpu_pct": self.cpu_pct,
            "mem_used": self.mem_used, "mem_total": self.mem_total,
        }  # fmt: skip


class Views:
    """The front-door reads behind the pages."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.front = host.front
        #: the E2B template names of sandboxes seen running (their records go at the end)
        self._templates: OrderedDict[str, str] = OrderedDict()

    def tenants(self, login: Login) -> list[str]:
        """The tenants a login may see: its own, or for an admin every tenant the server
        knows (those with keys, and those the policy file names)."""
        if not login.admin:
            return [login.tenant]
        names = {k.tenant for k in self.host.keys.list()} | set(self.front.policy.tenants)
        return sorted(names | {login.tenant})

    def template_of(self, info: SandboxInfo) -> str:
        rec = self.host.records.get(info.sandbox_id)
        name = getattr(rec, "template_id", None)
        if isinstance(name, str):
            self._templates[info.sandbox_id] = name
            while len(self._templates) > MAX_REMEMBERED:
                self._templates.popitem(last=False)
            return name
        return self._templates.get(info.sandbox_id, info.template)

    async def sandboxes(self, login: Login, state: str | None = "running") -> list[SandboxRow]:
        """The sandboxes the login may see, newest first, with their latest metrics."""
        rows: list[SandboxRow] = []
        for tenant in self.tenants(login):
            for info in await self.front.list_sandboxes(tenant, state=state):
                row = SandboxRow(
                    info.sandbox_id, tenant, info.tier, self.template_of(info), info.state,
                    info.started_at.timestamp(), metadata=dict(info.metadata),
                )  # fmt: skip
                if info.state == "running":
                    try:
                        samples = await self.front.metrics(tenant, info.sandbox_id)
                    except SandboxError:  # ended meanwhile
                        samples = []
                    if samples:
                        last = samples[-1]
                        row.cpu_pct, row.mem_used = last.cpu_used_pct, last.mem_used
                        row.mem_total = last.mem_total
                rows.append(row)
        rows.sort(key=lambda r: (r.state != "running", -r.started))
        return rows

    async def owner(self, login: Login, sandbox_id: str) -> str | None:
        """The tenant owning ``sandbox_id`` among those the login may see, else None."""
        for tenant in self.tenants(login):
            try:
                await self.front.info(tenant, sandbox_id)
            except SandboxError:
                continue
            return tenant
        return None

    async def sandbox(self, login: Login, sandbox_id: str) -> dict[str, Any] | None:
        """Everything the sandbox page shows, or None (unknown, or not the login's)."""
        tenant = await self.owner(login, sandbox_id)
        if tenant is None:
            return None
        try:
            info = await self.front.info(tenant, sandbox_id)
            running = await self.front.is_running(tenant, sandbox_id)
            rows = await self.front.audit(tenant, sandbox_id, limit=1000)
        except SandboxError:
            return None
        paused = info.state == "paused"
        try:  # a paused sandbox has no session: what ran before is in the trail only
            calls = await self.front.activity_of(tenant, sandbox_id)
            brokered = await self.front.secret_names(tenant, sandbox_id)
        except SandboxError:
            if not paused:
                return None
            calls, brokered = [], []
        metrics = None
        if running:
            try:
                samples = await self.front.metrics(tenant, sandbox_id)
                metrics = samples[-1] if samples else None
            except SandboxError:
                running = False
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_kind.setdefault(str(row.get("kind")), []).append(row)
        ends = info.end_at.astimezone(dt.UTC).timestamp()  # planned, while it runs
        if not running and not paused:  # when it really ended, where the trail says
            ended = [r for r in by_kind.get("sandbox", []) if r.get("result") == "ended"]
            ends = float(ended[0]["ts"]) if ended else ends
        return {
            "info": info,
            "tenant": tenant,
            "running": running,
            "paused": paused,
            "state": "running" if running else "paused" if paused else "ended",
            "template": self.template_of(info),
            "metrics": metrics,
            "calls": calls,
            "secrets": brokered,
            "egress": by_kind.get("egress", []),
            "findings": by_kind.get("finding", []),
            "execs": by_kind.get("exec", []),
            "lifecycle": sorted(
                by_kind.get("sandbox", [])
                + by_kind.get("operator", [])
                + by_kind.get("ingress", [])
                + by_kind.get("audit_dropped", []),
                key=lambda r: float(r.get("ts", 0)),
            ),
            "started": info.started_at.timestamp(),
            "ends": ends,
        }

    async def tenant_page(self, name: str) -> dict[str, Any]:
        """An admin's view of one tenant: its policy, keys (ids only) and sandboxes."""
        policy = self.front.policy.of(name)
        keys = [k for k in self.host.keys.list() if k.tenant == name]
        running = await self.front.list_sandboxes(name, state="running")
        return {"name": name, "policy": policy, "api_keys": keys, "running": running,
                "named": name in self.front.policy.tenants}  # fmt: skip
