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
Bounds (``moat.engine.tmplbuild``): ``templates`` and ``template_mb`` of the quotas (429 past
them), one queued or running build per tenant, uploads of at most ``MAX_UPLOAD`` bytes, and
the builder's own limits per step (time, CPUs, memory, size cap).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydantic import Field, StrictBool, StrictInt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from moat.engine.api import TemplateBuilds, UploadTooLarge, is_snapshot_id
from moat.errors import InvalidArgumentError, NotFoundError
from moat.server import wire
from moat.server.app import MAX_JSON_BODY, ServerState, read_body, too_large

__all__ = ["template_routes"]

log = logging.getLogger("moat.server")

Make = Callable[[str, Any, list[str]], Route]


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


def template_routes(state: ServerState, r: Make) -> list[Route]:
    """The routes: authenticated ones made by the control plane's ``r``, and the upload."""
    front = state.front
    found: TemplateBuilds | None = getattr(front, "template_builds", None)
    if found is None:  # a clustered server: its nodes keep their own template stores
        return _unavailable(r)
    builds = found

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
        got = builds.request(tenant, given, list(body.tags or []), sizes)
        return JSONResponse(
            {
                "templateID": got["templateID"],
                "buildID": got["buildID"],
                "public": False,
                "names": [got["name"]],
                "tags": got["tags"],
                "aliases": [got["name"]],
            },
            202,
        )

    async def file_link(request: Request, tenant: str) -> Response:
        tid, files_hash = request.path_params["template_id"], request.path_params["hash"]
        try:
            present, token = builds.upload_link(tenant, tid, files_hash)
        except NotFoundError:
            return not_found(tid)
        base = str(request.base_url).rstrip("/")
        return JSONResponse(
            {"present": present, "url": f"{base}/moat/v1/template-uploads/{token}"}, 201
        )

    async def upload(request: Request) -> Response:
        """The upload link's PUT: the body is the archive (no key: the token is the
        authority, unguessable, for one tenant and hash; it works once)."""
        try:
            await builds.receive_upload(request.path_params["token"], request.stream())
        except NotFoundError as exc:
            return wire.error(404, str(exc))
        except UploadTooLarge as exc:
            return wire.error(429, str(exc)) if exc.full else too_large()
        except InvalidArgumentError as exc:
            return wire.error(400, str(exc))
        except OSError:
            log.exception("template upload")
            return wire.error(500, "internal error")
        return Response(status_code=200)

    async def start_build(request: Request, tenant: str) -> Response:
        tid, bid = request.path_params["template_id"], request.path_params["build_id"]
        if builds.job(tenant, tid, bid) is None:
            return not_found(tid)
        body = wire.parse(BuildStartBody, await read_body(request, 4 << 20))
        data = body.model_dump(by_alias=True, exclude_none=True)
        data["steps"] = [s.model_dump(by_alias=True, exclude_none=True) for s in body.steps or []]
        builds.start(tenant, tid, bid, data)
        return Response(status_code=202)

    async def status(request: Request, tenant: str) -> Response:
        tid, bid = request.path_params["template_id"], request.path_params["build_id"]
        q = request.query_params
        offset = wire.int_param(q.get("logsOffset"), "logsOffset", 0, 1 << 20, 0)
        limit = wire.int_param(q.get("limit"), "limit", 1, 100, 100)
        try:
            return JSONResponse(builds.status(tenant, tid, bid, offset, limit, q.get("level")))
        except NotFoundError:
            return not_found(tid)

    async def listing(request: Request, tenant: str) -> Response:
        rows = builds.listing(tenant)
        for row in rows:
            row.pop("builds", None)
        return JSONResponse(rows)

    async def get_one(request: Request, tenant: str) -> Response:
        tid = request.path_params["template_id"]
        try:
            return JSONResponse(builds.get(tenant, tid))
        except NotFoundError:
            return not_found(tid)

    async def delete(request: Request, tenant: str) -> Response:
        tid = request.path_params["template_id"]
        if is_snapshot_id(tid):  # a snapshot is a template on E2B's wire (issue 11)
            if await front.delete_snapshot(tenant, tid):
                return Response(status_code=204)
            return not_found(tid)
        try:
            deleted = await builds.delete(tenant, tid)
        except InvalidArgumentError as exc:
            return wire.error(409, str(exc))
        return Response(status_code=204) if deleted else not_found(tid)

    async def alias(request: Request, tenant: str) -> Response:
        name = request.path_params["alias"]
        found = builds.alias(tenant, name)
        return JSONResponse(found) if found is not None else not_found(name)

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


def _unavailable(r: Make) -> list[Route]:
    """The same paths, each a clear 501 (no template builds through this front door)."""

    async def refuse(request: Request, tenant: str | None = None) -> Response:
        return wire.error(
            501, "template builds are not available on a clustered server (docs/cluster.md)"
        )

    t = "/templates/{template_id}"
    paths = [
        ("/v3/templates", ["POST"]), ("/templates", ["GET"]),
        ("/templates/tags", ["POST", "DELETE"]), ("/templates/aliases/{alias}", ["GET"]),
        (t + "/files/{hash}", ["GET"]), ("/v2" + t + "/builds/{build_id}", ["POST"]),
        (t + "/builds/{build_id}/status", ["GET"]), (t + "/tags", ["GET"]),
        (t, ["GET", "DELETE"]),
    ]  # fmt: skip
    return [r(path, refuse, methods) for path, methods in paths] + [
        Route("/moat/v1/template-uploads/{token}", refuse, methods=["PUT"])
    ]
