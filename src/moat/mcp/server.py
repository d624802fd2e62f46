"""moat's MCP server on the official ``mcp`` SDK: over stdio (``moat mcp``) and over
streamable HTTP at ``/mcp`` in ``moat serve``.

Trust domain: a face. Over HTTP every request is authenticated by the tenant's API key
(``X-API-Key`` or ``Authorization: Bearer``) before the SDK sees it, and the SDK binds each
MCP session to the tenant that opened it (another tenant's session id answers 404, invariant
11). Over stdio the caller is the local user, as one configured tenant.

A session's unnamed sandboxes die with it: at stdin's EOF (or a signal) for stdio; for HTTP
when the SDK ends the session (DELETE, idle timeout, the server's stop), through the
connection's exit stack. The stateless HTTP protocol (2026-07-28, no session) gets no
unnamed sandboxes: a call's own sandbox dies with the call, a named one by its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.types import (
    CallToolRequestParams,
    CallToolResult,
    ListToolsResult,
    PaginatedRequestParams,
    TextContent,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.responses import JSONResponse

from moat.engine.api import DEFAULT_TENANT, FrontDoor, kill_everything
from moat.mcp.tools import Caller, Scope, Settings, Tools
from moat.store.keys import KeyStore

__all__ = ["McpHttp", "build_server", "serve_stdio"]

log = logging.getLogger("moat.mcp")

CallerOf = Callable[[ServerRequestContext[Any, Any]], Caller]

#: Where the tenant of an authenticated HTTP request is kept in its ASGI scope.
TENANT_KEY = "moat.tenant"

INSTRUCTIONS = (
    "moat runs code in isolated sandboxes. run_code and run_command without `sandbox` use a "
    "fresh sandbox per call; create_sandbox keeps state across calls. Output that looks "
    "like a secret is redacted by the sandbox's guard."
)


def build_server(tools: Tools, caller_of: CallerOf) -> Server[Any]:
    """The SDK's low-level server with moat's tools; ``caller_of`` names each call's caller."""

    async def list_tools(
        ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        return ListToolsResult(tools=tools.list())

    async def call_tool(
        ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams
    ) -> CallToolResult:
        try:
            caller = caller_of(ctx)
        except Exception:  # never a host traceback to the model (invariant 8)
            log.exception("mcp: no caller for a tool call")
            return CallToolResult(content=[TextContent(text="internal error")], is_error=True)
        return await tools.call(caller, params.name, params.arguments)

    return Server(
        "moat",
        version=_version(),
        title="moat sandboxes",
        instructions=INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moat")
    except PackageNotFoundError:
        return "0"


# -- stdio ---------------------------------------------------------------------------------


async def serve_stdio(settings: Settings, tenant: str = DEFAULT_TENANT) -> None:
    """Serve one MCP session on stdin/stdout until EOF or SIGTERM/SIGINT; then kill every
    sandbox of this process (invariant 5: nothing outlives the host process, so a named
    sandbox ends here too)."""
    settings.check()
    front = FrontDoor()
    tools = Tools(front, settings)
    scope = Scope(tenant)
    server = build_server(tools, lambda ctx: Caller(tenant, scope))
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel if task else (lambda: None))
    stdin = await _stdin_lines()
    try:
        async with stdio_server(stdin=stdin) as (read, write):
            await server.run(read, write, server.create_initialization_options())
    except asyncio.CancelledError:
        log.info("mcp: stopped by a signal")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if stdin is not None:
            stdin.close()
        await scope.close(front)
        await kill_everything(front.engine)


#: The longest MCP message read from stdin (a write_file of a few MiB, base64).
MAX_LINE = 16 << 20


class _PipeLines:
    """stdin's lines for the SDK's stdio transport, read on the event loop.

    The SDK's own reader blocks a worker thread in read(), which nothing can interrupt: a
    SIGTERM while the host keeps stdin open would wait for its next line, with the
    sandboxes still running. On the loop, the read is cancelled with the server."""

    def __init__(self, reader: asyncio.StreamReader, transport: asyncio.BaseTransport) -> None:
        self.reader = reader
        self.transport = transport

    def __aiter__(self) -> _PipeLines:
        return self

    async def __anext__(self) -> str:
        try:
            line = await self.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:  # EOF: the last line, if any
            if not exc.partial:
                raise StopAsyncIteration from None
            line = exc.partial
        except asyncio.LimitOverrunError:
            await self._skip_line()
            return "moat: message too large\n"  # the SDK answers it as a parse error
        return line.decode("utf-8", "replace")

    async def _skip_line(self) -> None:
        while True:
            try:
                await self.reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self.reader.readexactly(exc.consumed)
            except asyncio.IncompleteReadError:
                return

    def close(self) -> None:
        self.transport.close()


async def _stdin_lines() -> Any:
    """stdin as ``_PipeLines`` over a private copy of fd 0, with fd 0 itself pointed at
    /dev/null (so nothing else reads the wire); None where stdin is no pipe (the SDK then
    reads it its own way)."""
    loop = asyncio.get_running_loop()
    try:
        pipe = os.fdopen(fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3), "rb", buffering=0)
    except OSError:  # no fd 0
        return None
    reader = asyncio.StreamReader(limit=MAX_LINE)
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
    except (OSError, ValueError):  # a regular file: not a pipe
        pipe.close()
        return None
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return _PipeLines(reader, transport)


# -- streamable HTTP -----------------------------------------------------------------------


class McpHttp:
    """The ASGI app of ``/mcp`` in ``moat serve``: authentication, then the SDK's session
    manager (enter ``running()`` around serving)."""

    def __init__(self, front: FrontDoor, keys: KeyStore, settings: Settings) -> None:
        settings.check()
        self.front = front
        self.keys = keys
        self.tools = Tools(front, settings)
        self.server = build_server(self.tools, self._caller)
        self.manager = StreamableHTTPSessionManager(
            app=self.server,
            # Every request carries the tenant's key, so a page a browser was lured to can't
            # call (DNS rebinding needs an unauthenticated server); Host checks would break
            # a server reached by its name.
            security_settings=None,
            session_idle_timeout=settings.idle_timeout,
        )
        self._ending: set[asyncio.Task[None]] = set()  # session ends being cleaned up
        self.max_sessions = settings.max_sessions
        self._sessions: dict[str, int] = {}  # tenant -> sessions open or being opened
        self.server.middleware.append(self._count_session)
        # The SDK logs every session id at INFO; the server's log keeps to moat's own lines.
        logging.getLogger("mcp").setLevel(logging.WARNING)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.manager.run():
            yield

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        tenant = self._tenant(scope)
        if tenant is None:
            response = JSONResponse(
                {"error": "invalid or missing API key (X-API-Key or Authorization: Bearer)"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="moat"'},
            )
            await response(scope, receive, send)
            return
        scope[TENANT_KEY] = tenant
        if _opens_session(scope):  # one tenant must not take every session (invariant 11)
            if self._sessions.get(tenant, 0) >= self.max_sessions:
                response = JSONResponse(
                    {"error": f"too many open MCP sessions (at most {self.max_sessions}): "
                              "end one (DELETE) or let it time out"},
                    status_code=429,
                )  # fmt: skip
                await response(scope, receive, send)
                return
            self._add(tenant, 1)  # held while it opens, so racing opens count too
            try:
                await self._serve(tenant, scope, receive, send)
            finally:
                self._add(tenant, -1)
            return
        await self._serve(tenant, scope, receive, send)

    async def _serve(
        self,
        tenant: str,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        # The SDK binds a session to the principal that opened it: the tenant.
        scope["user"] = AuthenticatedUser(
            AccessToken(token="-", client_id=tenant, scopes=[], subject=tenant)  # noqa: S106
        )
        started = done = False

        async def tracked(message: Any) -> None:
            nonlocal started, done
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                done = True
            await send(message)

        await self.manager.handle_request(scope, receive, tracked)
        # A stream the SDK dropped (its session ended under an open GET at the server's
        # stop) still ends as a complete HTTP response.
        if not started:
            await JSONResponse({"error": "the MCP session ended"}, 503)(scope, receive, send)
        elif not done:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _add(self, tenant: str, n: int) -> None:
        count = self._sessions.get(tenant, 0) + n
        if count > 0:
            self._sessions[tenant] = count
        else:
            self._sessions.pop(tenant, None)

    async def _count_session(
        self, ctx: ServerRequestContext[Any, Any], call_next: Callable[[Any], Awaitable[Any]]
    ) -> Any:
        """SDK middleware: a session counts against its tenant from its ``initialize`` to
        its end (the connection's exit stack: DELETE, idle timeout, the server's stop)."""
        if ctx.method == "initialize" and ctx.request is not None:
            conn = _connection(ctx)
            if "moat.counted" not in conn.state:
                tenant = ctx.request.scope[TENANT_KEY]
                conn.state["moat.counted"] = tenant
                self._add(tenant, 1)
                conn.exit_stack.callback(self._add, tenant, -1)
        return await call_next(ctx)

    def _tenant(self, scope: MutableMapping[str, Any]) -> str | None:
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        key = headers.get(b"x-api-key")
        auth = headers.get(b"authorization")
        if key is None and auth is not None and auth[:7].lower() == b"bearer ":
            key = auth[7:].strip()
        if key is None:
            return None
        return self.keys.tenant_of(key.decode("latin-1"))

    def _caller(self, ctx: ServerRequestContext[Any, Any]) -> Caller:
        request = ctx.request
        if request is None:  # every call of this app came over HTTP
            raise RuntimeError("an MCP call without its HTTP request")
        tenant: str = request.scope[TENANT_KEY]
        if request.headers.get("mcp-session-id") is None:
            return Caller(tenant, None)  # stateless protocol: no session
        conn = _connection(ctx)
        scope = conn.state.get("moat.scope")
        if scope is None:
            scope = conn.state["moat.scope"] = Scope(tenant)
            conn.exit_stack.push_async_callback(self._end, scope)
        if scope.tenant != tenant:  # the SDK binds sessions to their tenant; never mixed
            raise PermissionError("an MCP session of another tenant")
        return Caller(tenant, scope)

    async def _end(self, scope: Scope) -> None:
        """The session ended: kill its unnamed sandboxes, off the SDK's bounded cleanup."""
        task = asyncio.get_running_loop().create_task(scope.close(self.front))
        self._ending.add(task)  # held, so a running cleanup is never garbage-collected
        task.add_done_callback(self._ending.discard)


def _opens_session(scope: MutableMapping[str, Any]) -> bool:
    """A request that may open a session-ful MCP session: a POST without a session id on
    the handshake protocol (the 2026 one has no sessions)."""
    if scope.get("method") != "POST":
        return False
    headers = {k.lower(): v for k, v in scope.get("headers", ())}
    version = headers.get(b"mcp-protocol-version")
    return b"mcp-session-id" not in headers and (
        version is None or version.decode("latin-1") in HANDSHAKE_PROTOCOL_VERSIONS
    )


def _connection(ctx: ServerRequestContext[Any, Any]) -> Any:
    """The MCP connection behind a request: its ``state`` and ``exit_stack`` are the SDK's
    documented per-connection hooks, reached through the request's session (mcp 2.3 keeps
    no public path to them from a low-level handler; tests/test_mcp.py proves the end)."""
    conn = getattr(ctx.session, "_connection", None)
    if conn is None or not hasattr(conn, "exit_stack") or not hasattr(conn, "state"):
        raise RuntimeError("the mcp SDK hides the session's connection")
    return conn
