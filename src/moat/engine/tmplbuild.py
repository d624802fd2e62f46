"""Templates built for tenants through a face (E2B's template build API; issue 12).

Trust domain: host engine. The face (``moat.server.templates``) speaks the wire; this module
holds the builds (status and guarded log entries in memory, and on disk from start to end so
that a restart reads a build it interrupted as failed: :mod:`moat.engine.buildstate`), the
one-use upload links, the
tenants' template records (:mod:`moat.templates.tenant`) and the quotas, and runs each build
on moat's builder (:mod:`moat.templates.build`: every step in a build sandbox, egress only to
the package sources, cached by content hash) from the request mapped by
:mod:`moat.templates.e2b`. One build runs at a time per front door; one per tenant is queued
or running. Another tenant's build, template or upload link is unknown (invariant 11).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moat.engine import buildstate
from moat.errors import (
    InvalidArgumentError,
    NotFoundError,
    QuotaExceededError,
    SandboxError,
    TemplateBuildError,
)
from moat.guard import redact
from moat.templates import e2b
from moat.templates.build import Builder, BuildOptions
from moat.templates.store import Store, remove_tree
from moat.templates.tenant import TenantTemplates, split_name

if TYPE_CHECKING:
    from moat.engine.api import FrontDoor

__all__ = ["Job", "TemplateBuilds", "UploadTooLarge"]

log = logging.getLogger("moat.templates")

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
#: Unused upload links a tenant may hold (older ones stop working).
MAX_LINKS = 100
#: Names a face gives its default templates: not a tenant's to take.
RESERVED = frozenset({"base", "code-interpreter-v1", "default", "host"})


class UploadTooLarge(InvalidArgumentError):
    """An upload over its cap (``MAX_UPLOAD``) or the tenant's room (``full``)."""

    def __init__(self, message: str, *, full: bool) -> None:
        super().__init__(message)
        self.full = full


def _iso(t: float | None = None) -> str:
    when = dt.datetime.fromtimestamp(time.time() if t is None else t, dt.UTC)
    return when.isoformat().replace("+00:00", "Z")


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
    #: the index of ``entries[0]`` among the build's entries (a record read back keeps the last)
    first: int = 0

    def record(self) -> dict[str, Any]:
        """What :mod:`moat.engine.buildstate` keeps of it."""
        return {
            "tenant": self.tenant,
            "templateID": self.template_id,
            "buildID": self.build_id,
            "tags": self.tags,
            "sizes": self.sizes,
            "status": self.status,
            "reason": self.reason,
            "entries": self.entries,
            "first": self.first,
            "dropped": self.dropped,
            "finishedAt": self.finished_at,
        }

    @classmethod
    def from_record(cls, tenant: str, rec: dict[str, Any]) -> Job:
        """A build read back from disk (already finished, or interrupted)."""
        reason = rec.get("reason")
        job = cls(
            tenant, str(rec.get("templateID", "")), str(rec["buildID"]),
            [str(t) for t in rec.get("tags") or []],
            status=str(rec.get("status", "error")),
            entries=[e for e in rec.get("entries") or [] if isinstance(e, dict)],
            reason=reason if isinstance(reason, dict) else None,
            started=True,
            first=int(rec.get("first", 0)),
            dropped=int(rec.get("dropped", 0)),
        )  # fmt: skip
        job.finished_at = float(rec.get("finishedAt") or time.time())
        return job

    def say(self, message: str, level: str = "info", step: str | None = None) -> None:
        if len(self.entries) >= MAX_LOG_ENTRIES:
            self.dropped += 1
            return
        entry: dict[str, Any] = {
            "timestamp": _iso(),
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
    """The builds, upload links and the lock that runs one build at a time (one per
    front door: ``FrontDoor.template_builds``)."""

    def __init__(self, front: FrontDoor, store: Store | None = None) -> None:
        self.front = front
        self._store = store
        self.jobs: dict[str, Job] = {}
        self.uploads: dict[str, Upload] = {}
        self.running = asyncio.Lock()

    @property
    def store(self) -> Store:
        if self._store is None:  # the state dir is read on first use, not at start
            self._store = Store.default()
        return self._store

    def tenant(self, tenant: str) -> TenantTemplates:
        return TenantTemplates(self.store, tenant)

    def limits(self, tenant: str) -> tuple[int, int]:
        """(templates, bytes) the tenant may keep."""
        q = self.front.policy.of(tenant).quotas
        count = DEFAULT_TEMPLATES if q.templates is None else q.templates
        mb = DEFAULT_TEMPLATE_MB if q.template_mb is None else q.template_mb
        return count, mb << 20

    def job(self, tenant: str, template_id: str, build_id: str) -> Job | None:
        j = self.jobs.get(build_id)
        if j is None:
            j = self._read_back(tenant, build_id)
        if j is None or j.tenant != tenant or j.template_id != template_id:
            return None  # another tenant's build is just unknown (invariant 11)
        return j

    def _read_back(self, tenant: str, build_id: str) -> Job | None:
        """A build an earlier server process started, from the tenant's own area: finished,
        as it ended; still ``waiting``/``building``, that process died under it, so it
        failed ("interrupted by a restart"), and what it left is cleaned up."""
        own = self.tenant(tenant)
        rec = buildstate.load(own, build_id)
        if rec is None:
            return None
        job = Job.from_record(tenant, rec)
        if buildstate.orphaned(rec):
            self._interrupted(own, job)
        elif job.status not in ("ready", "error"):
            return None  # another live server's build: not this one's to show
        self.jobs[build_id] = job
        self.forget_old()
        return job

    @staticmethod
    def _interrupted(own: TenantTemplates, job: Job) -> None:
        job.status = "error"
        job.reason = {"message": buildstate.INTERRUPTED}
        job.say(buildstate.INTERRUPTED, "error")
        work = own.root / "work" / job.build_id
        if work.exists():
            remove_tree(work)
        tpl = own.get(job.template_id)
        if tpl is not None and not tpl.get("tags"):  # never built: it holds no room
            own.delete(job.template_id)
        buildstate.save(own, job.record())

    def recover(self) -> int:
        """At a server's start: every build an earlier process left ``waiting``/``building``
        (it died under them) becomes failed, "interrupted by a restart", and what it left in
        its tenant's area goes; a live server's builds are left alone. Blocking; the count.
        What a dead build left in the layer cache (a step's mounted file system, its loop
        device and image) goes too (invariant 5)."""
        if n := self.store.sweep():
            log.warning("removed what %d dead template build(s) left", n)
        count = 0
        for rec in buildstate.unfinished(self.store.templates / "tenants"):
            tenant = str(rec.get("tenant", ""))
            own = self.tenant(tenant)
            if not tenant or buildstate.load(own, str(rec["buildID"])) != rec:
                continue  # not where its tenant's area is: never acted on
            self._interrupted(own, Job.from_record(tenant, rec))
            count += 1
        return count

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
                    self.store, options, audit=self.front.engine.audit,
                    on_output=job.output,
                )  # fmt: skip
                claimed: list[str] = []

                def claim(tid: str) -> None:  # owned before it is published (invariant 11)
                    tenant.claim(job.template_id, tid)
                    claimed.append(tid)

                builder.on_template_id = claim
                tagged = False
                try:
                    built = await builder.build(plan.defn, None, work)
                    before = dict((tenant.get(job.template_id) or {}).get("tags") or {})
                    tenant.set_tags(job.template_id, job.tags, built.id, job.sizes)
                    tagged = True
                finally:
                    if claimed:
                        with contextlib.suppress(NotFoundError):
                            tenant.claim(job.template_id, None)
                        if not tagged:  # published, then failed: no one's, so it goes
                            await asyncio.to_thread(tenant.drop_if_unused, claimed[-1])
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
            self._save(job)

    def _save(self, job: Job) -> None:
        """The build's status on disk (a failure to write is logged: the build itself stands)."""
        try:
            buildstate.save(self.tenant(job.tenant), job.record())
        except OSError:
            log.exception("template build %s: status not saved", job.build_id)

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

    # -- what the face's routes do ----------------------------------------------------------

    def request(
        self, tenant: str, given: str, extra_tags: list[str], sizes: dict[str, int]
    ) -> dict[str, Any]:
        """A new build of ``given`` (``name`` or ``name:tag``): its ids, names and tags."""
        name, tag = split_name(given)
        if name in RESERVED:
            raise InvalidArgumentError(f"the template name {name!r} is reserved")
        tags = list(dict.fromkeys([tag, *extra_tags]))
        for t in tags:
            split_name(f"{name}:{t}")
        if self.busy(tenant):
            raise QuotaExceededError("a build of this tenant is already running", retry_after=5)
        pending = [j for j in self.jobs.values() if j.tenant == tenant and not j.started]
        for old in pending[: max(0, len(pending) - MAX_PENDING + 1)]:  # never started
            self.jobs.pop(old.build_id, None)
        count, _ = self.limits(tenant)
        rec = self.tenant(tenant).request(name, count)
        self.forget_old()
        build_id = "bld-" + secrets.token_hex(12)
        self.jobs[build_id] = Job(tenant, rec["templateID"], build_id, tags, sizes)
        return {"templateID": rec["templateID"], "buildID": build_id, "name": name, "tags": tags}

    def upload_link(self, tenant: str, template_id: str, files_hash: str) -> tuple[bool, str]:
        """(already uploaded, a one-use upload token) for the tenant's own template;
        NotFoundError for any other."""
        own = self.tenant(tenant)
        if own.get(template_id) is None:
            raise NotFoundError(f"template {template_id[:64]} was not found")
        present = own.has_upload(files_hash)
        mine = [t for t, up in self.uploads.items() if up.tenant == tenant]
        for old in mine[: max(0, len(mine) - MAX_LINKS + 1)]:  # the oldest links go
            self.uploads.pop(old, None)
        token = secrets.token_urlsafe(32)
        self.uploads[token] = Upload(tenant, files_hash, time.time() + UPLOAD_TTL)
        return present, token

    async def receive_upload(self, token: str, chunks: AsyncIterator[bytes]) -> None:
        """Store the archive sent to the link ``token`` (NotFoundError: no such link;
        UploadTooLarge past its cap or the tenant's room)."""
        up = self.uploads.pop(token, None)
        if up is None or up.expires < time.time():
            raise NotFoundError("no such upload link (expired or used)")
        own = self.tenant(up.tenant)
        _, byte_cap = self.limits(up.tenant)
        room = byte_cap - own.bytes_used()
        cap = min(MAX_UPLOAD, max(0, room))
        final = own.upload_path(up.files_hash)
        tmp = final.with_name(f".up-{secrets.token_hex(6)}")
        total = 0
        try:
            with tmp.open("wb") as out:
                async for chunk in chunks:
                    total += len(chunk)
                    if total > cap:
                        if room < MAX_UPLOAD:
                            raise UploadTooLarge(
                                "this tenant's template storage is full", full=True
                            )
                        raise UploadTooLarge("the upload is over 512 MiB", full=False)
                    out.write(chunk)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def start(self, tenant: str, template_id: str, build_id: str, data: dict[str, Any]) -> None:
        """Start the build: what does not map is refused now (InvalidArgumentError)."""
        job = self.job(tenant, template_id, build_id)
        if job is None:
            raise NotFoundError(f"template {template_id[:64]} was not found")
        if job.started:
            raise InvalidArgumentError("this build was started already")
        own = self.tenant(tenant)
        try:
            e2b.plan(data, own.resolve)
        except InvalidArgumentError:
            self.jobs.pop(build_id, None)
            rec = own.get(template_id)
            if rec is not None and not rec.get("tags"):  # never built: it holds no room
                own.delete(template_id)
            raise
        if self.busy(tenant):
            raise QuotaExceededError("a build of this tenant is already running", retry_after=5)
        job.started = True
        self._save(job)  # a restart from here on reads it as interrupted, not unknown
        job.task = asyncio.get_running_loop().create_task(self.run(job, data))

    def status(
        self, tenant: str, template_id: str, build_id: str, offset: int, limit: int,
        level: str | None,
    ) -> dict[str, Any]:  # fmt: skip
        job = self.job(tenant, template_id, build_id)
        if job is None:
            raise NotFoundError(f"template {template_id[:64]} was not found")
        start = max(0, offset - job.first)  # a build read back keeps its last entries
        rows = job.entries[start : start + limit]
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
        return out

    def describe(self, tenant: str, rec: dict[str, Any]) -> dict[str, Any]:
        """A template record as E2B's ``Template`` fields."""
        tags = dict(rec.get("tags") or {})
        sizes = dict(rec.get("sizes") or {})
        meta = self.store.meta(str(tags.get("default") or next(iter(tags.values()), ""))) or {}
        created = _iso(float(rec.get("created", 0)))
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
            "cpuCount": int(sizes.get("cpus", 1)),
            "memoryMB": int(sizes.get("memory_mb", 512)),
            "envdVersion": "0.2.0",
            "createdBy": None,
            "lastSpawnedAt": None,
            "builds": [
                {"buildID": j.build_id, "status": j.status}
                for j in self.jobs.values()
                if j.tenant == tenant and j.template_id == rec["templateID"]
            ],
        }

    def listing(self, tenant: str) -> list[dict[str, Any]]:
        return [self.describe(tenant, rec) for rec in self.tenant(tenant).records()]

    def get(self, tenant: str, template_id: str) -> dict[str, Any]:
        rec = self.tenant(tenant).get(template_id)
        if rec is None:
            raise NotFoundError(f"template {template_id[:64]} was not found")
        return self.describe(tenant, rec)

    async def delete(self, tenant: str, template_id: str) -> bool:
        """Delete the tenant's template (False: not the tenant's); InvalidArgumentError
        while it is being built."""
        own = self.tenant(tenant)
        rec = own.get(template_id)
        if rec is None:
            return False
        if any(j.template_id == rec["templateID"] and j.status in ("waiting", "building")
               and j.started for j in self.jobs.values()):  # fmt: skip
            raise InvalidArgumentError("the template is being built")
        await asyncio.to_thread(own.delete, rec["templateID"])
        return True

    def alias(self, tenant: str, name: str) -> dict[str, Any] | None:
        """E2B's alias lookup: the tenant's own (private) or a host-wide (public) one."""
        if ":" in name:
            return None
        own = self.tenant(tenant)
        rec = own.get(name)
        if rec is not None:
            return {"templateID": rec["templateID"], "public": False}
        if own.resolve(name) is not None:
            return {"templateID": name, "public": True}
        return None

    def sizes_of(self, tenant: str, name: str) -> dict[str, int] | None:
        """The sandbox sizes ``tenant``'s own template ``name`` was built with (``cpuCount``,
        ``memoryMB`` of its build request), or None."""
        rec = self.tenant(tenant).get(name)
        sizes = dict(rec.get("sizes") or {}) if rec is not None else {}
        return {str(k): int(v) for k, v in sizes.items()} or None


def plan_numbers(body: dict[str, Any]) -> tuple[int, ...]:
    """The E2B step number of each moat step (RUN and COPY make one; the rest none)."""
    steps = body.get("steps") or []
    return tuple(i for i, s in enumerate(steps, start=1) if s.get("type") in ("RUN", "COPY"))
