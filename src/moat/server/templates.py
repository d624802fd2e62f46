"""E2B's template build API over ``moat serve``: per-tenant templates (issue 12).

The routes the E2B SDK's ``Template.build`` / ``build_in_background`` use, on moat's builder
(:mod:`moat.templates.build`: every step in a build sandbox, egress only to the package
sources, cached by content hash), mapped by :mod:`moat.templates.e2b`:

- ``POST /v3/templates`` ``{name, tags}`` -> 202 ``{templateID, buildID, names, tags, …}``;
- ``GET /templates/{id}/files/{hash}`` -> 201 ``{present, url}``: ``url`` is a one-use
  upload link (``PUT /moat/v1/template-uploads/{token}``, no key: the token is the
  authority, unguessable, for that tenant and hash, expiring);
- ``POST /v2/templates/{id}/builds/{buildID}`` (the steps) -> 202; the build runs in the
  background, one at a time on this server;
- ``GET /templates/{id}/builds/{buildID}/status?logsOffset=&limit=&level=`` -> 200 with the
  build's log entries (guarded, invariant 4) and, on failure, the step and exit code;
- ``GET /templates`` (the tenant's), ``GET /templates/{id}``, ``DELETE /templates/{id}``
  (a snapshot id deletes the snapshot, as before), ``GET /templates/aliases/{alias}``.

Tenants (invariant 11): a template built here belongs to its tenant; names are per tenant;
another tenant's template id or name answers exactly as an unknown one (404; a create on it:
400 "not found"). Host-wide templates (the operator's CLI) are visible to all, read-only.
Bounds: ``templates`` and ``template_mb`` of the tenant's quotas (defaults below; 429 past
them), one queued or running build per tenant, uploads of at most ``MAX_UPLOAD`` bytes, and
the builder's own limits per step (time, CPUs, memory, size cap).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, StrictBool, StrictInt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from moat.engine.api import is_snapshot_id
from moat.errors import (
    InvalidArgumentError,
    NotFoundError,
    QuotaExceededError,
    SandboxError,
    TemplateBuildError,
)
from moat.guard import redact
from moat.server import wire
from moat.server.app import MAX_JSON_BODY, BodyTooLarge, ServerState, read_body, too_large
from moat.templates import e2b
from moat.templates.build import Builder, BuildOptions
from moat.templates.store import Store, remove_tree
from moat.templates.tenant import TenantTemplates, split_name

__all__ = ["TemplateBuilds", "template_routes"]

log = logging.getLogger("moat.server")

Make = Callable[[str, Any, list[str]], Route]

#: A tenant's limits when its policy sets none (docs/templates.md).
DEFAULT_TEMPLATES = 20
DEFAULT_TEMPLATE_MB = 16 * 1024
#: One uploaded build-context archive.
MAX_UPLOAD = 512 << 20
#: How long an upload link stays valid (seconds).
UPLOAD_TTL = 3600.0
#: Log entries kept per build (the rest are counted, not kept).
MAX_LOG_ENTRIES = 20_000
MAX_LINE = 4096
#: Finished builds whose status stays readable.
KEEP_FINISHED = 200
#: Builds a tenant may have requested and not started (older ones are forgotten).
MAX_PENDING = 5
_BUILD_ID = re.compile(r"bld-[0-9a-f]{24}")


class BuildRequestBody(wire._Closed):
    name: str | None = Field(default=None, max_length=128)
    alias: str | None = Field(default=None, max_length=128)
    tags: list[str] | None = Field(default=None, max_length=20)
    team_id: str | None = Field(default=None, alias="teamID", max_length=128)
    cpu_count: StrictInt | None = Field(default=None, alias="cpuCount")
    memory_mb: StrictInt | None = Field(default=None, alias="memoryMB")
    min_free_disk_mb: StrictInt | None = Field(default=None, alias="minFreeDiskMb")


class StepBody(wire._Closed):
    type: str = Field(max_length=32)
    args: list[str] | None = Field(default=None, max_length=1000)
    files_hash: str | None = Field(default=None, alias="filesHash", max_length=64)
    force: StrictBool | None = None
    force_upload: StrictBool | None = Field(default=None, alias="forceUpload")


class BuildStartBody(wire._Closed):
    from_image: str | None = Field(default=None, alias="fromImage", max_length=512)
    from_template: str | None = Field(default=None, alias="fromTemplate", max_length=128)
    from_image_registry: dict[str, Any] | None = Field(default=None, alias="fromImageRegistry")
    force: StrictBool | None = None
    steps: list[StepBody] | None = Field(default=None, max_length=200)
    start_cmd: str | None = Field(default=None, alias="startCmd", max_length=65536)
    ready_cmd: str | None = Field(default=None, alias="readyCmd", max_length=65536)


@dataclass
class Job:
    """One build: what the status route shows."""

    tenant: str
    template_id: str
    build_id: str
    tags: list[str]
    #: the sandbox sizes the template's sandboxes get (``cpus``, ``memory_mb``)
    sizes: dict[str, int] = field(default_factory=dict)
    status: str = "waiting"  # waiting | building | ready | error
    entries: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0
    reason: dict[str, Any] | None = None
    started: bool = False
    finished_at: float | None = None
    partial: str = ""
    task: asyncio.Task[None] | None = None

    def say(self, message: str, level: str = "info", step: str | None = None) -> None:
        if len(self.entries) >= MAX_LOG_ENTRIES:
            self.dropped += 1
            return
        entry: dict[str, Any] = {
            "timestamp": wire.iso(dt.datetime.now(dt.UTC)),
            "level": level,
            # build output comes from a sandbox: it passes the guard (invariant 4)
            "message": redact(message[:MAX_LINE]),
        }
        if step is not None:
            entry["step"] = step
        self.entries.append(entry)

    def output(self, chunk: bytes) -> None:
        text = self.partial + chunk.decode("utf-8", "replace")
        *lines, self.partial = text.split("\n")
        if len(self.partial) > MAX_LINE:
            lines.append(self.partial)
            self.partial = ""
        for line in lines:
            self.say(line.rstrip("\r"))


@dataclass
class Upload:
    tenant: str
    files_hash: str
    expires: float


class TemplateBuilds:
    """The server's builds, upload links and the lock that runs one build at a time."""

    def __init__(self, state: ServerState, store: Store | None = None) -> None:
        self.state = state
        self.store = store or Store.default()
        self.jobs: dict[str, Job] = {}
        self.uploads: dict[str, Upload] = {}
        self.running = asyncio.Lock()

    def tenant(self, tenant: str) -> TenantTemplates:
        return TenantTemplates(self.store, tenant)

    def limits(self, tenant: str) -> tuple[int, int]:
        """(templates, bytes) the tenant may keep."""
        q = self.state.front.policy.of(tenant).quotas
        count = DEFAULT_TEMPLATES if q.templates is None else q.templates
        mb = DEFAULT_TEMPLATE_MB if q.template_mb is None else q.template_mb
        return count, mb << 20

    def job(self, tenant: str, template_id: str, build_id: str) -> Job | None:
        j = self.jobs.get(build_id)
        if j is None or j.tenant != tenant or j.template_id != template_id:
            return None  # another tenant's build is just unknown (invariant 11)
        return j

    def busy(self, tenant: str) -> bool:
        return any(j.tenant == tenant and j.status in ("waiting", "building") and j.started
                   for j in self.jobs.values())  # fmt: skip

    def forget_old(self) -> None:
        done = sorted(
            (j for j in self.jobs.values() if j.finished_at is not None),
            key=lambda j: j.finished_at or 0.0,
        )
        for j in done[: max(0, len(done) - KEEP_FINISHED)]:
            self.jobs.pop(j.build_id, None)
        now = time.time()
        for token, up in list(self.uploads.items()):
            if up.expires < now:
                self.uploads.pop(token, None)

    async def run(self, job: Job, body: dict[str, Any]) -> None:
        """The build, in the background: extract uploads, build, tag the result."""
        work: Path | None = None
        tenant = self.tenant(job.tenant)
        try:
            job.say("waiting for the builder" if self.running.locked() else "build queued")
            async with self.running:
                job.status = "building"
                plan = e2b.plan(body, tenant.resolve)
                work = await asyncio.to_thread(self._unpack, tenant, plan, job.build_id)
                plan = e2b.adjust_copy_dest(plan, work)
                _, byte_cap = self.limits(job.tenant)
                room = (byte_cap - tenant.bytes_used()) >> 20
                if room <= 0:
                    raise QuotaExceededError("this tenant's template storage is full")
                options = BuildOptions.from_env(size_cap_mb=min(room, 8192))
                builder = Builder(
                    self.store, options, audit=self.state.front.engine.audit,
                    on_output=job.output,
                )  # fmt: skip
                built = await builder.build(plan.defn, None, work)
                before = dict((tenant.get(job.template_id) or {}).get("tags") or {})
                tenant.set_tags(job.template_id, job.tags, built.id, job.sizes)
                if tenant.bytes_used() > byte_cap:  # the new root took the tenant past it
                    self._revert(tenant, job, before, built.id)
                    raise QuotaExceededError("the template is over this tenant's storage quota")
                if job.partial:
                    job.say(job.partial)
                job.say(f"template {job.template_id} built ({built.id[:12]})")
                job.status = "ready"
        except TemplateBuildError as exc:
            self._failed(job, exc, plan_numbers(body))
        except SandboxError as exc:
            job.status = "error"
            job.reason = {"message": str(exc)}
            job.say(str(exc), "error")
        except asyncio.CancelledError:
            job.status = "error"
            job.reason = {"message": "the build was cancelled (the server stopped)"}
            raise
        except Exception:  # the reply stays safe (invariant 8); details to the log
            log.exception("template build %s", job.build_id)
            job.status = "error"
            job.reason = {"message": "the build failed: internal error"}
            job.say("the build failed: internal error", "error")
        finally:
            job.finished_at = time.time()
            rec = tenant.get(job.template_id)
            if job.status == "error" and rec is not None and not rec.get("tags"):
                tenant.delete(job.template_id)  # never built: it holds no name or room
            if work is not None:
                await asyncio.to_thread(remove_tree, work)

    def _revert(self, tenant: TenantTemplates, job: Job, before: dict[str, Any], new: str) -> None:
        """Put the template's tags back as they were and drop the new root if unused."""
        with contextlib.suppress(NotFoundError):
            tenant.replace_tags(job.template_id, before)
        tenant.drop_if_unused(new)

    def _failed(self, job: Job, exc: TemplateBuildError, numbers: tuple[int, ...]) -> None:
        """E2B's reason: the failing step's number as the SDK counts them ("base" for the
        base), the exit code and the output's tail."""
        label = exc.step.split(" ", 1)[0]
        step: str | None = None
        if "/" in label and label.split("/")[0].isdigit():
            n = int(label.split("/")[0])
            step = "base" if n == 1 else (str(numbers[n - 2]) if n - 2 < len(numbers) else None)
        what = f"step {step}" if step and step != "base" else "the base"
        code = f"exit code {exc.exit_code}" if exc.exit_code is not None else str(exc)
        tail = redact(exc.output[-1000:].strip()) if exc.output else ""
        message = f"{what} failed: {code}" + (f"\n{tail}" if tail else "")
        job.status = "error"
        job.reason = {"message": message, **({"step": step} if step else {})}
        job.say(message, "error", step)

    def _unpack(self, tenant: TenantTemplates, plan: e2b.Plan, build_id: str) -> Path:
        work = tenant.root / "work" / build_id
        work.parent.mkdir(mode=0o700, exist_ok=True)
        if work.exists():
            remove_tree(work)
        work.mkdir(mode=0o700)
        try:
            for copy in plan.copies:
                archive = tenant.upload_path(copy.files_hash)
                if not archive.is_file():
                    raise InvalidArgumentError(
                        f"step {copy.index}: the files of COPY {copy.src[:80]!r} were not uploaded"
                    )
                dest = work / copy.subdir
                dest.mkdir(mode=0o755)
                e2b.extract(archive, dest, copy)
        except BaseException:
            remove_tree(work)
            raise
        return work


def template_limits(tenant: str, name: str) -> dict[str, int] | None:
    """The sandbox sizes ``tenant``'s own template ``name`` was built with (``cpuCount``,
    ``memoryMB`` of its build request), or None."""
    rec = TenantTemplates(Store.default(), tenant).get(name)
    sizes = dict(rec.get("sizes") or {}) if rec is not None else {}
    return {str(k): int(v) for k, v in sizes.items()} or None


def plan_numbers(body: dict[str, Any]) -> tuple[int, ...]:
    """The E2B step number of each moat step (RUN and COPY make one; the rest none)."""
    steps = body.get("steps") or []
    return tuple(i for i, s in enumerate(steps, start=1) if s.get("type") in ("RUN", "COPY"))


def template_routes(state: ServerState, r: Make) -> list[Route]:
    """The routes: authenticated ones made by the control plane's ``r``, and the upload."""
    builds = TemplateBuilds(state)
    front = state.front

    def not_found(tid: str) -> Response:
        shown = tid if len(tid) <= 64 and tid.isprintable() else "(bad id)"
        return wire.error(404, f"template {shown} was not found")

    async def request_build(request: Request, tenant: str) -> Response:
        body = wire.parse(BuildRequestBody, await read_body(request, MAX_JSON_BODY))
        sizes: dict[str, int] = {}
        if body.cpu_count is not None:  # what sandboxes of the template get (E2B's)
            if not 1 <= body.cpu_count <= 64:
                raise InvalidArgumentError("cpuCount must be from 1 to 64")
            sizes["cpus"] = body.cpu_count
        if body.memory_mb is not None:
            if not 128 <= body.memory_mb <= 1 << 20:
                raise InvalidArgumentError("memoryMB must be from 128 to 1048576")
            sizes["memory_mb"] = body.memory_mb
        if body.min_free_disk_mb:
            raise InvalidArgumentError("minFreeDiskMb is not supported by moat")
        given = body.name or body.alias
        if not given:
            raise InvalidArgumentError("name is required")
        name, tag = split_name(given)
        if name in wire.DEFAULT_TEMPLATES or name == "host":
            raise InvalidArgumentError(f"the template name {name!r} is reserved")
        tags = list(dict.fromkeys([tag, *(body.tags or [])]))
        for t in tags:
            split_name(f"{name}:{t}")
        if builds.busy(tenant):
            raise QuotaExceededError("a build of this tenant is already running", retry_after=5)
        pending = [j for j in builds.jobs.values() if j.tenant == tenant and not j.started]
        for old in pending[: max(0, len(pending) - MAX_PENDING + 1)]:  # never started
            builds.jobs.pop(old.build_id, None)
        count, _ = builds.limits(tenant)
        rec = builds.tenant(tenant).request(name, count)
        builds.forget_old()
        build_id = "bld-" + secrets.token_hex(12)
        builds.jobs[build_id] = Job(tenant, rec["templateID"], build_id, tags, sizes)
        return JSONResponse(
            {
                "templateID": rec["templateID"],
                "buildID": build_id,
                "public": False,
                "names": [name],
                "tags": tags,
                "aliases": [name],
            },
            202,
        )

    async def file_link(request: Request, tenant: str) -> Response:
        tid, files_hash = request.path_params["template_id"], request.path_params["hash"]
        own = builds.tenant(tenant)
        if own.get(tid) is None:
            return not_found(tid)
        present = own.has_upload(files_hash)
        token = secrets.token_urlsafe(32)
        builds.uploads[token] = Upload(tenant, files_hash, time.time() + UPLOAD_TTL)
        base = str(request.base_url).rstrip("/")
        return JSONResponse(
            {"present": present, "url": f"{base}/moat/v1/template-uploads/{token}"}, 201
        )

    async def upload(request: Request) -> Response:
        """The upload link's PUT: the body is the archive (no key: the token is the
        authority; it works once)."""
        token = request.path_params["token"]
        up = builds.uploads.pop(token, None)
        if up is None or up.expires < time.time():
            return wire.error(404, "no such upload link (expired or used)")
        own = builds.tenant(up.tenant)
        _, byte_cap = builds.limits(up.tenant)
        room = byte_cap - own.bytes_used()
        cap = min(MAX_UPLOAD, max(0, room))
        final = own.upload_path(up.files_hash)
        tmp = final.with_name(f".up-{secrets.token_hex(6)}")
        total = 0
        try:
            with tmp.open("wb") as out:
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > cap:
                        raise BodyTooLarge
                    out.write(chunk)
            os.replace(tmp, final)
        except BodyTooLarge:
            if room < MAX_UPLOAD:
                return wire.error(429, "this tenant's template storage is full")
            return too_large()
        except OSError:
            log.exception("template upload")
            return wire.error(500, "internal error")
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return Response(status_code=200)

    async def start_build(request: Request, tenant: str) -> Response:
        tid, bid = request.path_params["template_id"], request.path_params["build_id"]
        job = builds.job(tenant, tid, bid)
        if job is None:
            return not_found(tid)
        if job.started:
            raise InvalidArgumentError("this build was started already")
        body = wire.parse(BuildStartBody, await read_body(request, 4 << 20))
        data = body.model_dump(by_alias=True, exclude_none=True)
        data["steps"] = [s.model_dump(by_alias=True, exclude_none=True) for s in body.steps or []]
        own = builds.tenant(tenant)
        try:
            e2b.plan(data, own.resolve)  # refuse what does not map now (400), not later
        except InvalidArgumentError:
            builds.jobs.pop(bid, None)
            rec = own.get(tid)
            if rec is not None and not rec.get("tags"):  # never built: it holds no room
                own.delete(tid)
            raise
        if builds.busy(tenant):
            raise QuotaExceededError("a build of this tenant is already running", retry_after=5)
        job.started = True
        job.task = asyncio.get_running_loop().create_task(builds.run(job, data))
        return Response(status_code=202)

    async def status(request: Request, tenant: str) -> Response:
        tid, bid = request.path_params["template_id"], request.path_params["build_id"]
        job = builds.job(tenant, tid, bid)
        if job is None:
            return not_found(tid)
        q = request.query_params
        offset = _int(q.get("logsOffset"), "logsOffset", 0, MAX_LOG_ENTRIES, 0)
        limit = _int(q.get("limit"), "limit", 1, 100, 100)
        level = q.get("level")
        rows = job.entries[offset : offset + limit]
        if level:
            order = ["debug", "info", "warn", "error"]
            if level not in order:
                raise InvalidArgumentError("level must be debug, info, warn or error")
            rows = [e for e in rows if order.index(e["level"]) >= order.index(level)]
        out: dict[str, Any] = {
            "templateID": job.template_id,
            "buildID": job.build_id,
            "status": job.status,
            "logs": [],
            "logEntries": rows,
        }
        if job.reason is not None:
            out["reason"] = job.reason
        return JSONResponse(out)

    def _template_reply(own: TenantTemplates, rec: dict[str, Any]) -> dict[str, Any]:
        tags = dict(rec.get("tags") or {})
        meta = own.store.meta(str(tags.get("default") or next(iter(tags.values()), ""))) or {}
        created = wire.iso(dt.datetime.fromtimestamp(float(rec.get("created", 0)), dt.UTC))
        return {
            "templateID": rec["templateID"],
            "buildID": str(tags.get("default") or ""),
            "names": [rec["name"]],
            "aliases": [rec["name"]],
            "tags": sorted(tags),
            "public": False,
            "createdAt": created,
            "updatedAt": created,
            "diskSizeMB": int(meta.get("bytes", 0)) >> 20,
            "buildStatus": "ready" if tags else "waiting",
            "buildCount": len(set(tags.values())),
            "spawnCount": 0,
            "cpuCount": int(dict(rec.get("sizes") or {}).get("cpus", 1)),
            "memoryMB": int(dict(rec.get("sizes") or {}).get("memory_mb", 512)),
            "envdVersion": "0.2.0",
            "createdBy": None,
            "lastSpawnedAt": None,
        }

    async def listing(request: Request, tenant: str) -> Response:
        own = builds.tenant(tenant)
        return JSONResponse([_template_reply(own, rec) for rec in own.records()])

    async def get_one(request: Request, tenant: str) -> Response:
        tid = request.path_params["template_id"]
        own = builds.tenant(tenant)
        rec = own.get(tid)
        if rec is None:
            return not_found(tid)
        reply = _template_reply(own, rec)
        reply["builds"] = [
            {"buildID": j.build_id, "status": j.status}
            for j in builds.jobs.values()
            if j.tenant == tenant and j.template_id == rec["templateID"]
        ]
        return JSONResponse(reply)

    async def delete(request: Request, tenant: str) -> Response:
        tid = request.path_params["template_id"]
        if is_snapshot_id(tid):  # a snapshot is a template on E2B's wire (issue 11)
            if await front.delete_snapshot(tenant, tid):
                return Response(status_code=204)
            return not_found(tid)
        own = builds.tenant(tenant)
        rec = own.get(tid)
        if rec is None:
            return not_found(tid)
        if any(j.template_id == rec["templateID"] and j.status in ("waiting", "building")
               and j.started for j in builds.jobs.values()):  # fmt: skip
            return wire.error(409, "the template is being built")
        await asyncio.to_thread(own.delete, rec["templateID"])
        return Response(status_code=204)

    async def alias(request: Request, tenant: str) -> Response:
        name = request.path_params["alias"]
        own = builds.tenant(tenant)
        rec = own.get(name) if ":" not in name else None
        if rec is not None:
            return JSONResponse({"templateID": rec["templateID"], "public": False})
        if own.resolve(name) is not None and ":" not in name:  # a host-wide template
            return JSONResponse({"templateID": name, "public": True})
        return not_found(name)

    async def tags(request: Request, tenant: str) -> Response:
        return wire.error(
            400, "template tag management is not supported by moat (build with name:tag)"
        )

    t = "/templates/{template_id}"
    return [
        r("/v3/templates", request_build, ["POST"]),
        r("/templates", listing, ["GET"]),
        r("/templates/tags", tags, ["POST", "DELETE"]),
        r("/templates/aliases/{alias}", alias, ["GET"]),
        r(t + "/files/{hash}", file_link, ["GET"]),
        r("/v2" + t + "/builds/{build_id}", start_build, ["POST"]),
        r(t + "/builds/{build_id}/status", status, ["GET"]),
        r(t + "/tags", tags, ["GET"]),
        r(t, get_one, ["GET"]),
        r(t, delete, ["DELETE"]),
        Route("/moat/v1/template-uploads/{token}", upload, methods=["PUT"]),
    ]


def _int(raw: str | None, name: str, lo: int, hi: int, default: int) -> int:
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise InvalidArgumentError(f"{name} must be an integer from {lo} to {hi}")
    return int(raw)
