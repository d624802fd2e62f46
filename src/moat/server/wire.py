"""E2B wire shapes: request bodies (validated with pydantic), replies, and error bodies.

Pure translation between E2B's JSON (camelCase, as in its OpenAPI spec) and moat's model;
no engine calls here.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from pydantic import ValidationError as ValidationError
from starlette.responses import JSONResponse, Response

from moat.errors import (
    AuditUnavailableError,
    CapacityError,
    DiskFullError,
    InvalidArgumentError,
    IsolationUnavailableError,
    LeakBlockedError,
    NotFoundError,
    PolicyError,
    QuotaExceededError,
    SandboxDiedError,
    SandboxError,
    TimeoutError,
)
from moat.model import Context, ExecutionError, Result, SandboxInfo, SandboxMetrics

#: The envd version moat advertises: the SDKs gate features on it (E2B-WIRE.md §2b). 0.5.7
#: switches on octet-stream and gzip uploads, 0.6.2 file metadata (``X-Metadata-*``), 0.6.3
#: the entry in watch events, 0.6.4 ``allowNetworkMounts`` (accepted: moat mounts no network
#: filesystems).
ENVD_VERSION = "0.6.4"
#: Templates the SDKs name by default: moat.engine.templating.e2b_template maps them.
DEFAULT_TEMPLATES = frozenset({"base", "code-interpreter-v1", "default"})
CLIENT_ID = "moat"

_Str = StrictStr


class _Closed(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class NetworkBody(_Closed):
    """E2B's ``network``: moat enforces allowOut/denyOut; the rest must be left unset."""

    allow_out: list[_Str] | None = Field(default=None, alias="allowOut", max_length=1000)
    deny_out: list[_Str] | None = Field(default=None, alias="denyOut", max_length=1000)
    allow_public_traffic: StrictBool | None = Field(default=None, alias="allowPublicTraffic")
    mask_request_host: _Str | None = Field(default=None, alias="maskRequestHost")
    rules: dict[_Str, Any] | None = None
    dns_servers: list[_Str] | None = Field(default=None, alias="dnsServers")
    egress_proxy: Any = Field(default=None, alias="egressProxy")
    https_ports: list[StrictInt] | None = Field(default=None, alias="httpsPorts")
    allow_internet_access: StrictBool | None = None
    #: moat's extension: raw TCP destinations, ``host:port`` (issue 15)
    allow_tcp: list[_Str] | None = Field(default=None, alias="allowTcp", max_length=1000)


class MoatSecret(_Closed):
    """moat's extension: a brokered secret (the sandbox sees a placeholder, invariant 3)."""

    value: _Str
    hosts: list[_Str] = Field(max_length=64)
    header: _Str | None = "Authorization"
    template: _Str = "{value}"


class MoatExtension(_Closed):
    """The ``moat`` key of the create body: what E2B's wire has no word for."""

    secrets: dict[_Str, MoatSecret] = Field(default_factory=dict, max_length=64)
    #: names of the tenant's stored secrets (``/secrets``) to broker into this sandbox
    stored_secrets: list[_Str] = Field(default_factory=list, alias="storedSecrets", max_length=64)
    sensitive: list[_Str] = Field(default_factory=list, max_length=1000)
    #: seconds without a call, output or traffic before the timeout's action (issue 11)
    idle_timeout: StrictInt | None = Field(default=None, ge=1, le=86400)


class CreateBody(_Closed):
    template_id: _Str = Field(alias="templateID", max_length=256)
    timeout: StrictInt | None = Field(default=None, ge=1, le=86400)
    metadata: dict[_Str, _Str] | None = None
    env_vars: dict[_Str, _Str] | None = Field(default=None, alias="envVars")
    allow_internet_access: StrictBool | None = None
    network: NetworkBody | None = None
    auto_pause: StrictBool | None = Field(default=None, alias="autoPause")
    auto_resume: Any = Field(default=None, alias="autoResume")
    secure: StrictBool | None = None
    mcp: Any = None
    volume_mounts: list[Any] | None = Field(default=None, alias="volumeMounts")
    moat: MoatExtension | None = None


class TimeoutBody(_Closed):
    #: 0: the timeout's action now (E2B's ``set_timeout(0)``)
    timeout: StrictInt = Field(ge=0, le=86400)


class ConnectBody(_Closed):
    timeout: StrictInt | None = Field(default=None, ge=1, le=86400)


class PauseBody(_Closed):
    """E2B's ``SandboxPauseRequest``: ``memory`` (full or filesystem snapshot)."""

    memory: StrictBool | None = None
    require_healthy_guest: StrictBool | None = Field(default=None, alias="requireHealthyGuest")


class ResumeBody(_Closed):
    """E2B's legacy resume (``autoPause`` there sets what its next timeout does)."""

    timeout: StrictInt | None = Field(default=None, ge=1, le=86400)
    auto_pause: StrictBool | None = Field(default=None, alias="autoPause")


class ExecuteBody(_Closed):
    code: _Str = Field(max_length=1 << 20)
    context_id: _Str | None = None
    language: _Str | None = None
    env_vars: dict[_Str, _Str] | None = None
    #: moat's extension: the engine's timeout of this run (E2B's SDKs leave it unset and time
    #: out by leaving); moat's SDK sends it so a timeout raises as in embedded use.
    timeout: float | None = Field(default=None, ge=0.001, le=86400)


class ContextBody(_Closed):
    language: _Str | None = None
    cwd: _Str | None = Field(default=None, max_length=4096)


_M = TypeVar("_M", bound=BaseModel)


def parse(model: type[_M], raw: bytes) -> _M:
    """A body as ``model``; InvalidArgumentError (400) for malformed JSON or wrong types."""
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InvalidArgumentError("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidArgumentError(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """pydantic's complaint without the offending input (it may be long or hostile)."""
    first = exc.errors(include_input=False, include_url=False)[:3]
    parts = [".".join(str(x) for x in e["loc"]) + ": " + str(e["msg"])[:120] for e in first]
    return "invalid request body (" + "; ".join(parts) + ")"


# -- replies ---------------------------------------------------------------------------------


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """E2B's error body: ``{"code": int, "message": str}``."""
    return JSONResponse({"code": status, "message": message}, status, headers=dict(headers or {}))


#: moat's error header: what moat's own SDK raises (E2B's body shape stays as it is).
ERROR_HEADER = "Moat-Error"


def error_fields(exc: SandboxError) -> dict[str, Any]:
    """moat's keys of an error (the ``Moat-Error`` header's JSON, or an error line's keys):
    the class's name, so moat's own SDK raises the very class the front door raised (the
    E2B SDKs ignore them), and its safe structured fields (guard labels, never content:
    invariant 8)."""
    out: dict[str, Any] = {"moatError": type(exc).__name__}
    if isinstance(exc, LeakBlockedError):
        out["labels"] = list(exc.labels)
        out["channel"] = exc.channel
    if isinstance(exc, TimeoutError):
        out["contextRestarted"] = exc.context_restarted
    return out


def status_of(exc: SandboxError) -> int:
    """The HTTP status the SDKs expect for a moat error (message already safe, invariant 8)."""
    if isinstance(exc, InvalidArgumentError):
        return 400
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, LeakBlockedError):
        return 403
    if isinstance(exc, QuotaExceededError):
        return 429  # the SDKs raise RateLimitException
    if isinstance(exc, PolicyError):
        return 501 if "lacks the capability" in str(exc) else 400
    if isinstance(exc, (IsolationUnavailableError, AuditUnavailableError, CapacityError)):
        return 503  # the host can't run (or audit) a sandbox now: an operator must act
    if isinstance(exc, TimeoutError):
        return 504
    if isinstance(exc, SandboxDiedError):
        return 502
    if isinstance(exc, DiskFullError):
        return 507  # the SDKs' NotEnoughSpaceException
    if "already running code" in str(exc) or "already paused" in str(exc):
        return 409  # the context is busy; the sandbox is paused already
    return 500


def moat_error(exc: SandboxError) -> Response:
    status = status_of(exc)
    headers = {"Should-Retry": "false"} if status in (502, 503, 504) else {}
    if isinstance(exc, CapacityError):  # a full cluster frees room: the SDKs retry with backoff
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    headers[ERROR_HEADER] = json.dumps(error_fields(exc), ensure_ascii=True)
    if isinstance(exc, QuotaExceededError):  # always a Retry-After (whole seconds, >= 1)
        wait = exc.retry_after if exc.retry_after is not None else 1.0
        headers["Retry-After"] = str(max(1, math.ceil(wait)))
    return error(status, str(exc), headers)


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


class _Tokens(Protocol):
    token: str
    traffic: str
    template_id: str
    network: dict[str, Any]


def sandbox_reply(info: SandboxInfo, rec: _Tokens, domain: str | None = None) -> dict[str, Any]:
    """``Sandbox`` (create and connect); ``domain``: what ``get_host`` appends."""
    return {
        "templateID": rec.template_id,
        "sandboxID": info.sandbox_id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": rec.token,
        "trafficAccessToken": rec.traffic,
        "alias": rec.template_id,
        "domain": domain,
    }


def detail_reply(info: SandboxInfo, rec: _Tokens) -> dict[str, Any]:
    """``SandboxDetail`` / ``ListedSandbox``."""
    limits = info.limits
    network = rec.network
    return {
        **sandbox_reply(info, rec),
        "startedAt": iso(info.started_at),
        "endAt": iso(info.end_at),
        "cpuCount": max(1, round(limits.cpus)),
        "memoryMB": limits.memory_mb,
        "diskSizeMB": limits.disk_mb,
        # E2B's two states; "ended" (moat's extension) only in a listing that asked for it
        "state": info.state if info.state in ("paused", "ended") else "running",
        "metadata": dict(info.metadata),
        "allowInternetAccess": bool(network.get("internet_access")),
        "network": {
            "allowOut": list(network.get("allow_out", ())),
            "denyOut": list(network.get("deny_out", ())),
            # moat's extension, only where used (E2B's shape otherwise)
            **({"allowTcp": list(network["allow_tcp"])} if network.get("allow_tcp") else {}),
        },
        "moat": info.to_dict(),  # moat's SandboxInfo as is (tier, limits): moat's own SDK
    }


def now_iso() -> str:
    return iso(dt.datetime.now(dt.UTC))


def result_line(r: Result) -> dict[str, Any]:
    """A displayed value as the code interpreter's ``result`` line (None fields omitted)."""
    out: dict[str, Any] = {"type": "result"}
    for key in ("text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "javascript"):
        value = getattr(r, key)
        if value is not None:
            out[key] = value
    if r.json is not None:
        out["json"] = r.json
    if r.data is not None:
        out["data"] = r.data
    if r.chart is not None:
        out["chart"] = r.chart
    if r.extra:
        out["extra"] = dict(r.extra)
    out["is_main_result"] = bool(r.is_main_result)
    return out


def error_line(e: ExecutionError) -> dict[str, Any]:
    return {"type": "error", "name": e.name, "value": e.value, "traceback": e.traceback}


def metric_line(m: SandboxMetrics) -> dict[str, Any]:
    """One sample in E2B's ``SandboxMetric`` shape; ``diskUsed`` is null where the host
    can't see the sandbox's disk (moat never reports the sandbox's own word for it)."""
    return {
        "timestamp": iso(m.timestamp),
        "timestampUnix": int(m.timestamp.timestamp()),
        "cpuCount": m.cpu_count,
        "cpuUsedPct": m.cpu_used_pct,
        "memUsed": m.mem_used,
        "memTotal": m.mem_total,
        "memCache": m.mem_cache,
        "diskUsed": m.disk_used,
        "diskTotal": m.disk_total,
    }


def context_reply(c: Context) -> dict[str, Any]:
    return {"id": c.id, "language": c.language, "cwd": c.cwd}


def int_param(raw: str | None, name: str, lo: int, hi: int, default: int) -> int:
    """A query parameter's integer in ``[lo, hi]`` (``default`` when absent or empty);
    InvalidArgumentError (400) otherwise."""
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise InvalidArgumentError(f"{name} must be an integer from {lo} to {hi}")
    return int(raw)


def page_token(raw: str | None, kind: str) -> int:
    """The offset in a listing's ``nextToken`` (ours: base64 of ``<kind>:<offset>``; 0 when
    absent); InvalidArgumentError (400) for anything else."""
    if not raw:
        return 0
    try:
        text = base64.urlsafe_b64decode(raw.encode("ascii")).decode("ascii")
    except (ValueError, UnicodeError):
        raise InvalidArgumentError("bad nextToken") from None
    head = f"{kind}:"
    if not text.startswith(head) or not text[len(head) :].isdigit() or len(text) > 12:
        raise InvalidArgumentError("bad nextToken")
    return int(text[len(head) :])
