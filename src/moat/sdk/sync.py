"""``Sandbox``: the synchronous SDK, a thin driver of ``AsyncSandbox`` (see _loop.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

from moat.errors import SandboxError
from moat.model import (
    CommandResult,
    Context,
    EntryInfo,
    Execution,
    FilesystemEvent,
    Limits,
    Mount,
    ProcessInfo,
    SandboxInfo,
    SandboxMetrics,
    SnapshotInfo,
)
from moat.sdk._loop import loop_thread
from moat.sdk.async_ import AsyncCommandHandle, AsyncCommands, AsyncFiles, AsyncSandbox
from moat.sdk.pty_sync import Pty
from moat.sdk.transport import Transport
from moat.sdk.watch import AsyncWatchHandle

if TYPE_CHECKING:  # names of the front door's request vocabulary, for annotations only
    from moat.engine.api import GatewayConfig, GuardPolicy, NetworkPolicy, Secret
    from moat.guard import Guard

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Drive one coroutine of the async SDK on the SDK's loop thread; its result, typed."""
    return loop_thread().run(coro)


class _Callbacks:
    """Runs one sandbox's sync callbacks (``on_stdout``, ``on_result`` ...) on a thread of
    their own, one at a time and in order, each awaited before the next output is handled.

    All sync sandboxes share one event loop thread: a callback run there (a slow UI update,
    a network write) would stall every sandbox's I/O, and a callback that called back into
    the sync API would deadlock. Here it only holds up its own call.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None

    def wrap(self, callback: Any) -> Any:
        if callback is None or not callable(callback) or inspect.iscoroutinefunction(callback):
            return callback  # nothing to move; the async layer validates the rest
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="moat-callbacks")
        executor = self._executor

        async def call(arg: Any) -> None:
            out = await asyncio.get_running_loop().run_in_executor(executor, callback, arg)
            if inspect.isawaitable(out):  # an async callable that isn't a coroutine function
                await out

        return call

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)


class CommandHandle:
    """A command started with ``background=True``."""

    def __init__(self, inner: AsyncCommandHandle) -> None:
        self._h = inner
        self.pid = inner.pid

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Wait for the command to end; raises CommandExitError on a non-zero exit."""
        return _run(self._h.wait(timeout))

    def kill(self) -> bool:
        return _run(self._h.kill())

    def send_stdin(self, data: str | bytes, eof: bool = False) -> None:
        _run(self._h.send_stdin(data, eof))

    @property
    def stdout(self) -> str:
        return self._h.stdout

    @property
    def stderr(self) -> str:
        return self._h.stderr


class Commands:
    """``sandbox.commands``."""

    def __init__(self, inner: AsyncCommands, callbacks: _Callbacks) -> None:
        self._c = inner
        self._cb = callbacks

    def run(
        self,
        cmd: str,
        background: bool = False,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = 60,
        on_stdout: Any = None,
        on_stderr: Any = None,
        stdin: bool | str | bytes | None = None,
        user: str = "user",
    ) -> Any:
        """Run ``cmd`` with bash as ``user``: a CommandResult, or a CommandHandle if
        ``background``."""
        wrap = self._cb.wrap
        out = _run(
            self._c.run(
                cmd,
                background,
                envs,
                cwd,
                timeout,
                wrap(on_stdout),
                wrap(on_stderr),
                stdin,
                user,
            )
        )
        return CommandHandle(out) if isinstance(out, AsyncCommandHandle) else out

    def connect(
        self,
        pid: int,
        on_stdout: Any = None,
        on_stderr: Any = None,
    ) -> CommandHandle:
        """Re-attach to a running command: a handle with its output from now on."""
        wrap = self._cb.wrap
        inner = _run(self._c.connect(pid, wrap(on_stdout), wrap(on_stderr)))
        return CommandHandle(inner)

    def list(self) -> list[ProcessInfo]:
        return _run(self._c.list())

    def kill(self, pid: int) -> bool:
        return _run(self._c.kill(pid))


class WatchHandle:
    """A running directory watch (``files.watch_dir``)."""

    def __init__(self, inner: AsyncWatchHandle) -> None:
        self._h = inner

    def get_new_events(self) -> list[FilesystemEvent]:
        """The events since the last call (a watch without ``on_event``)."""
        return _run(self._h.get_new_events())

    def wait(self) -> None:
        """Wait until the watch ends; its error is raised."""
        _run(self._h.wait())

    def stop(self) -> None:
        _run(self._h.stop())

    @property
    def error(self) -> SandboxError | None:
        return self._h.error


class Files:
    """``sandbox.files``."""

    def __init__(self, inner: AsyncFiles, callbacks: _Callbacks | None = None) -> None:
        self._f = inner
        self._cb = callbacks or _Callbacks()

    def read(self, path: str, format: Literal["text", "bytes"] = "text", user: str = "user") -> Any:
        return _run(self._f.read(path, format, user))

    def write(self, path: str, data: str | bytes | IO[Any], user: str = "user") -> EntryInfo:
        return _run(self._f.write(path, data, user))

    def list(self, path: str = ".", depth: int = 1, user: str = "user") -> list[EntryInfo]:
        return _run(self._f.list(path, depth, user))

    def exists(self, path: str, user: str = "user") -> bool:
        return _run(self._f.exists(path, user))

    def get_info(self, path: str, user: str = "user") -> EntryInfo:
        return _run(self._f.get_info(path, user))

    def rename(self, old_path: str, new_path: str, user: str = "user") -> EntryInfo:
        """Rename or move a file or directory (parents made); the entry at ``new_path``."""
        return _run(self._f.rename(old_path, new_path, user))

    def remove(self, path: str, user: str = "user") -> None:
        _run(self._f.remove(path, user))

    def make_dir(self, path: str, user: str = "user") -> bool:
        return _run(self._f.make_dir(path, user))

    def watch_dir(
        self,
        path: str,
        on_event: Any = None,
        recursive: bool = False,
        *,
        include_entry: bool = False,
        on_exit: Any = None,
        timeout: float | None = None,
    ) -> WatchHandle:
        """Watch a directory; see ``AsyncFiles.watch_dir``. Callbacks run on a thread of
        this sandbox's, never on the SDK's loop."""
        wrap = self._cb.wrap
        inner = _run(
            self._f.watch_dir(
                path,
                wrap(on_event),
                recursive,
                include_entry=include_entry,
                on_exit=wrap(on_exit),
                timeout=timeout,
            )
        )
        return WatchHandle(inner)


class Sandbox:
    """A sandbox. ``with Sandbox.create(timeout=30) as sbx: sbx.run_code("1+1")``."""

    def __init__(self, inner: AsyncSandbox) -> None:
        self._a = inner
        self._callbacks = _Callbacks()
        self.commands = Commands(inner.commands, self._callbacks)
        self.files = Files(inner.files, self._callbacks)
        self.pty = Pty(inner.pty, self._callbacks)

    @property
    def sandbox_id(self) -> str:
        return self._a.sandbox_id

    @classmethod
    def create(
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
        on_timeout: str = "kill",
        idle_timeout: float | None = None,
        transport: Transport | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
    ) -> Sandbox:
        """Start a sandbox; see ``AsyncSandbox.create``."""
        inner = _run(
            AsyncSandbox.create(
                template,
                isolation,
                trust,
                timeout,
                envs,
                mounts,
                limits,
                network,
                secrets,
                metadata,
                allow_internet_access=allow_internet_access,
                gateway_config=gateway_config,
                guard=guard,
                sensitive=sensitive,
                profile=profile,
                policy_file=policy_file,
                max_output_bytes=max_output_bytes,
                on_timeout=on_timeout,
                idle_timeout=idle_timeout,
                transport=transport,
                api_url=api_url,
                api_key=api_key,
            )
        )
        return cls(inner)

    @property
    def guard(self) -> Guard:
        """This sandbox's guard: ``register(value, label)``, ``canary(kind)``."""
        return self._a.guard

    def update_network(self, network: NetworkPolicy | dict[str, Any] | None) -> None:
        """Replace the egress policy; open tunnels it no longer allows are closed."""
        _run(self._a.update_network(network))

    def audit(self, denied_only: bool = False, limit: int = 1000) -> list[dict[str, Any]]:
        """This sandbox's audit rows: egress decisions, executions, guard findings."""
        return _run(self._a.audit(denied_only, limit))

    def run_code(
        self,
        code: str,
        language: str | None = None,
        context: Context | str | None = None,
        timeout: float | None = 60,
        envs: dict[str, str] | None = None,
        on_stdout: Any = None,
        on_stderr: Any = None,
        on_result: Any = None,
        on_error: Any = None,
    ) -> Execution:
        """Run code in a persistent context; see ``AsyncSandbox.run_code``.

        Callbacks run on a thread of this sandbox's (in order, before ``run_code`` returns),
        never on the SDK's event loop: they may take their time and may use this SDK.
        """
        w = self._callbacks.wrap
        return _run(
            self._a.run_code(
                code,
                language,
                context,
                timeout,
                envs,
                w(on_stdout),
                w(on_stderr),
                w(on_result),
                w(on_error),
            )
        )

    def create_code_context(self, language: str = "python", cwd: str | None = None) -> Context:
        return _run(self._a.create_code_context(language, cwd))

    def list_code_contexts(self) -> list[Context]:
        return _run(self._a.list_code_contexts())

    def restart_code_context(self, context: Context | str) -> None:
        _run(self._a.restart_code_context(context))

    def remove_code_context(self, context: Context | str) -> None:
        _run(self._a.remove_code_context(context))

    def kill(self) -> None:
        try:
            _run(self._a.kill())
        finally:
            self._callbacks.close()

    def set_timeout(self, seconds: float) -> None:
        _run(self._a.set_timeout(seconds))

    def is_running(self) -> bool:
        return _run(self._a.is_running())

    def get_info(self) -> SandboxInfo:
        return _run(self._a.get_info())

    def get_metrics(
        self, start: dt.datetime | None = None, end: dt.datetime | None = None
    ) -> list[SandboxMetrics]:
        """Resource samples (CPU, memory, disk) read from the host's kernel every few
        seconds, oldest first, within ``[start, end]`` (timezone-aware datetimes)."""
        return _run(self._a.get_metrics(start, end))

    def pause(self, memory: bool = True) -> None:
        """Stop the sandbox and keep its state; see ``AsyncSandbox.pause``."""
        _run(self._a.pause(memory))

    def beta_pause(self, memory: bool = True) -> None:
        """E2B's name for ``pause``."""
        _run(self._a.beta_pause(memory))

    def create_snapshot(self, name: str | None = None, memory: bool | None = None) -> SnapshotInfo:
        """Snapshot this sandbox, which keeps running; see ``AsyncSandbox.create_snapshot``."""
        return _run(self._a.create_snapshot(name, memory))

    def fork(self, count: int = 1, timeout: float | None = None) -> list[Sandbox | SandboxError]:
        """New sandboxes from this one's state now; see ``AsyncSandbox.fork``."""
        got = _run(self._a.fork(count, timeout))
        return [Sandbox(g) if isinstance(g, AsyncSandbox) else g for g in got]

    @classmethod
    def list_snapshots(
        cls,
        sandbox_id: str | None = None,
        name: str | None = None,
        *,
        transport: Transport | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
    ) -> list[SnapshotInfo]:
        """The caller's snapshots; see ``AsyncSandbox.list_snapshots``."""
        return _run(
            AsyncSandbox.list_snapshots(
                sandbox_id, name, transport=transport, api_url=api_url, api_key=api_key
            )
        )

    @classmethod
    def delete_snapshot(
        cls,
        snapshot_id: str,
        *,
        transport: Transport | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
    ) -> bool:
        """Delete a snapshot; see ``AsyncSandbox.delete_snapshot``."""
        return _run(
            AsyncSandbox.delete_snapshot(
                snapshot_id, transport=transport, api_url=api_url, api_key=api_key
            )
        )

    @classmethod
    def connect(
        cls,
        sandbox_id: str,
        timeout: float | None = None,
        *,
        secrets: dict[str, str] | None = None,
        transport: Transport | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
    ) -> Sandbox:
        """The sandbox, resumed if paused; see ``AsyncSandbox.connect``."""
        inner = _run(
            AsyncSandbox.connect(
                sandbox_id,
                timeout,
                secrets=secrets,
                transport=transport,
                api_url=api_url,
                api_key=api_key,
            )
        )
        return cls(inner)

    @classmethod
    def list(
        cls,
        state: str | None = None,
        metadata: dict[str, str] | None = None,
        *,
        transport: Transport | None = None,
        api_url: str | None = None,
        api_key: str | None = None,
    ) -> list[SandboxInfo]:
        """Running and paused sandboxes; see ``AsyncSandbox.list``."""
        return _run(
            AsyncSandbox.list(
                state, metadata, transport=transport, api_url=api_url, api_key=api_key
            )
        )

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
