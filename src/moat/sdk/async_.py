"""``AsyncSandbox``: the asyncio SDK. The sync ``Sandbox`` drives this same code."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from typing import IO, Any, Literal

from moat.egress import GatewayConfig, NetworkPolicy, Secret
from moat.engine import Engine, Session, default_engine
from moat.engine.auditview import sandbox_audit
from moat.engine.client import Call
from moat.engine.guardhook import guard_policy
from moat.engine.output import DEFAULT_MAX_OUTPUT, OutputSink
from moat.errors import (
    CommandExitError,
    InvalidArgumentError,
    SandboxError,
    TimeoutError,
)
from moat.guard import Guard, GuardPolicy
from moat.profiles import resolve_profile
from moat.runtime.spec import Limits, Mount
from moat.sdk import validate as v
from moat.sdk.models import (
    CommandResult,
    Context,
    EntryInfo,
    Execution,
    ExecutionError,
    ProcessInfo,
    Result,
    SandboxInfo,
)

_LANGUAGES = ("python", "bash")
_TRUST = ("trusted", "semi-trusted", "untrusted")


class AsyncCommandHandle:
    """A command started with ``background=True``. Its output is collected as it arrives."""

    def __init__(self, session: Session, pid: int, call: Call, sink: OutputSink) -> None:
        self._session = session
        self.pid = pid
        self._sink = sink
        self._task = asyncio.get_running_loop().create_task(
            session.wait_command(call, sink, None, pid)
        )
        # Retrieve a failure even if nobody waits, so it is never reported as lost.
        self._task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def wait(self, timeout: float | None = None) -> CommandResult:
        """Wait for the command to end; raises CommandExitError on a non-zero exit."""
        if timeout is not None:
            v.number("timeout", timeout, 0.001, 86400)
        try:
            result = await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except builtins.TimeoutError:
            if self._task.done():
                raise
            await self.kill()
            # Let the agent report the end, so the command is gone when we return.
            with contextlib.suppress(builtins.TimeoutError, SandboxError):
                await asyncio.wait_for(asyncio.shield(self._task), 2)
            raise TimeoutError(
                f"command exceeded its {timeout:g}s timeout and was killed"
            ) from None
        return _check_exit(result)

    async def kill(self) -> bool:
        """Kill the command and its process group. False if it had already ended."""
        return await self._session.kill_command(self.pid)

    async def send_stdin(self, data: str | bytes, eof: bool = False) -> None:
        """Write to the command's stdin (started with ``stdin=True``)."""
        await self._session.send_stdin(self.pid, _bytes(data), eof)

    @property
    def stdout(self) -> str:
        return self._sink.text("stdout")

    @property
    def stderr(self) -> str:
        return self._sink.text("stderr")


class AsyncCommands:
    """``sandbox.commands``: shell commands inside the sandbox."""

    def __init__(self, session: Session) -> None:
        self._s = session

    async def run(
        self,
        cmd: str,
        background: bool = False,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = 60,
        on_stdout: Any = None,
        on_stderr: Any = None,
        stdin: bool | str | bytes | None = None,
    ) -> Any:
        """Run ``cmd`` with bash. Returns a CommandResult, or a handle if ``background``."""
        cmd = v.text("cmd", cmd)
        env = v.envs(envs)
        if cwd is not None:
            cwd = v.path(cwd)
        if timeout is not None:
            v.number("timeout", timeout, 0.001, 86400)
        v.callback("on_stdout", on_stdout)
        v.callback("on_stderr", on_stderr)
        if stdin is not None and not isinstance(stdin, (bool, str, bytes)):
            raise InvalidArgumentError("stdin must be True, str or bytes")
        data = None if isinstance(stdin, bool) or stdin is None else _bytes(stdin)
        pid, call, sink = await self._s.start_command(
            cmd, env, cwd, bool(stdin) or data is not None, on_stdout, on_stderr
        )
        handle = AsyncCommandHandle(self._s, pid, call, sink)
        if data is not None:
            await handle.send_stdin(data, eof=True)
        if background:
            return handle
        return await handle.wait(timeout)

    async def list(self) -> list[ProcessInfo]:
        return await self._s.list_commands()

    async def kill(self, pid: int) -> bool:
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise InvalidArgumentError("pid must be an int")
        return await self._s.kill_command(pid)


class AsyncFiles:
    """``sandbox.files``: the sandbox's filesystem, resolved inside the sandbox."""

    def __init__(self, session: Session) -> None:
        self._s = session

    async def read(self, path: str, format: Literal["text", "bytes"] = "text") -> Any:
        path = v.path(path)
        fmt = v.choice("format", format, ("text", "bytes"))
        data = await self._s.read_file(path)
        if fmt == "bytes":
            return self._s.guard.redact_bytes(data, "files")
        return self._s.guard.redact_text(data.decode("utf-8", "replace"), "files")

    async def write(self, path: str, data: str | bytes | IO[Any]) -> EntryInfo:
        from moat.engine.session import file_chunks

        path = v.path(path)
        if not isinstance(data, (str, bytes, bytearray, memoryview)) and not hasattr(data, "read"):
            raise InvalidArgumentError("data must be str, bytes or a readable file object")
        return await self._s.write_file(path, file_chunks(data))

    async def list(self, path: str = ".", depth: int = 1) -> list[EntryInfo]:
        path = v.path(path)
        d = int(v.number("depth", depth, 1, 32))
        return await self._s.list_dir(path, d)

    async def exists(self, path: str) -> bool:
        from moat.errors import NotFoundError

        try:
            await self._s.stat(v.path(path))
        except NotFoundError:
            return False
        return True

    async def get_info(self, path: str) -> EntryInfo:
        return await self._s.stat(v.path(path))

    async def remove(self, path: str) -> None:
        await self._s.remove(v.path(path))

    async def make_dir(self, path: str) -> bool:
        """Create a directory (and parents). False if it already existed."""
        return await self._s.make_dir(v.path(path))


class AsyncSandbox:
    """A sandbox, used from asyncio. Create it with ``await AsyncSandbox.create(...)``."""

    def __init__(self, session: Session) -> None:
        self._s = session
        self.commands = AsyncCommands(session)
        self.files = AsyncFiles(session)

    @property
    def sandbox_id(self) -> str:
        return self._s.id

    @classmethod
    async def create(
        cls,
        template: str = "default",
        isolation: str | None = None,
        trust: str | None = None,
        timeout: float | None = None,
        envs: dict[str, str] | None = None,
        mounts: list[Mount] | None = None,
        limits: Limits | dict[str, Any] | None = None,
        network: NetworkPolicy | dict[str, Any] | None = None,
        secrets: dict[str, Secret] | None = None,
        metadata: dict[str, str] | None = None,
        *,
        allow_internet_access: bool = False,
        gateway_config: GatewayConfig | None = None,
        guard: GuardPolicy | dict[str, Any] | None = None,
        sensitive: list[str] | dict[str, str] | None = None,
        profile: str | None = None,
        policy_file: str | None = None,
        max_output_bytes: int | None = None,
        engine: Engine | None = None,
    ) -> AsyncSandbox:
        """Start a sandbox. With ``trust="untrusted"`` (the default) that is a microVM.

        ``isolation`` picks a tier explicitly ("container", "gvisor", "microvm"); a tier this
        host can't run raises IsolationUnavailableError (never a silent downgrade).
        ``network`` opens egress per host (nothing by default; ``allow_internet_access=True``
        opens public hosts on 80/443, never private ranges). ``secrets`` maps an environment
        variable to a ``Secret``: the sandbox sees a placeholder, the gateway swaps in the
        value on requests to the secret's hosts only. ``gateway_config`` tunes the gateway's
        caps (and its ``unsafe_*`` switches, for tests and admins). ``guard`` sets how output
        is scanned (``GuardPolicy(mode="redact"|"block"|"off")``, redact by default) and
        ``sensitive`` adds values (a list, or value -> label) it must never let through.
        ``profile`` names a profile of the policy file (``policy_file`` or
        ``$MOAT_POLICY_FILE``) whose settings apply where the caller gives none (see
        docs/profiles.md). Defaults without a profile: ``trust="untrusted"``, 300 s.
        ``max_output_bytes`` caps what one call may print (default 4 MiB; beyond it the
        output is cut and ``Execution.truncated`` is set).
        """
        if profile is not None:
            chosen = resolve_profile(profile, policy_file)
            given = {
                "trust": trust,
                "isolation": isolation,
                "timeout": timeout,
                "limits": limits,
                "network": network,
                "guard": guard,
                "envs": envs,
            }
            kw = chosen.create_kwargs(given)
            trust, isolation, timeout = kw.get("trust"), kw.get("isolation"), kw.get("timeout")
            limits, network, guard, envs = (
                kw.get("limits"),
                kw.get("network"),
                kw.get("guard"),
                kw.get("envs"),
            )
        trust = "untrusted" if trust is None else trust
        timeout = 300 if timeout is None else timeout
        if template != "default":
            raise InvalidArgumentError("unknown template (only 'default' exists)")
        v.choice("trust", trust, _TRUST)
        if isolation is not None:
            v.choice("isolation", isolation, ("container", "gvisor", "microvm"))
        v.number("timeout", timeout, 1, 86400)
        spec_args = {
            "template": template,
            "envs": tuple(sorted(v.envs(envs).items())),
            "mounts": v.mounts(mounts),
            "limits": v.limits(limits),
        }
        meta = v.metadata(metadata)
        if not isinstance(allow_internet_access, bool):
            raise InvalidArgumentError("allow_internet_access must be a bool")
        policy = NetworkPolicy.parse(network)
        if allow_internet_access:
            policy = NetworkPolicy(
                allow_out=policy.allow_out, deny_out=policy.deny_out, internet_access=True
            )
        if secrets is not None and (
            not isinstance(secrets, dict)
            or not all(isinstance(x, Secret) for x in secrets.values())
        ):
            raise InvalidArgumentError("secrets must map variable names to moat.Secret")
        if gateway_config is not None and not isinstance(gateway_config, GatewayConfig):
            raise InvalidArgumentError("gateway_config must be a GatewayConfig")
        eng = engine or default_engine()
        session = await eng.create(
            spec_args,
            isolation,
            trust,
            float(timeout),
            meta,
            guard=guard_policy(guard),
            sensitive=_sensitive(sensitive),
            network=policy,
            secrets=secrets,
            gateway_config=gateway_config,
            max_output=DEFAULT_MAX_OUTPUT
            if max_output_bytes is None
            else int(v.number("max_output_bytes", max_output_bytes, 1024, 256 * 1024 * 1024)),
        )
        return cls(session)

    @property
    def guard(self) -> Guard:
        """This sandbox's guard: ``register(value, label)``, ``canary(kind)``."""
        return self._s.guard  # type: ignore[return-value]

    async def update_network(self, network: NetworkPolicy | dict[str, Any] | None) -> None:
        """Replace the egress policy; open tunnels it no longer allows are closed."""
        await self._s.update_network(NetworkPolicy.parse(network))

    async def audit(self, denied_only: bool = False, limit: int = 1000) -> list[dict[str, Any]]:
        """This sandbox's audit rows: egress decisions, executions, guard findings."""
        return await sandbox_audit(
            self._s, default_engine().audit, denied_only=denied_only, limit=limit
        )

    async def run_code(
        self,
        code: str,
        language: str = "python",
        context: Context | str | None = None,
        timeout: float | None = 60,
        envs: dict[str, str] | None = None,
        on_stdout: Any = None,
        on_stderr: Any = None,
        on_result: Any = None,
        on_error: Any = None,
    ) -> Execution:
        """Run code in a persistent context. Errors in the code are on ``Execution.error``."""
        code = v.text("code", code)
        lang = v.choice("language", language, _LANGUAGES)
        ctx = _context_id(context)
        t = 86400.0 if timeout is None else v.number("timeout", timeout, 0.001, 86400)
        for name, cb in (
            ("on_stdout", on_stdout),
            ("on_stderr", on_stderr),
            ("on_result", on_result),
            ("on_error", on_error),
        ):
            v.callback(name, cb)
        return await self._s.run_code(
            code, lang, ctx, t, v.envs(envs), on_stdout, on_stderr, on_result, on_error
        )

    async def create_code_context(
        self, language: str = "python", cwd: str | None = None
    ) -> Context:
        lang = v.choice("language", language, _LANGUAGES)
        return await self._s.create_context(lang, v.path(cwd) if cwd is not None else None)

    async def list_code_contexts(self) -> list[Context]:
        return await self._s.list_contexts()

    async def restart_code_context(self, context: Context | str) -> None:
        await self._s.restart_context(_context_id(context))

    async def remove_code_context(self, context: Context | str) -> None:
        await self._s.remove_context(_context_id(context))

    async def kill(self) -> None:
        """Kill the sandbox; everything in it dies and nothing of it remains."""
        await self._s.kill("killed")

    async def set_timeout(self, seconds: float) -> None:
        """Give the sandbox ``seconds`` more to live, from now."""
        self._s.set_timeout(v.number("seconds", seconds, 1, 86400))

    async def is_running(self) -> bool:
        return self._s.is_running()

    async def get_info(self) -> SandboxInfo:
        return self._s.info()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()


def _context_id(context: Context | str | None) -> str:
    if context is None:
        return "default"
    if isinstance(context, Context):
        return context.id
    if isinstance(context, str) and 0 < len(context) <= 64 and context.isalnum():
        return context
    raise InvalidArgumentError("context must be a Context, a context id or None")


def _sensitive(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, dict):
        items = value
    elif isinstance(value, (list, tuple)):
        items = {v: "SENSITIVE" for v in value}
    else:
        raise InvalidArgumentError("sensitive must be a list of str or a dict of value to label")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in items.items()):
        raise InvalidArgumentError("sensitive must be a list of str or a dict of value to label")
    return dict(items)


def _bytes(data: str | bytes) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, bytes):
        return data
    raise InvalidArgumentError("data must be str or bytes")


def _check_exit(result: CommandResult) -> CommandResult:
    if result.exit_code != 0:
        raise CommandExitError(result.exit_code, result.stdout, result.stderr)
    return result


__all__ = [
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncSandbox",
    "Execution",
    "ExecutionError",
    "Result",
    "SandboxError",
]
