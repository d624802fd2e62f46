"""Pure translation for the HTTP transport: moat's calls as ``moat serve``'s wire, and its
replies, errors and events back as moat's model types and exceptions.

No I/O here. What comes back is the server's (trusted by its caller, still checked): model
types are rebuilt with ``from_dict`` (closed schemas), exception classes come from a fixed
table, never from a name the server chose.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping
from typing import Any

from moat.envd import filesystem_pb as fs
from moat.envd import process_pb as pr
from moat.errors import (
    AuditUnavailableError,
    AuthenticationError,
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
from moat.model import (
    TRUST_LEVELS,
    End,
    EntryInfo,
    ErrorEvent,
    Event,
    ExecutionError,
    Limits,
    Output,
    ProcessInfo,
    Result,
    ResultEvent,
    SandboxMetrics,
)
from moat.model import validate as v
from moat.model.config import mounts as parse_mounts

#: Ports of the sandbox plane (E2B's): envd (process, filesystem, /files) and the
#: code interpreter (/execute, /contexts).
ENVD_PORT = "49983"
JUPYTER_PORT = "49999"
#: moat's error header (``moat.server.wire.ERROR_HEADER``): the error's class and fields.
ERROR_HEADER = "Moat-Error"
#: The longest server message passed on (the server's are short; a proxy's page may not be).
_MAX_MESSAGE = 1000
#: Create options the server decides by its own policy: not settable over the wire.
SERVER_CHOSEN = (
    "trust", "mounts", "limits", "gateway_config", "guard", "policy_file", "max_output_bytes",
)  # fmt: skip
#: Error classes the server may name (``moatError``), by name.
_BY_NAME: dict[str, type[SandboxError]] = {
    c.__name__: c
    for c in (
        SandboxError, TimeoutError, NotFoundError, IsolationUnavailableError, PolicyError,
        InvalidArgumentError, SandboxDiedError, LeakBlockedError, AuditUnavailableError,
        AuthenticationError, QuotaExceededError, DiskFullError,
    )
}  # fmt: skip
_BY_STATUS: dict[int, type[SandboxError]] = {
    400: InvalidArgumentError,
    401: AuthenticationError,
    403: PolicyError,
    404: NotFoundError,
    413: InvalidArgumentError,
    422: InvalidArgumentError,
    429: QuotaExceededError,
    501: PolicyError,
    503: IsolationUnavailableError,
    504: TimeoutError,
}
_GUARD_PREFIX = "output blocked by the guard on "
_FILE_TYPES = {
    fs.FileType.FILE: "file",
    fs.FileType.DIRECTORY: "dir",
    fs.FileType.SYMLINK: "symlink",
}


def named(header: str | None) -> dict[str, Any]:
    """The ``Moat-Error`` header's fields (the class's name, labels...), or none."""
    if not header or len(header) > 8192:
        return {}
    try:
        fields = json.loads(header)
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


class Gone(NotFoundError):
    """The edge's answer for a sandbox it can't reach (unknown, killed, ended, another
    tenant's): the transport asks the audit trail why before raising (``ended``)."""


def gone(sandbox_id: str) -> NotFoundError:
    return Gone(f"sandbox {sandbox_id} was not found")


def ended(rows: list[dict[str, Any]], sandbox_id: str) -> SandboxError:
    """What a call on a sandbox that ended raises, from its ``ended`` audit row: as the
    front door raises it (``moat.engine.session.core.ended_error``; test_sdk_http compares
    the two). No row (unknown, another tenant's): not found, like the front door."""
    for row in rows:
        if row.get("kind") == "sandbox" and row.get("result") == "ended":
            reason = str(row.get("reason") or "killed")
            if reason == "timeout":
                return TimeoutError("the sandbox reached the end of its lifetime and was killed")
            if reason.startswith("died"):
                return SandboxDiedError(f"the sandbox is gone ({reason[6:]})")
            return NotFoundError("the sandbox was killed")
    return NotFoundError(f"sandbox {sandbox_id} was not found")


def _message(body: Any, status: int) -> str:
    raw = body.get("message") if isinstance(body, Mapping) else None
    if not isinstance(raw, str) or not raw:
        return f"moat serve answered HTTP {status}"
    return raw[:_MAX_MESSAGE]


def error(
    status: int, body: Any, sandbox_id: str | None = None, retry_after: str | None = None
) -> SandboxError:
    """The moat exception of an error reply (``{"code", "message", "moatError"...}``)."""
    message = _message(body, status)
    named = body.get("moatError") if isinstance(body, Mapping) else None
    if isinstance(named, str) and named in _BY_NAME:
        fields = dict(body) if isinstance(body, Mapping) else {}
        fields.setdefault("retryAfter", retry_after)  # the Retry-After header of a 429
        return build(_BY_NAME[named], message, fields)
    if status == 502:  # E2B's edge: the sandbox is unknown or gone ("... was not found")
        if "was not found" in message:
            return gone(sandbox_id) if sandbox_id else NotFoundError(message)
        return SandboxDiedError(message)
    cls = _BY_STATUS.get(status, SandboxError)
    if cls is QuotaExceededError:
        return QuotaExceededError(message, retry_after=_seconds(retry_after))
    return cls(message)


def build(cls: type[SandboxError], message: str, fields: Mapping[str, Any]) -> SandboxError:
    """``cls`` with the server's message and its structured fields."""
    if cls is LeakBlockedError:
        labels = fields.get("labels")
        channel = fields.get("channel")
        if isinstance(labels, list) and all(isinstance(x, str) for x in labels):
            if isinstance(channel, str):
                return LeakBlockedError(labels, channel)
        return leak(message)
    if cls is TimeoutError:
        return TimeoutError(message, context_restarted=fields.get("contextRestarted") is True)
    if cls is QuotaExceededError:
        return QuotaExceededError(message, retry_after=_seconds(fields.get("retryAfter")))
    return cls(message)


def leak(message: str) -> LeakBlockedError:
    """A LeakBlockedError from its own message (``output blocked by the guard on C: L, L``)."""
    rest = message.removeprefix(_GUARD_PREFIX)
    channel, _, labels = rest.partition(": ")
    return LeakBlockedError([x for x in labels.split(", ") if x], channel)


def _seconds(raw: Any) -> float | None:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw)
        except ValueError:
            return None
    else:
        return None
    return value if math.isfinite(value) and value >= 0 else None


# -- create --------------------------------------------------------------------------------


def network_body(network: Any, allow_internet_access: bool) -> dict[str, Any]:
    """moat's network policy (a NetworkPolicy, its dict, or None) as E2B's create fields."""
    if network is None:
        policy: Mapping[str, Any] = {}
    elif isinstance(network, Mapping):
        policy = network
    elif callable(getattr(network, "to_dict", None)):
        policy = network.to_dict()
    else:
        raise PolicyError("network policy must be a NetworkPolicy or a dict")
    unknown = set(policy) - {"allow_out", "deny_out", "internet_access", "allow_tcp"}
    if unknown:
        raise PolicyError("unknown network policy keys: " + ", ".join(sorted(map(str, unknown))))
    internet = policy.get("internet_access", False)
    if not isinstance(internet, bool) or not isinstance(allow_internet_access, bool):
        raise PolicyError("internet_access must be a bool")
    body: dict[str, Any] = {
        "allowOut": [str(p) for p in policy.get("allow_out") or ()],
        "denyOut": [str(p) for p in policy.get("deny_out") or ()],
        "allow_internet_access": internet or allow_internet_access,
    }
    if policy.get("allow_tcp"):  # moat's extension of E2B's network object (issue 15)
        body["allowTcp"] = [str(p) for p in policy["allow_tcp"]]
    return body


def create_body(options: Mapping[str, Any]) -> dict[str, Any]:
    """``AsyncSandbox.create``'s arguments as the body of ``POST /v2/sandboxes`` with moat's
    extension (brokered secrets, sensitive values). What the server's policy decides is
    refused here (invariant 7: never silently dropped)."""
    # Bad values are the embedded SDK's InvalidArgumentError first; good ones the server's.
    if options.get("trust") is not None:
        v.choice("trust", options["trust"], TRUST_LEVELS)
    if options.get("limits") is not None:
        Limits.parse(options["limits"])
    if options.get("mounts") is not None:
        parse_mounts(options["mounts"])
    for name in SERVER_CHOSEN:
        if options.get(name) is not None:
            raise PolicyError(
                f"{name} is set by the server's policy in moat serve; it can't be given over "
                "the HTTP transport (name a profile with profile=...)"
            )
    template = options.get("template") or "default"
    profile = options.get("profile")
    if profile is not None and template != "default":
        raise InvalidArgumentError("give a template or a profile, not both")
    template_id = v.text("profile" if profile is not None else "template", profile or template, 256)
    net = network_body(options.get("network"), options.get("allow_internet_access", False))
    body: dict[str, Any] = {"templateID": template_id, "network": net}
    # Sent only when asked for: absent is moat's deny-all, and a start from a snapshot (which
    # keeps its own network) refuses any request to change it.
    if net.pop("allow_internet_access"):
        body["allow_internet_access"] = True
    timeout = options.get("timeout")
    if timeout is not None:  # the wire takes whole seconds: never less than asked
        body["timeout"] = math.ceil(v.number("timeout", timeout, 1, v.MAX_TIMEOUT))
    if options.get("metadata") is not None:
        body["metadata"] = v.metadata(options["metadata"])
    if options.get("envs") is not None:
        body["envVars"] = v.envs(options["envs"])
    ext: dict[str, Any] = {}
    secrets = options.get("secrets")
    if secrets:
        if not isinstance(secrets, Mapping):
            raise InvalidArgumentError("secrets must map variable names to Secret instances")
        ext["secrets"] = {name: _secret(s) for name, s in secrets.items()}
    sensitive = options.get("sensitive")
    if sensitive:
        # the server takes values only (their labels are the guard's default there)
        values = list(sensitive) if isinstance(sensitive, (list, tuple, Mapping)) else None
        if values is None or not all(isinstance(x, str) for x in values):
            raise InvalidArgumentError("sensitive must be a list of str or a dict of str")
        ext["sensitive"] = values
    on_timeout = options.get("on_timeout") or "kill"
    v.choice("on_timeout", on_timeout, ("kill", "pause"))
    if on_timeout == "pause":
        body["autoPause"] = True  # E2B's word for it
    idle = options.get("idle_timeout")
    if idle is not None:
        ext["idle_timeout"] = math.ceil(v.number("idle_timeout", idle, 1, v.MAX_TIMEOUT))
    if ext:
        body["moat"] = ext
    return body


def _secret(secret: Any) -> dict[str, Any]:
    try:  # a moat.Secret (validated when made): its fields, value included, to the server
        return {
            "value": secret.value,
            "hosts": list(secret.hosts),
            "header": secret.header,
            "template": secret.template,
        }
    except AttributeError:
        raise InvalidArgumentError("secrets must be Secret instances") from None


# -- code interpreter ------------------------------------------------------------------------


class ExecLines:
    """``/execute``'s NDJSON lines as moat's events (one instance per call)."""

    def __init__(self) -> None:
        self.count: int | None = None
        self.ended = False

    def event(self, line: Mapping[str, Any]) -> Event | None:
        """The event of one line (None for keepalives and bookkeeping); a moat failure of
        the call (``moatError``) is raised, as the front door's iterator raises it."""
        kind = line.get("type")
        if kind in ("stdout", "stderr"):
            text = line.get("text")
            if not isinstance(text, str):
                raise SandboxError("moat serve sent a malformed output line")
            return Output("stdout" if kind == "stdout" else "stderr", text)
        if kind == "result":
            return ResultEvent(Result.from_dict({k: x for k, x in line.items() if k != "type"}))
        if kind == "error":
            named = line.get("moatError")
            value = line.get("value")
            if isinstance(named, str):
                cls = _BY_NAME.get(named, SandboxError)
                raise build(cls, str(value)[:_MAX_MESSAGE], line)
            fields = {k: line.get(k) for k in ("name", "value", "traceback")}
            return ErrorEvent(ExecutionError.from_dict(fields))
        if kind == "number_of_executions":
            count = line.get("execution_count")
            self.count = count if isinstance(count, int) and not isinstance(count, bool) else None
            return None
        if kind == "end_of_execution":
            self.ended = True
            return End(truncated=line.get("truncated") is True, execution_count=self.count)
        return None  # keepalive, or a line type this SDK doesn't know yet


# -- envd ---------------------------------------------------------------------------------------


def entry(e: fs.EntryInfo | None) -> EntryInfo:
    """envd's entry as moat's (the server guarded its names: invariant 6)."""
    if e is None:
        raise SandboxError("moat serve sent no entry")
    ts = e.modified_time
    when = dt.datetime.fromtimestamp(ts.seconds if ts else 0, dt.UTC)
    if ts is not None and ts.nanos:
        when += dt.timedelta(microseconds=round(ts.nanos / 1000))
    return EntryInfo(
        name=e.name,
        path=e.path,
        type=_FILE_TYPES.get(e.type, "other"),
        size=int(e.size),
        mode=int(e.mode),
        permissions=e.permissions,
        modified_time=when,
        symlink_target=e.symlink_target if e.has_field("symlink_target") else None,
    )


def process_info(p: pr.ProcessInfo) -> ProcessInfo:
    """envd's process as moat's: the command line the server wrapped in ``bash -l -c``."""
    config = p.config
    args = list(config.args) if config is not None else []
    cmd = args[-1] if len(args) >= 2 and args[-2] == "-c" else " ".join(args)
    return ProcessInfo(pid=int(p.pid), cmd=cmd)


def metric(raw: Any) -> SandboxMetrics:
    """One sample of ``GET /sandboxes/{id}/metrics`` (E2B's ``SandboxMetric``), checked."""
    if not isinstance(raw, Mapping):
        raise SandboxError("the server sent a malformed metrics sample")
    try:
        when = dt.datetime.fromisoformat(str(raw["timestamp"]).replace("Z", "+00:00"))
        disk = raw.get("diskUsed")
        return SandboxMetrics(
            timestamp=when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC),
            cpu_count=int(raw["cpuCount"]),
            cpu_used_pct=float(raw["cpuUsedPct"]),
            mem_used=int(raw["memUsed"]),
            mem_total=int(raw["memTotal"]),
            mem_cache=int(raw.get("memCache") or 0),
            disk_used=None if disk is None else int(disk),
            disk_total=int(raw["diskTotal"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SandboxError("the server sent a malformed metrics sample") from exc
