"""Sandbox plane: what E2B serves inside a sandbox, served by the host through the front door.

Every request names its sandbox (``E2b-Sandbox-Id``) and must carry that sandbox's access
token (``X-Access-Token``). A wrong or missing token answers exactly like an unknown or
killed sandbox (502, "... was not found", the text the SDKs key on): without the token a
caller can't tell another tenant's sandbox from none (invariant 11). Port 49999 is the code
interpreter (``/execute`` NDJSON stream, ``/contexts``); 49983 is envd (``/files``,
``/health``, and the Connect RPC services of ``moat.server.rpc``, admitted here the same way).
Everything read back from a sandbox has passed the guard in the front door (invariant 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moat.errors import InvalidArgumentError, NotFoundError, SandboxDiedError, SandboxError
from moat.model import LANGUAGES, End, ErrorEvent, Event, Output, ResultEvent
from moat.server import cut_log, httpproto, rpc, wire
from moat.server.app import (
    MAX_JSON_BODY,
    BodyTooLarge,
    Receive,
    Record,
    Scope,
    Send,
    ServerState,
    read_body,
    too_large,
)
from moat.server.files import FileRoutes

log = logging.getLogger("moat.server")

ENVD_PORT = "49983"
JUPYTER_PORT = "49999"
#: A keepalive line every this many seconds of silence (the SDKs ignore it; a dead client
#: shows up as a failed write, which interrupts the code).
KEEPALIVE_S = 5.0
#: How long /execute waits for the first event before committing to a 200 stream (so an
#: unknown context or a bad argument still gets its 4xx).
_FIRST_EVENT_S = 1.0
#: How long /execute waits for a busy context to become free before answering 409.
_BUSY_WAIT_S = 10.0
_LANGUAGE_ALIASES = {
    "py": "python", "python3": "python", "sh": "bash", "shell": "bash",
    "javascript": "js", "node": "js", "typescript": "ts",
}  # fmt: skip

Handler = Callable[[Request, Record, str], Awaitable[Response]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def gone(sandbox_id: str) -> Response:
    """The edge's answer for a sandbox that is not (or no longer) reachable."""
    shown = sandbox_id if len(sandbox_id) <= 64 and sandbox_id.isprintable() else "(bad id)"
    return JSONResponse(
        {"sandboxId": shown, "message": "The sandbox was not found", "code": 502}, 502
    )


def _language(value: str | None) -> str:
    lang = (value or "python").lower()
    lang = _LANGUAGE_ALIASES.get(lang, lang)
    if lang not in LANGUAGES:
        raise InvalidArgumentError(
            f"language {value!r:.40} is not supported (moat runs: {', '.join(LANGUAGES)})"
        )
    return lang


async def admit(state: ServerState, headers: Headers, path: str = "") -> Record | Response:
    """The sandbox a request may reach (its headers name it and carry its token, and it is
    running), or the reply that refuses it: exactly an unknown sandbox's (invariant 11)."""
    sid = headers.get("e2b-sandbox-id", "")
    port = headers.get("e2b-sandbox-port", "")
    # The code interpreter's SDK sends the traffic token (only) on /contexts; it opens
    # nothing else (running code takes the access token).
    traffic = headers.get("e2b-traffic-access-token")
    contexts = port == JUPYTER_PORT and (path == "/contexts" or path.startswith("/contexts/"))
    rec = state.by_token(sid, headers.get("x-access-token"), traffic if contexts else None)
    if rec is None:
        return gone(sid)
    try:
        if not await state.front.is_running(rec.tenant, sid):
            return gone(sid)
    except NotFoundError:
        return gone(sid)
    if port not in (ENVD_PORT, JUPYTER_PORT):
        return JSONResponse(
            {"sandboxId": sid, "message": f"The sandbox is running but port is not "
             f"open ({port[:6]!r}: moat serves no sandbox ports yet)", "code": 502},
            502,
        )  # fmt: skip
    return rec


def sandbox_app(state: ServerState) -> ASGIApp:
    """The sandbox plane: envd's Connect RPC services, and the HTTP routes below."""
    routes, execute = _routes(state)
    services = rpc.envd_apps(state.front)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if path == "/execute" and scope.get("method") == "POST":
            # The hot path (a warm run_code): straight to its endpoint, the very one the
            # router would pick (same admission, token and port checks), without the
            # router's and the middleware's layers per request.
            response = await execute(Request(scope, receive))
            await response(scope, receive, send)
            return
        service = next((a for p, a in services.items() if path.startswith(p)), None)
        if service is None:
            await routes(scope, receive, send)
            return
        headers = Headers(scope=scope)
        found = await admit(state, headers)
        if isinstance(found, Response):
            await found(scope, receive, send)
            return
        if headers.get("e2b-sandbox-port") != ENVD_PORT:
            await wire.error(404, "no such endpoint on this port")(scope, receive, send)
            return
        caller = rpc.Caller(found.tenant, headers["e2b-sandbox-id"], found.procs)
        token = rpc.CALLER.set(caller)  # this request's task only (contextvars)

        async def sending(message: dict[str, Any]) -> None:
            # The sandbox died under a stream: leave the response unfinished and reset the
            # connection, so it drops like E2B's edge drops it (the SDKs then probe /health).
            if caller.drop and message["type"] == "http.response.body":
                if not message.get("more_body", False):
                    await httpproto.reset(scope)
                    cut_log.expect()
                    return
            await send(message)

        try:
            await service(scope, receive, sending)
        finally:
            rpc.CALLER.reset(token)

    return app


def _routes(state: ServerState) -> tuple[Starlette, Callable[[Request], Awaitable[Response]]]:
    """The plane's HTTP routes, and the guarded /execute endpoint among them."""
    front = state.front

    def guarded(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            path: str = request.scope.get("path", "")  # request.url builds a URL per request
            found = await admit(state, request.headers, path)
            if isinstance(found, Response):
                return found
            rec, port = found, request.headers.get("e2b-sandbox-port", "")
            try:
                return await handler(request, rec, port)
            except BodyTooLarge:
                return too_large()
            except SandboxError as exc:
                return wire.moat_error(exc)
            except ClientDisconnect:
                raise  # the client left: moat.server.app ends the request quietly
            except Exception:  # invariant 8: nothing of the host in the reply
                log.exception("sandbox plane: %s %s", request.method, request.url.path)
                return wire.error(500, "internal error")

        return endpoint

    # -- envd: health and files --------------------------------------------------------

    async def health(request: Request, rec: Record, port: str) -> Response:
        return Response(status_code=204) if port == ENVD_PORT else JSONResponse({"status": "ok"})

    files = FileRoutes(state, admit, gone)  # /files and signed URLs: moat.server.files
    plain_health = guarded(health)

    async def any_health(request: Request) -> Response:
        signed = await files.health(request)
        return signed if signed is not None else await plain_health(request)

    # -- code interpreter --------------------------------------------------------------

    async def run_language(rec: Record, sid: str, context: str | None, lang: str | None) -> str:
        if context is None:
            return _language(lang)
        if lang is not None:
            raise InvalidArgumentError("give a context or a language, not both")
        if context in rec.contexts:
            return rec.contexts[context]
        for c in await front.list_contexts(rec.tenant, sid):
            rec.contexts[c.id] = c.language
        if context not in rec.contexts:
            raise NotFoundError(f"context {context[:64]!r} was not found")
        return rec.contexts[context]

    async def execute(request: Request, rec: Record, port: str) -> Response:
        sid = request.headers["e2b-sandbox-id"]
        body = wire.parse(wire.ExecuteBody, await read_body(request, MAX_JSON_BODY))
        lang = await run_language(rec, sid, body.context_id, body.language)
        waited = 0.0
        while True:
            events = front.run_code(
                rec.tenant, sid, body.code, language=lang, context=body.context_id or "default",
                timeout=body.timeout, envs=body.env_vars,
            )  # fmt: skip
            pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=_FIRST_EVENT_S)
            if not (done and _busy(pending.exception()) and waited < _BUSY_WAIT_S):
                break
            # The context still ends an interrupted cell (its client left): E2B's kernels
            # queue the next execution, so wait a little rather than refuse it.
            await events.aclose()  # type: ignore[attr-defined]
            await asyncio.sleep(0.1)
            waited += 0.1
        if done and pending.exception() is not None:
            exc = pending.exception()
            await events.aclose()  # type: ignore[attr-defined]
            if isinstance(exc, SandboxError):
                return wire.moat_error(exc)
            if isinstance(exc, StopAsyncIteration):
                return wire.error(500, "internal error")
            raise exc  # type: ignore[misc]
        return _ExecStream(events, pending)

    async def create_context(request: Request, rec: Record, port: str) -> Response:
        sid = request.headers["e2b-sandbox-id"]
        body = wire.parse(wire.ContextBody, await read_body(request, MAX_JSON_BODY))
        ctx = await front.create_context(rec.tenant, sid, _language(body.language), body.cwd)
        rec.contexts[ctx.id] = ctx.language
        return JSONResponse(wire.context_reply(ctx))

    async def list_contexts(request: Request, rec: Record, port: str) -> Response:
        sid = request.headers["e2b-sandbox-id"]
        return JSONResponse(
            [wire.context_reply(c) for c in await front.list_contexts(rec.tenant, sid)]
        )

    async def restart_context(request: Request, rec: Record, port: str) -> Response:
        sid = request.headers["e2b-sandbox-id"]
        await front.restart_context(rec.tenant, sid, request.path_params["context_id"])
        return Response(status_code=204)

    async def remove_context(request: Request, rec: Record, port: str) -> Response:
        sid = request.headers["e2b-sandbox-id"]
        cid = request.path_params["context_id"]
        await front.remove_context(rec.tenant, sid, cid)
        rec.contexts.pop(cid, None)
        return Response(status_code=204)

    def on(port: str, handler: Handler) -> Handler:
        async def only(request: Request, rec: Record, got: str) -> Response:
            if got != port:
                return wire.error(404, "no such endpoint on this port")
            return await handler(request, rec, got)

        return only

    async def unknown(request: Request, rec: Record, port: str) -> Response:
        return wire.error(404, "no such endpoint")

    def r(path: str, handler: Handler, methods: list[str]) -> Route:
        return Route(path, guarded(handler), methods=methods)

    run = guarded(on(JUPYTER_PORT, execute))
    routes = [
        Route("/health", any_health, methods=["GET"]),
        Route("/files", files.download, methods=["GET"]),
        Route("/files", files.upload, methods=["POST"]),
        Route("/execute", run, methods=["POST"]),
        r("/contexts", on(JUPYTER_PORT, create_context), ["POST"]),
        r("/contexts", on(JUPYTER_PORT, list_contexts), ["GET"]),
        r("/contexts/{context_id}/restart", on(JUPYTER_PORT, restart_context), ["POST"]),
        r("/contexts/{context_id}", on(JUPYTER_PORT, remove_context), ["DELETE"]),
        r("/{rest:path}", unknown, ["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
    return Starlette(routes=routes), run


#: Yielded by :func:`_ndjson` when the sandbox ended mid-call: the response stops without its
#: last chunk, so the client sees the connection end, as when an E2B sandbox dies; E2B's SDKs
#: then ask whether it still runs and raise "the sandbox was killed while the request was in
#: progress". moat's SDK has raised by then, from the error line sent first.
_CUT: Final = b"\0moat: cut"
#: Yielded by :func:`_ndjson` when the client left: nothing more is sent.
_GONE: Final = b"\0moat: gone"
#: Lines of events that come at once go out as one chunk (one write, one wake-up of the
#: client), up to this many bytes: a line waits at most ``_TURNS`` turns of the event loop
#: (microseconds) for the next event, never for time to pass. A warm ``1+1`` is then the
#: head and one chunk (its result, the count, the end and the body's end) instead of five.
_BATCH = 64 << 10
_TURNS = 5
_NDJSON = "application/x-ndjson"


class _Last(bytes):
    """The response's last chunk: sent with the end of the body, in the same write."""


class _Departure:
    """The client's leaving (``http.disconnect``), watched by a task made only once the
    stream goes on past its first chunk: a call whose events come at once costs no task."""

    def __init__(self) -> None:
        self.receive: Receive | None = None
        self._task: asyncio.Task[None] | None = None

    def task(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.ensure_future(self._listen())
            self._task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return self._task

    async def _listen(self) -> None:
        receive = self.receive
        if receive is None:  # _ExecStream sets it before the body is iterated
            raise RuntimeError("no receive channel to watch")
        while (await receive())["type"] != "http.disconnect":
            pass

    def left(self) -> bool:
        return self._task is not None and self._task.done()

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()


class _ExecStream(StreamingResponse):
    """The /execute NDJSON response: :data:`_CUT` ends it without its final chunk; a
    :class:`_Last` chunk ends it with the body's end. The client's leaving ends the stream
    (which interrupts the code) as Starlette's own watcher would, without its task group."""

    def __init__(self, events: AsyncIterator[Event], first: asyncio.Future[Event]) -> None:
        self._departure = _Departure()
        self._scope: Scope = {}
        super().__init__(_ndjson(events, first, self._departure), media_type=_NDJSON)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._departure.receive = receive
        self._scope = scope
        try:
            await self.stream_response(send)
        finally:
            self._departure.close()
            with contextlib.suppress(BaseException):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]

    async def stream_response(self, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            if chunk is _CUT:
                await httpproto.reset(self._scope)
                cut_log.expect()
                return  # uvicorn closes (resets) the connection: the body ends mid-stream
            if chunk is _GONE:
                return
            body = chunk if isinstance(chunk, bytes | memoryview) else chunk.encode(self.charset)
            last = isinstance(chunk, _Last)
            await send({"type": "http.response.body", "body": body, "more_body": not last})
            if last:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


async def _ndjson(
    events: AsyncIterator[Event], first: asyncio.Future[Event], departure: _Departure
) -> AsyncIterator[bytes]:
    """The front door's events as E2B's NDJSON lines, with keepalives while idle.

    The lines of events that come at once go out together (one chunk, see ``_BATCH``).
    Leaving early (the client went away, seen by ``departure`` while the stream waits, or
    this generator is cancelled) closes the event stream, which cancels the call and
    interrupts the code.
    """
    pending: asyncio.Future[Event] | None = first
    count: int | None = None
    truncated = False
    batch: list[bytes] = []
    size = 0
    try:
        while pending is not None:
            for _ in range(_TURNS if batch else 0):  # an event on its way: same chunk
                if pending.done():
                    break
                await asyncio.sleep(0)
            if batch and (size >= _BATCH or not pending.done()):
                departure.task()  # a stream that goes on: watch for the client's leaving
                yield b"".join(batch)
                batch, size = [], 0
            if departure.left():
                yield _GONE  # the client left: the finally below interrupts the code
                return
            if not pending.done():
                gone = departure.task()
                both: set[asyncio.Future[Any]] = {pending, gone}
                await asyncio.wait(both, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    yield _GONE  # the client left: the finally below interrupts the code
                    return
                if not pending.done():
                    yield _line({"type": "keepalive"})
                    continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                break
            except SandboxError as exc:
                if isinstance(exc, SandboxDiedError):  # killed, died or lost mid-call
                    yield b"".join([*batch, _line(_failure(exc))])
                    yield _CUT
                    return
                batch.append(_line(_failure(exc)))
                break
            pending = None
            line: bytes | None = None
            if isinstance(event, Output):
                line = _line(
                    {"type": event.stream, "text": event.text, "timestamp": wire.now_iso()}
                )
            elif isinstance(event, ResultEvent):
                line = _line(wire.result_line(event.result))
            elif isinstance(event, ErrorEvent):
                line = _line(wire.error_line(event.error))
            elif isinstance(event, End):
                count = event.execution_count
                truncated = event.truncated
                if event.context_restarted:
                    line = _line(
                        {"type": "error", "name": "ContextRestarting",
                         "value": "the context was restarted", "traceback": ""}
                    )  # fmt: skip
            if line is not None:
                batch.append(line)
                size += len(line)
            pending = asyncio.ensure_future(anext(events))
        if count is not None:
            batch.append(_line({"type": "number_of_executions", "execution_count": count}))
        # moat's key (the E2B SDKs ignore it): the output was cut at the per-call cap.
        batch.append(
            _line({"type": "end_of_execution", **({"truncated": True} if truncated else {})})
        )
        yield _Last(b"".join(batch))
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        with contextlib.suppress(BaseException):
            await events.aclose()  # type: ignore[attr-defined]


def _busy(exc: BaseException | None) -> bool:
    # The agent's "busy" failure has no class of its own in moat.errors (yet): its message.
    return type(exc) is SandboxError and "already running code" in str(exc)


def _failure(exc: SandboxError) -> dict[str, Any]:
    """A call that failed mid-stream, as an error line (message safe: invariant 8)."""
    name = "UnexpectedEndOfExecution" if isinstance(exc, SandboxDiedError) else type(exc).__name__
    line = {"type": "error", "name": name, "value": str(exc), "traceback": ""}
    return {**line, **wire.error_fields(exc)}
