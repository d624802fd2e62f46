"""``HttpTransport``: the front door of a ``moat serve``, over its wire, for one API key.

``Sandbox.create(api_url=..., api_key=...)`` (or ``MOAT_API_URL``/``MOAT_API_KEY``) sends
every call here: the control plane is E2B's REST (``X-API-Key``) with moat's extension of the
create body and moat's own audit route; a sandbox's calls carry ``E2b-Sandbox-Id``,
``E2b-Sandbox-Port`` and its ``X-Access-Token`` to ``/execute``, ``/contexts``, ``/files`` and
envd's Connect RPC services (connectrpc's generated clients, ``moat.envd``). Results and
errors come back as the embedded SDK's classes (``moat.model``, ``moat.errors``).

Trust domain: caller. This module loads neither the engine nor the server: only the model,
the errors, the envd stubs, httpx and connectrpc (tests/test_layering.py).
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import datetime as dt
import json
import os
import threading
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, Literal, NoReturn

import httpx
import pyqwest
from connectrpc.code import Code
from connectrpc.codec import proto_json_codec
from connectrpc.errors import ConnectError
from protobuf import Oneof
from pyqwest.httpx import AsyncPyqwestTransport

from moat.envd import filesystem_pb as fs
from moat.envd import process_pb as pr
from moat.envd.filesystem_connect import FilesystemClient
from moat.envd.process_connect import ProcessClient
from moat.errors import (
    AuthenticationError,
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
    LANGUAGES,
    USERS,
    Context,
    End,
    EntryInfo,
    Event,
    FilesystemEvent,
    Output,
    ProcessInfo,
    PtyOutput,
    PtySize,
    SandboxInfo,
    SandboxMetrics,
    SnapshotInfo,
    Started,
)
from moat.model import validate as v
from moat.sdk.transport import Transport
from moat.sdk.transport import _wire as w

__all__ = ["HttpTransport", "shared"]

#: Seconds to wait for a connection, and for a reply that isn't a stream.
CALL_TIMEOUT = 120.0
#: Seconds of silence on a stream before it counts as dead (the server sends keepalives
#: every 5 s on /execute; envd streams at the interval asked for below).
STREAM_IDLE = 120.0
_KEEPALIVE_S = "30"
_SIGNALS = {"SIGKILL": pr.Signal.SIGKILL, "SIGTERM": pr.Signal.SIGTERM}
_RPC_ERRORS: dict[Code, type[SandboxError]] = {
    Code.INVALID_ARGUMENT: InvalidArgumentError,
    Code.NOT_FOUND: NotFoundError,
    Code.PERMISSION_DENIED: PolicyError,
    Code.UNIMPLEMENTED: PolicyError,
    Code.DEADLINE_EXCEEDED: TimeoutError,
    Code.UNAVAILABLE: SandboxDiedError,
    Code.UNAUTHENTICATED: AuthenticationError,
    Code.RESOURCE_EXHAUSTED: QuotaExceededError,
    Code.FAILED_PRECONDITION: InvalidArgumentError,
}


@dataclass
class _Clients:
    """The HTTP clients of one event loop (neither library's may cross loops)."""

    loop: asyncio.AbstractEventLoop
    http: httpx.AsyncClient
    raw: pyqwest.Client
    rpc_http: pyqwest.HTTPTransport
    process: ProcessClient
    files: FilesystemClient

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.process.close()
        await self.files.close()
        await self.rpc_http.aclose()


class HttpTransport(Transport):
    """Calls a ``moat serve`` at ``api_url`` as the tenant of ``api_key``."""

    def __init__(self, api_url: str | None = None, api_key: str | None = None) -> None:
        url = api_url or os.environ.get("MOAT_API_URL") or ""
        key = api_key or os.environ.get("MOAT_API_KEY") or ""
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InvalidArgumentError("api_url (or MOAT_API_URL) must be an http(s) URL")
        if not key:
            raise AuthenticationError("an API key is required (api_key or MOAT_API_KEY)")
        if not key.isprintable() or len(key) > 256:
            raise InvalidArgumentError("api_key must be printable text")
        self.api_url = url.rstrip("/")
        self._key = key
        self._tokens: dict[str, str] = {}  # sandbox id -> its access token (X-Access-Token)
        self._clients: _Clients | None = None

    def __repr__(self) -> str:  # never the key
        return f"HttpTransport({self.api_url!r})"

    # -- plumbing ---------------------------------------------------------------------------

    def _c(self) -> _Clients:
        loop = asyncio.get_running_loop()
        if self._clients is None or self._clients.loop is not loop:
            # One connection pool (pyqwest's, in Rust) under both clients: httpx's API for
            # the REST and streaming routes, connectrpc's for envd. httpx's own pool costs
            # ~1 ms more per call on this 2-core host (bench/bench_sdk_http.py).
            # A read that waits longer than STREAM_IDLE fails the call (streams get
            # keepalives far more often); no cap on a whole call (code may run for hours).
            rpc_http = pyqwest.HTTPTransport(
                connect_timeout=10.0,
                read_timeout=STREAM_IDLE,
                follow_redirects=False,
                enable_otel=False,
            )
            http = httpx.AsyncClient(
                base_url=self.api_url,
                timeout=httpx.Timeout(CALL_TIMEOUT, connect=10.0),
                follow_redirects=False,
                transport=AsyncPyqwestTransport(rpc_http),
            )
            client = pyqwest.Client(rpc_http)
            # JSON (what the server offers), no compression (it accepts none).
            opts: dict[str, Any] = {
                "codec": proto_json_codec(),
                "send_compression": None,
                "accept_compression": (),
                "http_client": client,
            }
            self._clients = _Clients(
                loop,
                http,
                client,
                rpc_http,
                ProcessClient(self.api_url, **opts),
                FilesystemClient(self.api_url, **opts),
            )
        return self._clients

    async def aclose(self) -> None:
        """Close this loop's connections (sandboxes live on until killed or timed out)."""
        if self._clients is not None and self._clients.loop is asyncio.get_running_loop():
            clients, self._clients = self._clients, None
            await clients.aclose()

    def _unreachable(self, exc: BaseException) -> NoReturn:
        raise SandboxError(
            f"moat serve at {self.api_url} is unreachable ({type(exc).__name__})"
        ) from exc

    async def _control(
        self, method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """A control-plane call; an error reply raised as moat's exception."""
        try:
            resp = await self._c().http.request(
                method, path, json=body, params=params, headers={"X-API-Key": self._key}
            )
        except httpx.HTTPError as exc:
            self._unreachable(exc)
        if resp.status_code >= 400:
            raise self._error(resp)
        return resp

    def _error(self, resp: httpx.Response, sandbox_id: str | None = None) -> SandboxError:
        return self._failed(resp.status_code, resp.headers, resp.content, sandbox_id)

    @staticmethod
    def _failed(
        status: int, headers: Mapping[str, str], content: bytes, sandbox_id: str | None
    ) -> SandboxError:
        try:
            body = json.loads(content)
        except ValueError:
            body = None
        named = w.named(headers.get(w.ERROR_HEADER.lower()))  # httpx's are case-blind too
        if isinstance(body, dict) and named:
            body = {**named, **body}
        return w.error(status, body, sandbox_id, headers.get("retry-after"))

    @staticmethod
    def _sid(sandbox_id: str) -> str:
        sid = v.sandbox_id(sandbox_id)
        if sid is None:  # as the front door answers a malformed id (and nothing reaches a URL)
            raise NotFoundError("sandbox (malformed id) was not found")
        return sid

    async def _token(self, sid: str) -> str:
        token = self._tokens.get(sid)
        if token is None:  # a sandbox this transport didn't create: connect for its token
            try:
                resp = await self._control("POST", f"/sandboxes/{sid}/connect", {})
            except NotFoundError:
                raise await self._why(w.gone(sid), sid) from None
            reply = resp.json()
            token = reply.get("envdAccessToken")
            if not isinstance(token, str):
                raise SandboxError("moat serve sent no access token")
            self._tokens[sid] = token
        return token

    async def _plane(
        self, sandbox_id: str, port: str, user: str = "user"
    ) -> tuple[str, dict[str, str]]:
        sid = self._sid(sandbox_id)
        headers = {
            "E2b-Sandbox-Id": sid,
            "E2b-Sandbox-Port": port,
            "X-Access-Token": await self._token(sid),
        }
        if _user(user) != "user":  # envd's shape: Basic auth naming the user, no password
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:".encode()).decode()
        return sid, headers

    async def _sandbox_call(
        self, sandbox_id: str, port: str, method: str, path: str, **kwargs: Any
    ) -> httpx.Response:
        sid, headers = await self._plane(sandbox_id, port)
        try:
            resp = await self._c().http.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            self._unreachable(exc)
        if resp.status_code >= 400:
            raise await self._why(self._error(resp, sid), sid)
        return resp

    async def _why(self, exc: SandboxError, sid: str) -> SandboxError:
        """``exc``; for the edge's "not found", why the sandbox is gone (its audit trail,
        tenant-scoped: another tenant's stays plain not found, invariant 11)."""
        if not isinstance(exc, w.Gone):
            return exc
        try:
            rows = await self.audit(sid, limit=100)
        except SandboxError:
            rows = []
        return w.ended(rows, sid)

    def _rpc_error(self, exc: ConnectError, sid: str) -> SandboxError:
        message = exc.message[: w._MAX_MESSAGE]
        if exc.code is Code.UNAVAILABLE and "was not found" in message:
            return w.gone(sid)  # the edge's 502: unknown, killed or ended
        if exc.code is Code.PERMISSION_DENIED and message.startswith(w._GUARD_PREFIX):
            return w.leak(message)
        cls = _RPC_ERRORS.get(exc.code, SandboxError)
        return cls(message)

    async def _rpc(self, sid: str, call: Any) -> Any:
        try:
            return await call
        except ConnectError as exc:
            if isinstance(exc.__cause__, asyncio.CancelledError):
                raise asyncio.CancelledError from None  # connectrpc made it an error: undo
            if isinstance(exc.__cause__, builtins.TimeoutError):
                self._unreachable(exc.__cause__)  # connectrpc's own: a read past STREAM_IDLE
            raise await self._why(self._rpc_error(exc, sid), sid) from None
        except (pyqwest.ReadError, pyqwest.WriteError, pyqwest.ConnectTimeout) as exc:
            self._unreachable(exc)
        except builtins.TimeoutError as exc:  # a read past STREAM_IDLE (moat's are raised above)
            self._unreachable(exc)

    # -- lifecycle ---------------------------------------------------------------------------

    async def create(self, **options: Any) -> SandboxInfo:
        isolation = options.pop("isolation", None)
        if isolation is not None:
            v.choice("isolation", isolation, ("container", "gvisor", "microvm"))
        body = w.create_body(options)
        reply = (await self._control("POST", "/v2/sandboxes", body)).json()
        sid, token = reply.get("sandboxID"), reply.get("envdAccessToken")
        if not isinstance(sid, str) or not isinstance(token, str):
            raise SandboxError("moat serve's create reply lacks the sandbox id or token")
        self._tokens[sid] = token
        info = await self.info(sid)
        if isolation is not None and info.tier != isolation:
            # The server's policy chose another tier: never a silent downgrade (invariant 7).
            await self.kill(sid)
            raise IsolationUnavailableError(
                f"moat serve runs this sandbox on the {info.tier} tier, not {isolation}"
            )
        return info

    async def kill(self, sandbox_id: str) -> bool:
        sid = v.sandbox_id(sandbox_id)
        if sid is None:
            return False
        try:
            await self._control("DELETE", f"/sandboxes/{sid}")
        except NotFoundError:
            return False
        finally:
            self._tokens.pop(sid, None)
        return True

    async def set_timeout(self, sandbox_id: str, seconds: float) -> None:
        sid = self._sid(sandbox_id)
        value = v.number("seconds", seconds, 1, 86400)
        await self._control("POST", f"/sandboxes/{sid}/timeout", {"timeout": round(value)})

    async def info(self, sandbox_id: str) -> SandboxInfo:
        sid = self._sid(sandbox_id)
        reply = (await self._control("GET", f"/sandboxes/{sid}")).json()
        return _info(reply)

    async def metrics(
        self, sandbox_id: str, start: dt.datetime | None, end: dt.datetime | None
    ) -> list[SandboxMetrics]:
        sid = self._sid(sandbox_id)
        params: dict[str, str] = {}
        for name, bound in (("start", start), ("end", end)):
            if bound is not None:
                if not isinstance(bound, dt.datetime) or bound.utcoffset() is None:
                    raise InvalidArgumentError(f"{name} must be a timezone-aware datetime")
                params[name] = str(int(bound.timestamp()))  # whole seconds on E2B's wire
        reply = (await self._control("GET", f"/sandboxes/{sid}/metrics", params=params)).json()
        if not isinstance(reply, list):
            raise SandboxError("the server's metrics reply is not a list")
        out = [w.metric(m) for m in reply]
        # The wire has whole seconds: keep exactly the caller's range.
        return [
            m for m in out
            if (start is None or m.timestamp >= start) and (end is None or m.timestamp <= end)
        ]  # fmt: skip

    async def is_running(self, sandbox_id: str) -> bool:
        try:
            return (await self.info(sandbox_id)).state == "running"
        except NotFoundError:
            return False

    async def pause(self, sandbox_id: str, memory: bool) -> None:
        sid = self._sid(sandbox_id)
        if not isinstance(memory, bool):
            raise InvalidArgumentError("memory must be a bool")
        await self._control("POST", f"/sandboxes/{sid}/pause", {"memory": memory})
        self._tokens.pop(sid, None)  # a resumed sandbox gets new access tokens

    async def connect(
        self,
        sandbox_id: str,
        timeout: float | None = None,
        secrets: Mapping[str, str] | None = None,
    ) -> SandboxInfo:
        sid = self._sid(sandbox_id)
        if secrets:
            raise PolicyError(
                "over moat serve, a paused sandbox's secrets are held by the server; "
                "resume it without secret values"
            )
        body: dict[str, Any] = {}
        if timeout is not None:
            body["timeout"] = round(v.number("timeout", timeout, 1, 86400))
        reply = (await self._control("POST", f"/sandboxes/{sid}/connect", body)).json()
        token = reply.get("envdAccessToken") if isinstance(reply, dict) else None
        if not isinstance(token, str):
            raise SandboxError("moat serve sent no access token")
        self._tokens[sid] = token
        return await self.info(sid)

    async def create_snapshot(
        self, sandbox_id: str, name: str | None, memory: bool | None
    ) -> SnapshotInfo:
        sid = self._sid(sandbox_id)
        body: dict[str, Any] = {}
        if name is not None:
            body["name"] = name
        if memory is not None:
            if not isinstance(memory, bool):
                raise InvalidArgumentError("memory must be a bool")
            body["memory"] = memory
        return _snapshot((await self._control("POST", f"/sandboxes/{sid}/snapshots", body)).json())

    async def list_snapshots(
        self, sandbox_id: str | None = None, name: str | None = None
    ) -> builtins.list[SnapshotInfo]:
        params: dict[str, str] = {"limit": "100"}
        if sandbox_id is not None:
            params["sandboxID"] = v.text("sandbox_id", sandbox_id, 64)
        if name is not None:
            params["name"] = v.text("name", name, 64)
        out: builtins.list[SnapshotInfo] = []
        for _ in range(1000):  # pages of 100: bounded
            resp = await self._control("GET", "/snapshots", params=params)
            rows = resp.json()
            if not isinstance(rows, list):
                raise SandboxError("the server's snapshot list is not a list")
            out += [_snapshot(r) for r in rows]
            token = resp.headers.get("x-next-token")
            if not token:
                break
            params["nextToken"] = token
        return out

    async def delete_snapshot(self, snapshot_id: str) -> bool:
        if not isinstance(snapshot_id, str) or not snapshot_id.startswith("snap-"):
            return False
        try:
            await self._control("DELETE", f"/templates/{urllib.parse.quote(snapshot_id, safe='')}")
        except NotFoundError:
            return False
        return True

    async def fork(
        self, sandbox_id: str, count: int, timeout: float | None
    ) -> builtins.list[SandboxInfo | SandboxError]:
        sid = self._sid(sandbox_id)
        body: dict[str, Any] = {"count": v.integer("count", count, 1, 20)}
        if timeout is not None:
            body["timeout"] = round(v.number("timeout", timeout, 1, 86400))
        rows = (await self._control("POST", f"/sandboxes/{sid}/fork", body)).json()
        if not isinstance(rows, list):
            raise SandboxError("the server's fork reply is not a list")
        out: builtins.list[SandboxInfo | SandboxError] = []
        for row in rows:
            box = row.get("sandbox") if isinstance(row, dict) else None
            if isinstance(box, dict):
                fid, token = box.get("sandboxID"), box.get("envdAccessToken")
                if isinstance(fid, str) and isinstance(token, str):
                    self._tokens[fid] = token
                    out.append(await self.info(fid))
                    continue
            err = row.get("error") if isinstance(row, dict) else None
            code = err.get("code") if isinstance(err, dict) else None
            out.append(w.error(code if isinstance(code, int) else 500, err))
        return out

    async def list_sandboxes(
        self, metadata: Mapping[str, str] | None = None, state: str | None = "running"
    ) -> list[SandboxInfo]:
        if state not in ("running", "paused", "ended", None):
            raise InvalidArgumentError("state must be running, paused or ended")
        want = v.metadata(metadata)
        wire_state = "running,paused" if state is None else state
        params: dict[str, str] = {"state": wire_state, "limit": "100"}
        if want:  # E2B's form: the pairs url-encoded, each key and value quoted once more
            params["metadata"] = urllib.parse.urlencode(
                {urllib.parse.quote(k): urllib.parse.quote(x) for k, x in want.items()}
            )
        out: list[SandboxInfo] = []
        for _ in range(10_000):  # pages of 100; a server that never ends a listing can't hang us
            resp = await self._control("GET", "/v2/sandboxes", params=params)
            out.extend(_info(row) for row in resp.json())
            token = resp.headers.get("x-next-token")
            if not token:
                return out
            params["nextToken"] = token
        raise SandboxError("moat serve's listing did not end")

    def guard(self, sandbox_id: str) -> Any:
        raise PolicyError(
            "a sandbox's guard lives in the server's process: over moat serve, give its "
            "values at create (sensitive=...)"
        )

    async def update_network(self, sandbox_id: str, network: Any) -> None:
        sid = self._sid(sandbox_id)
        body = w.network_body(network, False)
        await self._control("PUT", f"/sandboxes/{sid}/network", body)

    async def audit(
        self, sandbox_id: str, denied_only: bool = False, limit: int = 1000
    ) -> list[dict[str, Any]]:
        sid = self._sid(sandbox_id)
        limit = v.integer("limit", limit, 1, 10_000)  # the server's bound
        params = {"denied_only": "true" if denied_only else "false", "limit": str(limit)}
        rows = (await self._control("GET", f"/moat/v1/sandboxes/{sid}/audit", None, params)).json()
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise SandboxError("moat serve sent a malformed audit reply")
        return rows

    # -- code and contexts ---------------------------------------------------------------------

    async def run_code(  # an async generator: the iterator the seam asks for
        self,
        sandbox_id: str,
        code: str,
        language: str,
        context: str,
        timeout: float | None,
        envs: Mapping[str, str] | None,
    ) -> AsyncIterator[Event]:
        code = v.text("code", code)
        lang = v.choice("language", language, LANGUAGES)
        ctx = v.context_id(context)
        body: dict[str, Any] = {"code": code, "env_vars": v.envs(envs)}
        if timeout is not None:
            body["timeout"] = v.timeout("timeout", timeout)
        # The default context is named by its language; another by its id (its language is
        # the one it was made with).
        if ctx == "default":
            body["language"] = lang
        else:
            body["context_id"] = ctx
        sid, headers = await self._plane(sandbox_id, w.JUPYTER_PORT)
        headers["Content-Type"] = "application/json"
        content = json.dumps(body).encode()
        lines = w.ExecLines()
        # pyqwest's client itself (not through httpx: ~0.5 ms less per call here). No limit on
        # the whole call (the engine's timeout applies); the per-read limit catches a dead
        # server.
        client = self._c().raw
        try:
            async with client.stream(
                "POST", self.api_url + "/execute", headers=headers, content=content
            ) as resp:
                if resp.status >= 400:
                    reply = await _read(resp, 1 << 20)
                    heads = {k.lower(): x for k, x in resp.headers.items()}
                    failed = self._failed(resp.status, heads, reply, sid)
                    raise await self._why(failed, sid)
                async for raw in _lines(resp):
                    try:
                        line = json.loads(raw)
                    except ValueError:
                        raise SandboxError("moat serve sent a malformed line") from None
                    if not isinstance(line, dict):
                        raise SandboxError("moat serve sent a malformed line")
                    event = lines.event(line)
                    if event is not None:
                        yield event
                    if lines.ended:
                        return
        except SandboxError:
            raise  # moat's (a TimeoutError is a builtins.TimeoutError too: not below)
        except _IO_ERRORS as exc:
            await self._ended_under(sid, exc)
        await self._ended_under(sid, None)

    async def _ended_under(self, sid: str, exc: BaseException | None) -> NoReturn:
        """A stream that stopped before its end: the sandbox went away, or the server did."""
        try:
            running = await self.is_running(sid)
        except SandboxError:
            running = True  # the server itself is gone: say that
        if not running:
            raise await self._why(w.gone(sid), sid) from None
        if isinstance(exc, SandboxError):
            raise exc
        if exc is not None:
            self._unreachable(exc)
        raise SandboxDiedError("the stream from moat serve ended before the call did")

    async def create_context(self, sandbox_id: str, language: str, cwd: str | None) -> Context:
        body = {"language": v.choice("language", language, LANGUAGES), "cwd": cwd}
        if cwd is not None:
            body["cwd"] = v.path(cwd)
        resp = await self._sandbox_call(sandbox_id, w.JUPYTER_PORT, "POST", "/contexts", json=body)
        return Context.from_dict(resp.json())

    async def list_contexts(self, sandbox_id: str) -> list[Context]:
        resp = await self._sandbox_call(sandbox_id, w.JUPYTER_PORT, "GET", "/contexts")
        rows = resp.json()
        if not isinstance(rows, list):
            raise SandboxError("moat serve sent a malformed context list")
        return [Context.from_dict(r) for r in rows]

    async def restart_context(self, sandbox_id: str, context: str) -> None:
        ctx = v.context_id(context)
        await self._sandbox_call(sandbox_id, w.JUPYTER_PORT, "POST", f"/contexts/{ctx}/restart")

    async def remove_context(self, sandbox_id: str, context: str) -> None:
        ctx = v.context_id(context)
        await self._sandbox_call(sandbox_id, w.JUPYTER_PORT, "DELETE", f"/contexts/{ctx}")

    # -- commands ----------------------------------------------------------------------------

    async def start_command(
        self,
        sandbox_id: str,
        cmd: str,
        envs: Mapping[str, str] | None,
        cwd: str | None,
        stdin: bool,
        user: str = "user",
    ) -> _Command:
        cmd = v.text("cmd", cmd)
        config = pr.ProcessConfig(
            cmd="/bin/bash",
            args=["-l", "-c", cmd],
            envs=v.envs(envs),
            cwd=v.path(cwd) if cwd is not None else None,
        )
        if not isinstance(stdin, bool):
            raise InvalidArgumentError("stdin must be a bool")
        sid, headers = await self._plane(sandbox_id, w.ENVD_PORT, user)
        headers["Keepalive-Ping-Interval"] = _KEEPALIVE_S
        stream = self._c().process.start(
            pr.StartRequest(process=config, stdin=stdin), headers=headers
        )
        return await _Command.begin(self, sid, stream)

    async def connect_command(self, sandbox_id: str, pid: int) -> _Command:
        pid = v.pid(pid)
        sid, headers = await self._plane(sandbox_id, w.ENVD_PORT)
        headers["Keepalive-Ping-Interval"] = _KEEPALIVE_S
        stream = self._c().process.connect(
            pr.ConnectRequest(process=_selector(pid)), headers=headers
        )
        return await _Command.begin(self, sid, stream)

    async def send_stdin(self, sandbox_id: str, pid: int, data: bytes, eof: bool) -> None:
        if not isinstance(data, bytes):
            raise InvalidArgumentError("data must be bytes")
        sid, headers = await self._plane(sandbox_id, w.ENVD_PORT)
        process = self._c().process
        if data:
            request = pr.SendInputRequest(
                process=_selector(v.pid(pid)), input=pr.ProcessInput(input=_oneof("stdin", data))
            )
            await self._rpc(sid, process.send_input(request, headers=headers))
        if eof:
            closing = pr.CloseStdinRequest(process=_selector(v.pid(pid)))
            await self._rpc(sid, process.close_stdin(closing, headers=headers))

    async def signal(self, sandbox_id: str, pid: int, signal: str = "SIGKILL") -> bool:
        v.choice("signal", signal, ("SIGKILL", "SIGTERM", "SIGINT", "SIGHUP"))
        if signal not in _SIGNALS:
            raise PolicyError(f"moat serve sends SIGKILL and SIGTERM only, not {signal}")
        sid, headers = await self._plane(sandbox_id, w.ENVD_PORT)
        request = pr.SendSignalRequest(process=_selector(v.pid(pid)), signal=_SIGNALS[signal])
        try:
            await self._rpc(sid, self._c().process.send_signal(request, headers=headers))
        except NotFoundError:
            return False  # the command had ended (a gone sandbox is the edge's 502 instead)
        return True

    async def list_commands(self, sandbox_id: str) -> list[ProcessInfo]:
        sid, headers = await self._plane(sandbox_id, w.ENVD_PORT)
        reply = await self._rpc(sid, self._c().process.list(pr.ListRequest(), headers=headers))
        return [w.process_info(p) for p in reply.processes]

    # -- watches -----------------------------------------------------------------------------

    async def watch_dir(
        self, sandbox_id: str, path: str, recursive: bool, include_entry: bool
    ) -> _Watch:
        for name, flag in (("recursive", recursive), ("include_entry", include_entry)):
            if not isinstance(flag, bool):
                raise InvalidArgumentError(f"{name} must be a bool")
        sid, headers = await self._plane(sandbox_id, w.ENVD_PORT)
        # E2B's polling form: the server holds the watch (bounded) under an id until removed;
        # it starts now, so events after this call returns are never missed.
        request = fs.CreateWatcherRequest(
            path=v.path(path), recursive=recursive, include_entry=include_entry
        )
        reply = await self._rpc(sid, self._c().files.create_watcher(request, headers=headers))
        if not isinstance(reply.watcher_id, str) or not reply.watcher_id:
            raise SandboxError("moat serve sent no watcher id")
        return _Watch(self, sid, reply.watcher_id)

    # -- terminals ---------------------------------------------------------------------------

    async def start_pty(
        self,
        sandbox_id: str,
        size: PtySize,
        cmd: str | None,
        envs: Mapping[str, str] | None,
        cwd: str | None,
        user: str = "user",
    ) -> _Command:
        # E2B's shape: Start with pty{size}; no cmd is the SDKs' interactive login shell.
        args = ["-i", "-l"] if cmd is None else ["-l", "-c", v.text("cmd", cmd)]
        config = pr.ProcessConfig(
            cmd="/bin/bash",
            args=args,
            envs=v.envs(envs),
            cwd=v.path(cwd) if cwd is not None else None,
        )
        sid, headers = await self._plane(sandbox_id, w.ENVD_PORT, user)
        headers["Keepalive-Ping-Interval"] = _KEEPALIVE_S
        stream = self._c().process.start(
            pr.StartRequest(process=config, pty=_pty(size)), headers=headers
        )
        return await _Command.begin(self, sid, stream)

    async def send_pty_input(self, sandbox_id: str, pid: int, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise InvalidArgumentError("data must be bytes")
        sid, headers = await self._plane(sandbox_id, w.ENVD_PORT)
        request = pr.SendInputRequest(
            process=_selector(v.pid(pid)), input=pr.ProcessInput(input=_oneof("pty", data))
        )
        await self._rpc(sid, self._c().process.send_input(request, headers=headers))

    async def resize_pty(self, sandbox_id: str, pid: int, size: PtySize) -> None:
        sid, headers = await self._plane(sandbox_id, w.ENVD_PORT)
        request = pr.UpdateRequest(process=_selector(v.pid(pid)), pty=_pty(size))
        await self._rpc(sid, self._c().process.update(request, headers=headers))

    # -- files -------------------------------------------------------------------------------

    async def read_file(
        self, sandbox_id: str, path: str, format: Literal["text", "bytes"], user: str = "user"
    ) -> str | bytes:
        fmt = v.choice("format", format, ("text", "bytes"))
        params = {"path": v.path(path), "username": _user(user)}
        resp = await self._sandbox_call(sandbox_id, w.ENVD_PORT, "GET", "/files", params=params)
        data = resp.content
        return data if fmt == "bytes" else data.decode("utf-8", "replace")

    async def write_file(
        self, sandbox_id: str, path: str, data: str | bytes | IO[Any], user: str = "user"
    ) -> EntryInfo:
        path = v.path(path)
        user = _user(user)
        content: Any
        if isinstance(data, str):
            content = data.encode("utf-8")
        elif isinstance(data, (bytes, bytearray, memoryview)):
            content = bytes(data)
        elif hasattr(data, "read"):
            content = _chunks(data)  # streamed: chunked transfer, never whole in memory here
        else:
            raise InvalidArgumentError("data must be str, bytes or a readable file object")
        await self._upload(sandbox_id, path, content, user)
        return await self.stat(sandbox_id, path, user)

    async def _upload(self, sandbox_id: str, path: str, content: Any, user: str) -> None:
        sid, headers = await self._plane(sandbox_id, w.ENVD_PORT)
        headers["Content-Type"] = "application/octet-stream"
        params = {"path": path, "username": user}
        try:
            resp = await self._c().http.post(
                "/files", params=params, content=content, headers=headers
            )
        except httpx.HTTPError as exc:
            self._unreachable(exc)
        if resp.status_code >= 400:
            raise await self._why(self._error(resp, sid), sid)

    async def list_dir(
        self, sandbox_id: str, path: str, depth: int, user: str = "user"
    ) -> list[EntryInfo]:
        depth = int(v.number("depth", depth, 1, 32))
        sid, headers = await self._plane(sandbox_id, w.ENVD_PORT, user)
        request = fs.ListDirRequest(path=v.path(path), depth=depth)
        reply = await self._rpc(sid, self._c().files.list_dir(request, headers=headers))
        return [w.entry(e) for e in reply.entries]

    async def stat(self, sandbox_id: str, path: str, user: str = "user") -> EntryInfo:
        sid, headers = await self._plane(sandbox_id, w.ENVD_PORT, user)
        request = fs.StatRequest(path=v.path(path))
        reply = await self._rpc(sid, self._c().files.stat(request, headers=headers))
        return w.entry(reply.entry)

    async def move(
        self, sandbox_id: str, path: str, destination: str, user: str = "user"
    ) -> EntryInfo:
        sid, headers = await self._plane(sandbox_id, w.ENVD_PORT, user)
        request = fs.MoveRequest(source=v.path(path), destination=v.path(destination))
        reply = await self._rpc(sid, self._c().files.move(request, headers=headers))
        return w.entry(reply.entry)

    async def remove(self, sandbox_id: str, path: str, user: str = "user") -> None:
        # envd removes like ``rm -rf`` (a missing path is no error); the front door raises
        # NotFoundError for one: so does this transport.
        await self.stat(sandbox_id, path, user)
        sid, headers = await self._plane(sandbox_id, w.ENVD_PORT, user)
        request = fs.RemoveRequest(path=v.path(path))
        await self._rpc(sid, self._c().files.remove(request, headers=headers))

    async def make_dir(self, sandbox_id: str, path: str, user: str = "user") -> bool:
        sid, headers = await self._plane(sandbox_id, w.ENVD_PORT, user)
        request = fs.MakeDirRequest(path=v.path(path))
        try:
            await self._c().files.make_dir(request, headers=headers)
        except ConnectError as exc:
            if exc.code is Code.ALREADY_EXISTS:
                return False
            raise await self._why(self._rpc_error(exc, sid), sid) from None
        return True


class _Command:
    """A command's envd stream as the front door's ``CommandStream``: its pid (from the
    stream's first event), then Started, Output... and End."""

    def __init__(self, transport: HttpTransport, sid: str, pid: int, rest: Any) -> None:
        self.pid = pid
        self._t = transport
        self._sid = sid
        self._rest = rest

    @classmethod
    async def begin(cls, transport: HttpTransport, sid: str, stream: Any) -> _Command:
        it = stream.__aiter__()
        while True:
            try:
                first = await transport._rpc(sid, anext(it))
            except StopAsyncIteration:
                await transport._ended_under(sid, None)
            event = first.event.event if first.event is not None else None
            if event is not None and event.field == "start":
                return cls(transport, sid, int(event.value.pid), it)
            if event is None or event.field != "keepalive":
                await it.aclose()
                raise SandboxError("moat serve's process stream did not start with its pid")

    async def events(self) -> AsyncIterator[Event]:
        yield Started(self.pid)
        it = self._rest
        try:
            while True:
                try:
                    reply = await self._t._rpc(self._sid, anext(it))
                except StopAsyncIteration:
                    break
                except SandboxError as exc:
                    if isinstance(exc, (LeakBlockedError, TimeoutError, PolicyError)):
                        raise
                    await self._t._ended_under(self._sid, exc)
                event = reply.event.event if reply.event is not None else None
                if event is None or event.field in ("keepalive", "start"):
                    continue
                if event.field == "data":
                    out = event.value.output
                    if out is not None and out.field in ("stdout", "stderr"):
                        yield Output(out.field, bytes(out.value).decode("utf-8", "replace"))
                    elif out is not None and out.field == "pty":
                        yield PtyOutput(bytes(out.value))
                elif event.field == "end":
                    yield End(exit_code=int(event.value.exit_code))
                    return
        finally:
            with contextlib.suppress(BaseException):
                await it.aclose()
        await self._t._ended_under(self._sid, None)


class _Watch:
    """A directory watch held by the server (E2B's polling form) as a ``WatchEvents``."""

    #: Polling intervals of ``events()``: quick while events come, backing off when idle.
    POLL_S = (0.05, 0.5)

    def __init__(self, transport: HttpTransport, sid: str, watcher_id: str) -> None:
        self._t = transport
        self._sid = sid
        self._id = watcher_id
        self._done = False

    async def take(self) -> list[FilesystemEvent]:
        if self._done:
            return []
        _, headers = await self._t._plane(self._sid, w.ENVD_PORT)
        request = fs.GetWatcherEventsRequest(watcher_id=self._id)
        try:
            reply = await self._t._rpc(
                self._sid, self._t._c().files.get_watcher_events(request, headers=headers)
            )
        except QuotaExceededError as exc:  # the server's word for lost events (overflow)
            self._done = True
            if "events were lost" in str(exc):
                return [FilesystemEvent(name="", type="overflow")]
            raise
        except NotFoundError:
            self._done = True  # the watch ended (its directory or the sandbox gone)
            return []
        return [_fs_event(e) for e in reply.events]

    async def events(self) -> AsyncIterator[FilesystemEvent]:
        wait = self.POLL_S[0]
        while not self._done:
            got = await self.take()
            for event in got:
                yield event
            wait = self.POLL_S[0] if got else min(wait * 2, self.POLL_S[1])
            if not self._done:
                await asyncio.sleep(wait)

    async def stop(self) -> None:
        if self._done:
            return
        self._done = True
        _, headers = await self._t._plane(self._sid, w.ENVD_PORT)
        request = fs.RemoveWatcherRequest(watcher_id=self._id)
        with contextlib.suppress(NotFoundError):
            await self._t._rpc(
                self._sid, self._t._c().files.remove_watcher(request, headers=headers)
            )


#: envd's event types as the front door names them.
_FS_EVENTS = {
    fs.EventType.CREATE: "create", fs.EventType.WRITE: "write", fs.EventType.REMOVE: "remove",
    fs.EventType.RENAME: "rename", fs.EventType.CHMOD: "chmod",
}  # fmt: skip


def _fs_event(e: fs.FilesystemEvent) -> FilesystemEvent:
    kind = _FS_EVENTS.get(e.type)
    if kind is None or not isinstance(e.name, str):
        raise SandboxError("moat serve sent a malformed watch event")
    entry = w.entry(e.entry) if e.entry is not None else None
    return FilesystemEvent(name=e.name, type=kind, entry=entry)  # type: ignore[arg-type]


#: What pyqwest raises when the server can't be reached or a stream breaks.
_IO_ERRORS = (
    pyqwest.ReadError,
    pyqwest.WriteError,
    pyqwest.RemoteProtocolError,
    pyqwest.StreamError,
    ConnectionError,
    builtins.TimeoutError,
)


async def _read(resp: pyqwest.Response, cap: int) -> bytes:
    """A response body, at most ``cap`` bytes of it (an error reply)."""
    data = bytearray()
    async for chunk in resp.content:
        data += chunk
        if len(data) > cap:
            break
    return bytes(data[:cap])


async def _lines(resp: pyqwest.Response) -> AsyncIterator[bytes]:
    """A streamed body's non-empty lines (NDJSON)."""
    buf = bytearray()
    async for chunk in resp.content:
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", start)) != -1:
            if end > start:
                yield bytes(buf[start:end])
            start = end + 1
        del buf[:start]
    if buf.strip():
        yield bytes(buf)


def _oneof(field: str, value: Any) -> Any:
    return Oneof(field, value)


def _pty(size: PtySize) -> pr.PTY:
    if not isinstance(size, PtySize):
        raise InvalidArgumentError("size must be a PtySize(cols, rows)")
    # The wire's uint32 range here; the server checks the real bounds (INVALID_ARGUMENT).
    cols = v.integer("cols", size.cols, 0, 0xFFFFFFFF)
    rows = v.integer("rows", size.rows, 0, 0xFFFFFFFF)
    return pr.PTY(size=pr.PTY.Size(cols=cols, rows=rows))


def _selector(pid: int) -> pr.ProcessSelector:
    return pr.ProcessSelector(selector=_oneof("pid", pid))


def _snapshot(row: Any) -> SnapshotInfo:
    """A snapshot from moat serve's reply (E2B's ``snapshotID`` and moat's fields)."""
    extra = row.get("moat") if isinstance(row, dict) else None
    if not isinstance(extra, dict) or not isinstance(row.get("snapshotID"), str):
        raise SandboxError("moat serve sent a malformed snapshot record")
    try:
        name = extra.get("name")
        return SnapshotInfo(
            snapshot_id=row["snapshotID"],
            sandbox_id=str(extra["sandboxID"]),
            name=name if isinstance(name, str) else None,
            tier=str(extra["tier"]),
            memory=extra["memory"] is True,
            size=int(extra["size"]),
            created=dt.datetime.fromisoformat(str(extra["createdAt"]).replace("Z", "+00:00")),
        )
    except (KeyError, TypeError, ValueError):
        raise SandboxError("moat serve sent a malformed snapshot record") from None


def _info(row: Any) -> SandboxInfo:
    if not isinstance(row, dict) or not isinstance(row.get("moat"), dict):
        raise SandboxError("moat serve sent a malformed sandbox record")
    return SandboxInfo.from_dict(row["moat"])


async def _chunks(f: IO[Any], size: int = 1 << 16) -> AsyncIterator[bytes]:
    """A readable file object's content, chunk by chunk (str chunks as UTF-8)."""
    while True:
        chunk = await asyncio.to_thread(f.read, size)
        if not chunk:
            return
        yield chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)


_shared: dict[tuple[str, str], HttpTransport] = {}
_shared_mu = threading.Lock()


def shared(api_url: str | None = None, api_key: str | None = None) -> HttpTransport:
    """One transport per server and key, so a program's sandboxes share its connections."""
    probe = HttpTransport(api_url, api_key)  # validates, and reads the environment once
    with _shared_mu:
        return _shared.setdefault((probe.api_url, probe._key), probe)


def _user(user: str) -> str:
    """``user`` or ``root`` (docs/users.md); anything else is refused here, typed."""
    if not isinstance(user, str) or user not in USERS:
        raise InvalidArgumentError(f"user must be one of {', '.join(map(repr, USERS))}")
    return user
