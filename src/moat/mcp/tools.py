"""The MCP tools over the engine's front door: one ``Tools`` per server, one ``Caller`` per call.

Trust domain: a face. Every call goes through ``FrontDoor`` with the caller's tenant, so the
resolver (tier by the configured trust or profile), the tenant's limits and quotas, the egress
policy and the guard apply as for any face (DESIGN §3). What reaches the model has passed the
sandbox's guard already (invariant 4); errors are moat's own messages, safe to show a model
(invariant 8), and anything unexpected is logged here and answered with a plain sentence.

Which sandboxes a model may reach: only those this face made (marked in their metadata).
An unnamed one belongs to the MCP session that made it and dies with it; a named one is
the tenant's, found by name from any of its sessions, until its timeout or ``kill_sandbox``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mcp.types import CallToolResult, ContentBlock, ImageContent, TextContent, Tool, ToolAnnotations

from moat.engine.api import FrontDoor
from moat.errors import InvalidArgumentError, NotFoundError, SandboxError, TemplateNotBuiltError
from moat.mcp import schemas as s
from moat.model import End, ErrorEvent, Output, ResultEvent, SandboxConfig, SandboxInfo
from moat.model import validate as v

__all__ = ["MARK", "NAME", "Caller", "Scope", "Settings", "Tools"]

log = logging.getLogger("moat.mcp")

#: Metadata marking a sandbox this face made: "named", or "session:<scope id>".
MARK = "moat.mcp"
#: Metadata holding a named sandbox's name.
NAME = "moat.mcp.name"
#: Characters of one output section shown to a model (head and tail kept, the middle cut).
MAX_SECTION = 16_000
#: Seconds a one-shot sandbox lives beyond its call's timeout.
ONE_SHOT_SLACK = 30
_IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}


@dataclass(frozen=True)
class Settings:
    """How this face makes sandboxes: a profile, else a tier or trust level, else the
    tenant's default tier, else trust ``untrusted`` (the resolver's default)."""

    profile: str | None = None
    trust: str | None = None
    isolation: str | None = None
    policy_file: str | None = None
    #: seconds an HTTP session may sit with no request in flight before it ends
    idle_timeout: float = 1800
    #: HTTP sessions one tenant may hold open at once (the SDK's own cap is server-wide)
    max_sessions: int = 100

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """``MOAT_MCP_PROFILE``, ``MOAT_MCP_TRUST``, ``MOAT_MCP_ISOLATION`` (empty: unset;
        a profile is looked up in ``$MOAT_POLICY_FILE``, docs/profiles.md) and
        ``MOAT_MCP_IDLE_TIMEOUT`` (seconds), ``MOAT_MCP_MAX_SESSIONS`` (per tenant)."""
        env = os.environ if env is None else env
        return cls(
            profile=env.get("MOAT_MCP_PROFILE") or None,
            trust=env.get("MOAT_MCP_TRUST") or None,
            isolation=env.get("MOAT_MCP_ISOLATION") or None,
            idle_timeout=_env_number(env, "MOAT_MCP_IDLE_TIMEOUT", 1800, 1, 86400),
            max_sessions=int(_env_number(env, "MOAT_MCP_MAX_SESSIONS", 100, 1, 10_000)),
        )

    def config(
        self, front: FrontDoor, tenant: str, timeout: float | None, metadata: dict[str, str]
    ) -> SandboxConfig:
        kwargs = self._kwargs()
        if not kwargs:  # nothing configured: the tenant's default tier, else by trust
            tier = front.default_tier(tenant)
            if tier is not None:
                kwargs["isolation"] = tier
        return front.resolve(**kwargs, timeout=timeout, metadata=metadata)

    def check(self) -> None:
        """Fail at start, not at the first call, on a setting the resolver refuses."""
        try:
            FrontDoor.resolve(**self._kwargs())
        except TemplateNotBuiltError:
            pass  # not an MCP setting: `moat serve` warns of it, its creates fail clearly

    def _kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.profile is not None:
            kwargs.update(profile=self.profile, policy_file=self.policy_file)
        if self.trust is not None:
            kwargs["trust"] = self.trust
        if self.isolation is not None:
            kwargs["isolation"] = self.isolation
        return kwargs


@dataclass
class Scope:
    """One MCP session's unnamed sandboxes: killed, all of them, when the session ends."""

    tenant: str
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    sandboxes: set[str] = field(default_factory=set)
    closed: bool = False

    async def close(self, front: FrontDoor) -> None:
        self.closed = True
        ids, self.sandboxes = list(self.sandboxes), set()
        results = await asyncio.gather(
            *(front.kill(self.tenant, sid) for sid in ids), return_exceptions=True
        )
        for sid, res in zip(ids, results, strict=True):
            if isinstance(res, BaseException):
                log.warning("mcp: killing %s at the session's end failed: %r", sid, res)


@dataclass(frozen=True)
class Caller:
    """Who calls: the tenant, and the MCP session's scope (None: no session to tie an
    unnamed sandbox to, as on the stateless HTTP protocol)."""

    tenant: str
    scope: Scope | None


Handler = Callable[["Tools", Caller, Any], Awaitable[CallToolResult]]

_TOOLS: list[tuple[str, str, ToolAnnotations]] = [
    (
        "run_code",
        "Run Python or bash code in an isolated sandbox and return its stdout, stderr, the "
        "value of the last expression, and any matplotlib figures as images. Without "
        "`sandbox` the code runs in a fresh sandbox discarded afterwards; to keep variables "
        "and files between calls, call create_sandbox first and pass its name or id. "
        "The sandbox has no network access unless the server's policy allows it. An "
        "exception in the code is returned as an error with its traceback.",
        ToolAnnotations(title="Run code", open_world_hint=False),
    ),
    (
        "run_command",
        "Run a shell command (bash) in an isolated sandbox and return its stdout, stderr and "
        "exit code; a non-zero exit code is reported as an error. Without `sandbox` it runs "
        "in a fresh sandbox discarded afterwards.",
        ToolAnnotations(title="Run a shell command", open_world_hint=False),
    ),
    (
        "read_file",
        "Read a file from a sandbox made by create_sandbox. Text comes back as text, PNG and "
        "JPEG files as images.",
        ToolAnnotations(title="Read a file", read_only_hint=True, open_world_hint=False),
    ),
    (
        "write_file",
        "Write (create or replace) a file in a sandbox made by create_sandbox.",
        ToolAnnotations(
            title="Write a file", destructive_hint=True, idempotent_hint=True,
            open_world_hint=False,
        ),
    ),
    (
        "list_files",
        "List a directory of a sandbox made by create_sandbox: each entry's type, size and "
        "path.",
        ToolAnnotations(title="List files", read_only_hint=True, open_world_hint=False),
    ),
    (
        "create_sandbox",
        "Start a sandbox that keeps its state across calls (Python variables, files, "
        "installed packages); returns its id. Pass that id, or the `name` you gave it, as "
        "`sandbox` to the other tools. Unnamed sandboxes end with this MCP session; named "
        "ones live until their timeout or kill_sandbox.",
        ToolAnnotations(title="Create a sandbox", destructive_hint=False, open_world_hint=False),
    ),
    (
        "kill_sandbox",
        "Kill a sandbox made by create_sandbox, by name or id; everything in it is lost.",
        ToolAnnotations(
            title="Kill a sandbox", destructive_hint=True, idempotent_hint=True,
            open_world_hint=False,
        ),
    ),
    (
        "list_sandboxes",
        "List the running sandboxes you can use: id, name, isolation tier, and when each ends.",
        ToolAnnotations(title="List sandboxes", read_only_hint=True, open_world_hint=False),
    ),
]  # fmt: skip


class Tools:
    """The tools of one MCP server, over one front door."""

    def __init__(self, front: FrontDoor, settings: Settings | None = None) -> None:
        self.front = front
        self.settings = settings or Settings()
        self._name_locks: dict[str, asyncio.Lock] = {}
        self._handlers: dict[str, Handler] = {
            "run_code": Tools._run_code,
            "run_command": Tools._run_command,
            "read_file": Tools._read_file,
            "write_file": Tools._write_file,
            "list_files": Tools._list_files,
            "create_sandbox": Tools._create_sandbox,
            "kill_sandbox": Tools._kill_sandbox,
            "list_sandboxes": Tools._list_sandboxes,
        }

    @staticmethod
    def list() -> list[Tool]:
        return [
            Tool(
                name=name,
                description=text,
                input_schema=s.schema_of(s.TOOL_ARGS[name]),
                annotations=notes,
            )
            for name, text, notes in _TOOLS
        ]

    async def call(self, caller: Caller, name: str, arguments: Any) -> CallToolResult:
        """Run one tool; every failure is a tool error (``isError``), never a crash."""
        handler = self._handlers.get(name)
        if handler is None:
            return _error(f"unknown tool {name[:64]!r}; the tools are {', '.join(self._handlers)}")
        try:
            args = s.parse_args(name, arguments)
            return await handler(self, caller, args)
        except SandboxError as exc:  # moat's messages are safe to show a model (invariant 8)
            return _error(f"{type(exc).__name__}: {exc}")
        except Exception:  # a host traceback never reaches a model (invariant 8): the log
            log.exception("mcp: tool %s failed", name)
            return _error("internal error (the server's log has the details)")

    # -- sandboxes ------------------------------------------------------------------------

    async def _create_sandbox(self, caller: Caller, args: s.CreateSandbox) -> CallToolResult:
        if args.name is None:
            scope = self._scope(caller)
            info = await self._create(caller, args.timeout, {MARK: f"session:{scope.id}"})
            scope.sandboxes.add(info.sandbox_id)
            if scope.closed:  # the session ended while it started: it goes with it
                await self.front.kill(caller.tenant, info.sandbox_id)
                raise InvalidArgumentError("the MCP session ended")
            note = "it ends with this MCP session"
        else:
            lock = self._name_locks.setdefault(caller.tenant, asyncio.Lock())
            async with lock:  # two racing creates of one name: one sandbox
                found = await self._named(caller.tenant, args.name)
                if found is not None:
                    raise InvalidArgumentError(
                        f"a sandbox named {args.name!r} is running already "
                        f"({found.sandbox_id}): use it, or kill_sandbox it first"
                    )
                info = await self._create(caller, args.timeout, {MARK: "named", NAME: args.name})
            note = f"named {args.name!r}: it lives until {_when(info)} or kill_sandbox"
        return _text(
            f"sandbox {info.sandbox_id} started (tier {info.tier}); {note}.\n"
            f"Pass sandbox={args.name or info.sandbox_id!r} to the other tools."
        )

    async def _kill_sandbox(self, caller: Caller, args: s.KillSandbox) -> CallToolResult:
        info = await self._find(caller, args.sandbox)
        await self.front.kill(caller.tenant, info.sandbox_id)
        if caller.scope is not None:
            caller.scope.sandboxes.discard(info.sandbox_id)
        return _text(f"sandbox {info.sandbox_id} killed")

    async def _list_sandboxes(self, caller: Caller, args: s.ListSandboxes) -> CallToolResult:
        mine = [
            i for i in await self.front.list_sandboxes(caller.tenant) if self._usable(caller, i)
        ]
        if not mine:
            return _text("no sandboxes are running (run_code without `sandbox` needs none)")
        lines = [
            f"{i.sandbox_id}  name={i.metadata.get(NAME, '-')}  tier={i.tier}  ends={_when(i)}"
            for i in sorted(mine, key=lambda i: i.started_at)
        ]
        return _text("\n".join(lines))

    # -- code and commands ----------------------------------------------------------------

    async def _run_code(self, caller: Caller, args: s.RunCode) -> CallToolResult:
        async with self._sandbox(caller, args.sandbox, args.timeout) as sid:
            stdout: list[str] = []
            stderr: list[str] = []
            results: list[Any] = []
            error = None
            failure: str | None = None  # the call's own end: a timeout, a blocked leak, ...
            truncated = False
            events = self.front.run_code(
                caller.tenant, sid, args.code, language=args.language, timeout=args.timeout
            )
            try:
                async for ev in events:
                    if isinstance(ev, Output):
                        (stdout if ev.stream == "stdout" else stderr).append(ev.text)
                    elif isinstance(ev, ResultEvent):
                        results.append(ev.result)
                    elif isinstance(ev, ErrorEvent):
                        error = ev.error
                    elif isinstance(ev, End):
                        truncated = ev.truncated
            except SandboxError as exc:  # keep what came before it (all of it guarded)
                failure = f"{type(exc).__name__}: {exc}"
        text: list[str] = []
        images: list[ContentBlock] = []
        _section(text, "stdout", "".join(stdout))
        _section(text, "stderr", "".join(stderr))
        for r in results:
            shown = False
            for fmt, mime in (("png", "image/png"), ("jpeg", "image/jpeg")):
                data = getattr(r, fmt)
                if data:
                    images.append(ImageContent(data=data, mime_type=mime))
                    shown = True
            if r.text and (r.is_main_result or not shown):
                _section(text, "result" if r.is_main_result else "display", r.text)
        if truncated:
            text.append("[output exceeded the per-call cap and was cut]")
        if error is not None:
            _section(text, "error", f"{error.name}: {error.value}\n{error.traceback}".rstrip())
        if failure is not None:
            text.append(failure)
        body = "\n".join(text) or "(no output)"
        content: list[ContentBlock] = [TextContent(text=body), *images]
        return CallToolResult(content=content, is_error=error is not None or failure is not None)

    async def _run_command(self, caller: Caller, args: s.RunCommand) -> CallToolResult:
        async with self._sandbox(caller, args.sandbox, args.timeout) as sid:
            stdout: list[str] = []
            stderr: list[str] = []
            code: int | None = None
            timed_out = False
            failure: str | None = None
            cmd = await self.front.start_command(caller.tenant, sid, args.command, cwd=args.cwd)
            try:
                async with asyncio.timeout(args.timeout):
                    async for ev in cmd.events():
                        if isinstance(ev, Output):
                            (stdout if ev.stream == "stdout" else stderr).append(ev.text)
                        elif isinstance(ev, End):
                            code = ev.exit_code
            except TimeoutError:
                timed_out = True
                with contextlib.suppress(SandboxError):
                    await self.front.signal(caller.tenant, sid, cmd.pid, "SIGKILL")
            except SandboxError as exc:  # keep what came before it (all of it guarded)
                failure = f"{type(exc).__name__}: {exc}"
        text: list[str] = []
        _section(text, "stdout", "".join(stdout))
        _section(text, "stderr", "".join(stderr))
        if timed_out:
            text.append(f"[killed after {args.timeout:g} s]")
        elif failure is not None:
            text.append(failure)
        else:
            text.append(f"exit code: {code}")
        return CallToolResult(content=[TextContent(text="\n".join(text))], is_error=code != 0)

    # -- files ----------------------------------------------------------------------------

    async def _read_file(self, caller: Caller, args: s.ReadFile) -> CallToolResult:
        info = await self._find(caller, args.sandbox)
        # bytes as the guard redacted them (invariant 4)
        data = await self.front.read_file(caller.tenant, info.sandbox_id, args.path, "bytes")
        if not isinstance(data, bytes):  # the front door's contract for format="bytes"
            raise TypeError("read_file returned no bytes")
        for magic, mime in _IMAGE_MAGIC.items():
            if data.startswith(magic):
                return CallToolResult(
                    content=[ImageContent(data=base64.b64encode(data).decode(), mime_type=mime)]
                )
        if b"\0" in data[:8192]:  # binary: bytes a model can't read, and would pay for
            return _text(
                f"{args.path} is a binary file of {len(data)} bytes (not shown); inspect it "
                "with run_code or run_command (e.g. `xxd | head`)"
            )
        text = data.decode("utf-8", "replace")
        return _text(_clip(text, MAX_SECTION * 4) if text else "(the file is empty)")

    async def _write_file(self, caller: Caller, args: s.WriteFile) -> CallToolResult:
        info = await self._find(caller, args.sandbox)
        if args.encoding == "base64":
            try:
                data: str | bytes = base64.b64decode(args.content, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidArgumentError("content is not valid base64") from None
        else:
            data = args.content
        entry = await self.front.write_file(caller.tenant, info.sandbox_id, args.path, data)
        return _text(f"wrote {entry.path} ({entry.size} bytes)")

    async def _list_files(self, caller: Caller, args: s.ListFiles) -> CallToolResult:
        info = await self._find(caller, args.sandbox)
        entries = await self.front.list_dir(caller.tenant, info.sandbox_id, args.path, args.depth)
        if not entries:
            return _text(f"{args.path} is empty")
        lines = [
            f"{e.type:<7} {e.size:>10}  {e.path}" + ("/" if e.type == "dir" else "")
            for e in sorted(entries, key=lambda e: e.path)[:1000]
        ]
        if len(entries) > 1000:
            lines.append(f"[{len(entries) - 1000} more entries not shown]")
        return _text("\n".join(lines))

    # -- lookups --------------------------------------------------------------------------

    def _scope(self, caller: Caller) -> Scope:
        if caller.scope is None:
            raise InvalidArgumentError(
                "this connection has no MCP session to tie an unnamed sandbox to (stateless "
                "HTTP): give create_sandbox a `name`, and kill_sandbox it when done"
            )
        return caller.scope

    async def _create(
        self, caller: Caller, timeout: float | None, metadata: dict[str, str]
    ) -> SandboxInfo:
        config = self.settings.config(self.front, caller.tenant, timeout, metadata)
        return await self.front.create(caller.tenant, config)

    def _usable(self, caller: Caller, info: SandboxInfo) -> bool:
        """Made by this face: named, or unnamed and of this very MCP session."""
        mark = info.metadata.get(MARK)
        if mark == "named":
            return True
        return caller.scope is not None and mark == f"session:{caller.scope.id}"

    async def _named(self, tenant: str, name: str) -> SandboxInfo | None:
        found = await self.front.list_sandboxes(tenant, metadata={MARK: "named", NAME: name})
        return found[0] if found else None

    async def _find(self, caller: Caller, ref: str) -> SandboxInfo:
        """A usable sandbox by name, else by id (invariant 11: another tenant's, another
        session's unnamed one and an unknown one answer alike)."""
        found = await self._named(caller.tenant, ref)
        if found is not None:
            return found
        with contextlib.suppress(NotFoundError):
            info = await self.front.info(caller.tenant, ref)
            if info.state == "running" and self._usable(caller, info):
                return info
        shown = ref if ref.isprintable() else "(unprintable)"
        raise NotFoundError(
            f"no running sandbox named or with id {shown!r} (list_sandboxes shows yours)"
        )

    @contextlib.asynccontextmanager
    async def _sandbox(self, caller: Caller, ref: str | None, timeout: float) -> Any:
        """The named sandbox's id, or a fresh one's, killed when the call returns."""
        if ref is not None:
            yield (await self._find(caller, ref)).sandbox_id
            return
        info = await self._create(caller, timeout + ONE_SHOT_SLACK, {MARK: "one-shot"})
        try:
            yield info.sandbox_id
        finally:
            await asyncio.shield(self.front.kill(caller.tenant, info.sandbox_id))


def _env_number(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name) or str(default)
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgumentError(f"{name} must be a number") from None
    return v.number(name, value, lo, hi)


def _when(info: SandboxInfo) -> str:
    return info.end_at.strftime("%Y-%m-%d %H:%M:%S UTC")


def _clip(text: str, limit: int = MAX_SECTION) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


def _section(out: list[str], title: str, text: str) -> None:
    if text:
        out.append(f"{title}:\n{_clip(text).rstrip(chr(10))}")


def _text(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(text=text)])


def _error(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(text=text)], is_error=True)
