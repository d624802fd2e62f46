"""Snapshots and fork over E2B's wire (issue 11; moat.engine.snapshots underneath).

``POST /sandboxes/{id}/snapshots`` (``name``, ``memory``) → 201 ``{snapshotID, names}``;
``GET /snapshots`` (``sandboxID``, ``name``, ``limit``, ``nextToken``; ``x-next-token``);
``DELETE /templates/{id}`` of a snapshot id → 204, 404 when unknown (or another tenant's:
invariant 11; served by ``moat.server.templates``, which owns ``/templates``);
``POST /sandboxes/{id}/fork`` (``timeout``, ``count``) → 201 with one entry per
fork, ``{sandbox}`` or ``{error: {code, message}}``. A create whose ``templateID`` is a snapshot
id starts from it (``start``). Every new sandbox gets fresh access tokens; the source's record
lends only its non-secret names (template id, network fields).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from pydantic import Field, StrictBool, StrictInt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from moat.errors import SandboxError
from moat.model import SandboxInfo, SnapshotInfo
from moat.server import persist, wire
from moat.server.app import MAX_JSON_BODY, Record, ServerState, read_body

__all__ = ["snapshot_routes", "start"]

Make = Callable[[str, Any, list[str]], Route]
_MAX_LIST = 100


class SnapshotBody(wire._Closed):
    name: str | None = Field(default=None, max_length=64)
    memory: StrictBool | None = None


class ForkBody(wire._Closed):
    timeout: StrictInt | None = Field(default=None, ge=1, le=86400)
    count: StrictInt | None = Field(default=None, ge=1, le=20)


def _new_record(state: ServerState, tenant: str, face: dict[str, Any]) -> Record:
    """A new sandbox's record: the face's names, fresh tokens (never the source's)."""
    return persist.record_of(tenant, face, state.new_token(), state.new_token())


async def _registered(state: ServerState, tenant: str, info: SandboxInfo, rec: Record) -> None:
    state.records[info.sandbox_id] = rec
    front = state.front
    try:
        front.set_face(tenant, info.sandbox_id, persist.face_of(rec))
    except SandboxError:
        pass
    if not await front.is_running(tenant, info.sandbox_id):
        state.forget(info.sandbox_id)  # it ended before its record was in: no leak


async def start(
    state: ServerState, tenant: str, snapshot_id: str, timeout: int | None,
    metadata: dict[str, str] | None,
) -> Response:  # fmt: skip
    """A create whose template is a snapshot: a new sandbox from it (201 ``Sandbox``)."""
    front = state.front
    face = await front.snapshot_face(tenant, snapshot_id) or {}
    info = await front.create_from_snapshot(tenant, snapshot_id, timeout=timeout, metadata=metadata)
    rec = _new_record(state, tenant, face)
    await _registered(state, tenant, info, rec)
    return JSONResponse(wire.sandbox_reply(info, rec, state.domain), 201)


def snapshot_routes(
    state: ServerState, r: Make, not_found: Callable[[str], Response]
) -> list[Route]:
    """The routes, made authenticated by the control plane's ``r``."""
    front = state.front

    async def create(request: Request, tenant: str) -> Response:
        sid = request.path_params["sandbox_id"]
        raw = await read_body(request, MAX_JSON_BODY)
        body = wire.parse(SnapshotBody, raw) if raw.strip() else SnapshotBody()
        if state.record(tenant, sid) is None:
            return not_found(sid)
        snap = await front.create_snapshot(tenant, sid, name=body.name, memory=body.memory)
        return JSONResponse(_snapshot_reply(snap), 201)

    async def listing(request: Request, tenant: str) -> Response:
        q = request.query_params
        limit = wire.int_param(q.get("limit"), "limit", 1, _MAX_LIST, _MAX_LIST)
        offset = wire.page_token(q.get("nextToken"), "s")
        rows = await front.list_snapshots(
            tenant, sandbox_id=q.get("sandboxID") or None, name=q.get("name") or None
        )
        page = rows[offset : offset + limit]
        headers = {}
        if offset + limit < len(rows):
            headers["x-next-token"] = base64.urlsafe_b64encode(
                f"s:{offset + limit}".encode()
            ).decode()
        return JSONResponse([_snapshot_reply(s) for s in page], 200, headers=headers)

    async def fork(request: Request, tenant: str) -> Response:
        sid = request.path_params["sandbox_id"]
        raw = await read_body(request, MAX_JSON_BODY)
        body = wire.parse(ForkBody, raw) if raw.strip() else ForkBody()
        source = state.record(tenant, sid)
        if source is None:
            return not_found(sid)
        face = persist.face_of(source)
        got = await front.fork(tenant, sid, body.count or 1, timeout=body.timeout)
        out: list[dict[str, Any]] = []
        for entry in got:
            if isinstance(entry, SandboxInfo):
                rec = _new_record(state, tenant, face)
                await _registered(state, tenant, entry, rec)
                out.append({"sandbox": wire.sandbox_reply(entry, rec, state.domain)})
            else:
                code = wire.status_of(entry)
                out.append({"error": {"code": code, "message": str(entry)}})
        return JSONResponse(out, 201)

    sid = "/sandboxes/{sandbox_id}"
    return [
        r(sid + "/snapshots", create, ["POST"]),
        r("/snapshots", listing, ["GET"]),
        r(sid + "/fork", fork, ["POST"]),
    ]


def _snapshot_reply(snap: SnapshotInfo) -> dict[str, Any]:
    """E2B's ``SnapshotInfo`` (``snapshotID``, ``names``) and moat's own fields beside it (the
    E2B SDK keeps unknown fields aside; moat's HTTP transport reads them)."""
    return {
        "snapshotID": snap.snapshot_id,
        "names": [snap.name] if snap.name else [],
        "moat": {
            "sandboxID": snap.sandbox_id,
            "name": snap.name,
            "tier": snap.tier,
            "memory": snap.memory,
            "size": snap.size,
            "createdAt": wire.iso(snap.created),
        },
    }
