"""Control plane: E2B's REST API (``X-API-Key``), through the front door with the key's tenant.

Another tenant's sandbox id answers exactly like an unknown one (404, same message), on every
route (invariant 11). Pause, connect (resume) and legacy resume go through the front door
(``moat.server.persist``); snapshots and fork: ``moat.server.snapshots``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from moat.egress import Secret
from moat.engine.api import default_template, e2b_template, is_snapshot_id
from moat.errors import InvalidArgumentError, NotFoundError, SandboxError
from moat.server import persist, snapshots, wire
from moat.server.app import MAX_JSON_BODY, BodyTooLarge, Record, ServerState, read_body, too_large
from moat.server.network import policy_of
from moat.server.secrets import LazyStore, binding_of, check_header, secret_routes, stored
from moat.server.templates import template_routes

log = logging.getLogger("moat.server")

Handler = Callable[[Request, str], Awaitable[Response]]

_MAX_LIST = 100


def _not_found(sandbox_id: str) -> Response:
    # One message for unknown, ended and another tenant's: nothing to tell them apart.
    shown = sandbox_id if len(sandbox_id) <= 64 and sandbox_id.isprintable() else "(bad id)"
    return wire.error(404, f"sandbox {shown} was not found")


def _authed(state: ServerState, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate by ``X-API-Key`` and turn moat errors into E2B error bodies."""

    async def endpoint(request: Request) -> Response:
        tenant = state.tenant_of(request)
        if tenant is None:
            return wire.error(401, "invalid or missing API key (X-API-Key)")
        try:
            return await handler(request, tenant)
        except BodyTooLarge:
            return too_large()
        except SandboxError as exc:
            return wire.moat_error(exc)
        except ClientDisconnect:
            raise  # the client left: moat.server.app ends the request quietly
        except Exception:  # the reply must stay safe (invariant 8); details to the log
            log.exception("control plane: %s %s", request.method, request.url.path)
            return wire.error(500, "internal error")

    return endpoint


def control_app(state: ServerState) -> Starlette:
    front = state.front
    secret_store = LazyStore()  # <state dir>/secrets.db beside keys.db, once first used
    state.secret_store = secret_store  # a resume after a restart reads it again

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def network_of(allow_internet: bool | None, net: wire.NetworkBody | None) -> dict[str, Any]:
        """E2B's network fields as moat's policy dict; what moat can't enforce is refused."""
        if net is not None:
            if net.rules or net.dns_servers or net.egress_proxy or net.mask_request_host:
                raise InvalidArgumentError(
                    "network rules, dnsServers, egressProxy and maskRequestHost are not "
                    "supported by moat (use allowOut/denyOut)"
                )
            if net.allow_internet_access is not None and allow_internet is None:
                allow_internet = net.allow_internet_access
        # moat's default is deny-all (invariant 1); E2B's "internet by default" is opt-in here.
        return {
            "allow_out": list(net.allow_out or []) if net else [],
            "deny_out": list(net.deny_out or []) if net else [],
            "internet_access": bool(allow_internet),
            "allow_tcp": list(net.allow_tcp or []) if net else [],
        }

    async def create(request: Request, tenant: str) -> Response:
        body = wire.parse(wire.CreateBody, await read_body(request, MAX_JSON_BODY))
        if body.auto_resume is not None and not _auto_resume_ok(body.auto_resume):
            raise InvalidArgumentError("autoResume must be {'enabled': true|false}")
        if body.mcp or body.volume_mounts:
            raise InvalidArgumentError("mcp and volumeMounts are not supported by moat")
        if is_snapshot_id(body.template_id):  # a snapshot is a template (E2B's shape)
            net = body.network.model_dump(exclude_none=True) if body.network else {}
            # The SDKs send allowInternetAccess=true unless told otherwise: that default is
            # not a request to change the snapshot's network; anything else is refused.
            if (
                body.env_vars
                or body.moat
                or body.allow_internet_access is False
                or any(net.values())
            ):
                raise InvalidArgumentError(
                    "a sandbox started from a snapshot keeps its envVars, network and secrets"
                )
            return await snapshots.start(
                state, tenant, body.template_id, body.timeout, body.metadata
            )
        network = network_of(body.allow_internet_access, body.network)
        policy = policy_of(network)
        network["internet_access"] = policy.internet_access  # as enforced (denyOut 0.0.0.0/0)
        network["allow_tcp"] = policy.to_dict()["allow_tcp"]  # canonical, as enforced
        ext = body.moat or wire.MoatExtension()
        for inline in ext.secrets.values():
            check_header(inline.header)
        secrets = {
            name: Secret(s.value, s.hosts, s.header, s.template) for name, s in ext.secrets.items()
        }
        names: list[str] = []
        if ext.stored_secrets:
            names = list(dict.fromkeys(ext.stored_secrets))
            if set(names) & set(secrets) or len(names) + len(secrets) > 64:
                raise InvalidArgumentError(
                    "storedSecrets must not repeat a name of moat.secrets (64 secrets at most)"
                )
            try:
                secrets.update(stored(secret_store, tenant, names))
            except NotFoundError as exc:
                raise InvalidArgumentError(str(exc)) from None
        kwargs: dict[str, Any] = {
            "timeout": body.timeout,
            "envs": body.env_vars,
            "metadata": body.metadata,
            "network": policy,
            "secrets": secrets or None,
            "on_timeout": "pause" if body.auto_pause else "kill",
            "idle_timeout": ext.idle_timeout,
        }
        if body.template_id in wire.DEFAULT_TEMPLATES:  # base -> base, … (issue 12)
            name = e2b_template(body.template_id)
            # the default itself stays "default": the shape the warm pool keeps (engine.pool)
            kwargs["template"] = "default" if name == default_template() else name
        else:
            own = front.tenant_template(tenant, body.template_id)
            if own is not None:  # the tenant's own template (its name, id or name:tag)
                kwargs["template"] = own
                kwargs["limits"] = front.tenant_template_sizes(tenant, body.template_id)
            elif front.template_exists(body.template_id, tenant):  # host-wide, or "host"
                kwargs["template"] = body.template_id
            else:
                kwargs["profile"] = body.template_id  # a moat profile name is a template too
        if "profile" not in kwargs:  # the tenant's default tier, else the server's
            tier = front.default_tier(tenant) or state.tier
            if tier is not None:
                kwargs["isolation"] = tier
        try:
            config = front.resolve(**kwargs)
        except NotFoundError:
            # No such profile (or no policy file): the template is unknown.
            shown = body.template_id[:64]
            raise InvalidArgumentError(
                f"template {shown!r} was not found (use 'base', 'code-interpreter-v1' or a "
                "moat profile name)"
            ) from None
        info = await front.create(
            tenant,
            config,
            secrets={n: s.value for n, s in secrets.items()},
            sensitive=list(ext.sensitive),
        )
        rec = Record(tenant, state.new_token(), state.new_token(), body.template_id, network)
        rec.public_traffic = bool(body.network and body.network.allow_public_traffic)
        rec.stored = {n: binding_of(secrets[n]) for n in names}
        state.records[info.sandbox_id] = rec
        with contextlib.suppress(SandboxError):  # kept with it if it pauses at its timeout
            front.set_face(tenant, info.sandbox_id, persist.face_of(rec))
        if not await front.is_running(tenant, info.sandbox_id):
            state.forget(info.sandbox_id)  # it ended before its record was in: no leak
        return JSONResponse(wire.sandbox_reply(info, rec, state.domain), 201)

    async def _live(tenant: str, sandbox_id: str) -> tuple[Record, Any] | None:
        rec = state.record(tenant, sandbox_id)
        if rec is None:
            return None
        try:
            if not await front.is_running(tenant, sandbox_id):
                return None
            return rec, await front.info(tenant, sandbox_id)
        except NotFoundError:
            return None

    async def _paused(tenant: str, sandbox_id: str) -> tuple[Record, Any] | None:
        """A paused sandbox of the tenant: a record without tokens (none are valid while it
        is paused) from what the server kept with it, and its info."""
        try:
            face = await front.face_data(tenant, sandbox_id)
            if face is None:
                return None
            info = await front.info(tenant, sandbox_id)
        except NotFoundError:
            return None
        return persist.record_of(tenant, face, "", ""), info

    async def get_info(request: Request, tenant: str) -> Response:
        sid = request.path_params["sandbox_id"]
        found = await _live(tenant, sid) or await _paused(tenant, sid)
        if found is None:
            return _not_found(sid)
        rec, info = found
        return JSONResponse(wire.detail_reply(info, rec))

    async def connect(request: Request, tenant: str) -> Response:
        sid = request.path_params["sandbox_id"]
        body = wire.parse(wire.ConnectBody, await read_body(request, MAX_JSON_BODY))
        return await _connect(tenant, sid, body.timeout, legacy=False)

    async def resume(request: Request, tenant: str) -> Response:
        """E2B's legacy resume: 201 resumed; 409 when it runs already."""
        sid = request.path_params["sandbox_id"]
        body = wire.parse(wire.ResumeBody, await read_body(request, MAX_JSON_BODY))
        return await _connect(tenant, sid, body.timeout, legacy=True)

    async def _connect(tenant: str, sid: str, timeout: int | None, *, legacy: bool) -> Response:
        face = await front.face_data(tenant, sid) if state.record(tenant, sid) is None else None
        if face is None:  # running (or unknown, or another tenant's: one answer)
            found = await _live(tenant, sid)
            if found is None:
                return _not_found(sid)
            if legacy:
                return wire.error(409, f"sandbox {sid} is already running")
            rec, info = found
            if timeout is not None:
                wanted = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=timeout)
                if wanted > info.end_at.astimezone(dt.UTC):  # connect only extends
                    await front.set_timeout(tenant, sid, timeout)
                    info = await front.info(tenant, sid)
            return JSONResponse(wire.sandbox_reply(info, rec, state.domain), 200)
        # after a restart its stored secrets' values come from the store again
        values = persist.stored_values(state, tenant, face)  # the store is this thread's
        info, resumed = await front.connect(tenant, sid, timeout=timeout, secrets=values)
        live = state.record(tenant, sid)
        if live is None:
            live = persist.resumed_record(state, tenant, sid, face)
            state.records[sid] = live
            if not await front.is_running(tenant, sid):
                state.forget(sid)  # it ended before its record was in: no leak
        return JSONResponse(wire.sandbox_reply(info, live, state.domain), 201 if resumed else 200)

    async def pause(request: Request, tenant: str) -> Response:
        """E2B's pause: 204; 409 when paused already; 404 unknown (or another tenant's).
        ``memory`` (E2B's body, or moat's ``?memory=``) asked explicitly is kept or refused
        (PolicyError, 400); left out, the most the tier keeps: processes and memory where it
        can, else the files (docs/persistence.md)."""
        sid = request.path_params["sandbox_id"]
        raw_body = await read_body(request, MAX_JSON_BODY)
        body = wire.parse(wire.PauseBody, raw_body) if raw_body.strip() else wire.PauseBody()
        rec = state.record(tenant, sid)
        if rec is None:
            if await front.face_data(tenant, sid) is not None:
                return wire.error(409, f"sandbox {sid} is already paused")
            return _not_found(sid)
        raw = request.query_params.get("memory")
        if raw not in (None, "true", "false"):
            raise InvalidArgumentError("memory must be true or false")
        memory = body.memory if raw is None else raw == "true"
        if memory is None:
            memory = front.keeps_memory(tenant, sid)
        await front.pause(tenant, sid, memory, face=persist.face_of(rec))
        state.records.pop(sid, None)
        return Response(status_code=204)

    async def kill(request: Request, tenant: str) -> Response:
        sid = request.path_params["sandbox_id"]
        if state.record(tenant, sid) is None:
            if await front.face_data(tenant, sid) is not None:  # paused: its state goes too
                state.paused.pop(sid, None)
                return (
                    Response(status_code=204) if await front.kill(tenant, sid) else _not_found(sid)
                )
            return _not_found(sid)
        killed = await front.kill(tenant, sid)
        state.records.pop(sid, None)
        return Response(status_code=204) if killed else _not_found(sid)

    async def set_timeout(request: Request, tenant: str) -> Response:
        sid = request.path_params["sandbox_id"]
        body = wire.parse(wire.TimeoutBody, await read_body(request, MAX_JSON_BODY))
        if await _live(tenant, sid) is None:
            return _not_found(sid)
        await front.set_timeout(tenant, sid, body.timeout)
        return Response(status_code=204)

    async def update_network(request: Request, tenant: str) -> Response:
        sid = request.path_params["sandbox_id"]
        body = wire.parse(wire.NetworkBody, await read_body(request, MAX_JSON_BODY))
        found = await _live(tenant, sid)
        if found is None:
            return _not_found(sid)
        rec, _ = found
        network = network_of(body.allow_internet_access, body)
        policy = policy_of(network)
        network["internet_access"] = policy.internet_access
        network["allow_tcp"] = policy.to_dict()["allow_tcp"]
        await front.update_network(tenant, sid, policy)
        rec.network = network
        return Response(status_code=204)

    async def list_sandboxes(request: Request, tenant: str) -> Response:
        q = request.query_params
        want = _metadata_filter(q.get("metadata"))
        states = {s for s in (q.get("state") or "running,paused").split(",") if s}
        # "ended" is moat's extension (its SDK's list(state="ended")): only when asked for
        if not states <= {"running", "paused", "ended"}:
            raise InvalidArgumentError("state must be running, paused and/or ended")
        limit = wire.int_param(q.get("limit"), "limit", 1, _MAX_LIST, _MAX_LIST)
        start = wire.page_token(q.get("nextToken"), "o")
        order = q.get("order") or "desc"  # E2B lists the newest first
        if order not in ("asc", "desc"):
            raise InvalidArgumentError("order must be asc or desc")
        after = _time_param(q.get("startedAfter"), "startedAfter")
        template = q.get("template")
        infos = []
        for wanted in sorted(states):
            infos += await front.list_sandboxes(tenant, metadata=want, state=wanted)
        if after is not None:  # inclusive, as E2B's: its own startedAt lists the sandbox
            infos = [i for i in infos if i.started_at >= after]
        recs: dict[str, Record] = {}
        for i in infos:
            rec = state.record(tenant, i.sandbox_id)
            if rec is None and i.state == "paused":
                face = await front.face_data(tenant, i.sandbox_id)
                rec = None if face is None else persist.record_of(tenant, face, "", "")
            if rec is None and i.state == "ended":
                # its wire record went with it: no tokens (nothing can reach it any more)
                rec = Record(tenant, "", "", i.template, {})
            if rec is not None:
                recs[i.sandbox_id] = rec
        infos = [i for i in infos if i.sandbox_id in recs]
        if template:
            infos = [i for i in infos if recs[i.sandbox_id].template_id == template]
        infos.sort(key=lambda i: (i.started_at, i.sandbox_id), reverse=order == "desc")
        page = infos[start : start + limit]
        rows = [wire.detail_reply(info, recs[info.sandbox_id]) for info in page]
        headers = {}
        if start + limit < len(infos):
            headers["x-next-token"] = base64.urlsafe_b64encode(
                f"o:{start + limit}".encode()
            ).decode()
        return JSONResponse(rows, 200, headers=headers)

    async def metrics(request: Request, tenant: str) -> Response:
        sid = request.path_params["sandbox_id"]
        if await _live(tenant, sid) is None:
            return _not_found(sid)
        q = request.query_params
        start = _unix_param(q.get("start"), "start")
        end = _unix_param(q.get("end"), "end")
        if end is not None:  # the SDKs send whole seconds, rounded down: keep that second
            end += dt.timedelta(seconds=1)
        try:
            samples = await front.metrics(tenant, sid, start, end)
        except NotFoundError:
            return _not_found(sid)
        return JSONResponse([wire.metric_line(m) for m in samples])

    async def audit(request: Request, tenant: str) -> Response:
        """moat's own route: the sandbox's audit rows, guarded by the front door (invariant 4);
        another tenant's id is 404 like an unknown one (the front door's check, invariant 11).
        Ended sandboxes answer too (their rows outlive them)."""
        sid = request.path_params["sandbox_id"]
        q = request.query_params
        denied = q.get("denied_only", "false")
        if denied not in ("true", "false"):
            raise InvalidArgumentError("denied_only must be true or false")
        limit = wire.int_param(q.get("limit"), "limit", 1, 10_000, 1000)
        try:
            rows = await front.audit(tenant, sid, denied_only=denied == "true", limit=limit)
        except NotFoundError:
            return _not_found(sid)
        return JSONResponse(rows)

    async def unknown(request: Request, tenant: str) -> Response:
        return wire.error(404, "no such endpoint")

    def r(path: str, handler: Handler, methods: list[str]) -> Route:
        return Route(path, _authed(state, handler), methods=methods)

    sid = "/sandboxes/{sandbox_id}"
    routes = [
        Route("/health", health, methods=["GET"]),
        r("/sandboxes", create, ["POST"]),
        r("/v2/sandboxes", create, ["POST"]),
        r("/v2/sandboxes", list_sandboxes, ["GET"]),
        r("/sandboxes", list_sandboxes, ["GET"]),
        r(sid, get_info, ["GET"]),
        r(sid, kill, ["DELETE"]),
        r(sid + "/connect", connect, ["POST"]),
        r("/v2" + sid + "/connect", connect, ["POST"]),
        r(sid + "/timeout", set_timeout, ["POST"]),
        r(sid + "/network", update_network, ["PUT"]),
        r(sid + "/metrics", metrics, ["GET"]),
        r(sid + "/pause", pause, ["POST"]),
        r(sid + "/resume", resume, ["POST"]),
        *snapshots.snapshot_routes(state, r, _not_found),
        *template_routes(state, r),
        r("/moat/v1" + sid + "/audit", audit, ["GET"]),
        *secret_routes(secret_store, r),
        r("/{rest:path}", unknown, ["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
    return Starlette(routes=routes)


def _auto_resume_ok(value: Any) -> bool:
    """E2B's ``autoResume``: moat always resumes a paused sandbox on connect and ingress."""
    return isinstance(value, dict) and set(value) <= {"enabled"} and value.get("enabled") in (
        True, False, None,
    )  # fmt: skip


def _metadata_filter(raw: str | None) -> dict[str, str]:
    """E2B's ``metadata`` query: the SDK urlencodes ``{quote(k): quote(v)}`` and its HTTP
    client encodes that as a value again: so pairs, then each key and value unquoted once."""
    if not raw:
        return {}
    if len(raw) > 8192:
        raise InvalidArgumentError("metadata filter is too long")
    try:
        pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise InvalidArgumentError("metadata filter must be key=value pairs") from None
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


def _time_param(raw: str | None, name: str) -> dt.datetime | None:
    if not raw:
        return None
    try:
        when = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgumentError(f"{name} must be an ISO 8601 time") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _unix_param(raw: str | None, name: str) -> dt.datetime | None:
    """A time in whole unix seconds (E2B's metrics range)."""
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 11:
        raise InvalidArgumentError(f"{name} must be a unix time in seconds")
    try:
        return dt.datetime.fromtimestamp(int(raw), dt.UTC)
    except (ValueError, OverflowError, OSError):  # past year 9999
        raise InvalidArgumentError(f"{name} must be a unix time in seconds") from None
