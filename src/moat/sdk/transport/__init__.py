"""The SDK's transport seam (after httpx's ``BaseTransport``): what ``AsyncSandbox`` speaks to.

A transport carries front-door calls for one tenant: ``LocalTransport`` to the in-process
engine (``moat.sdk.transport.local``, the default: ``Sandbox.create()`` works with no
server), an HTTP transport to ``moat serve`` (the server issue). This module imports only
the model, so a remote transport never loads the engine.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import AsyncIterator, Mapping
from typing import IO, Any, Literal, Protocol

from moat.errors import PolicyError, SandboxError
from moat.model import (
    Context,
    EntryInfo,
    Event,
    FilesystemEvent,
    ProcessInfo,
    PtySize,
    SandboxInfo,
    SandboxMetrics,
    SnapshotInfo,
)

__all__ = ["CommandEvents", "Transport", "WatchEvents"]


class CommandEvents(Protocol):
    """A started command as a transport hands it back."""

    @property
    def pid(self) -> int: ...

    def events(self) -> AsyncIterator[Event]: ...


class WatchEvents(Protocol):
    """A running directory watch as a transport hands it back."""

    def events(self) -> AsyncIterator[FilesystemEvent]: ...

    async def take(self) -> list[FilesystemEvent]: ...

    async def stop(self) -> None: ...


class Transport(abc.ABC):
    """Front-door calls of one tenant. Every method mirrors ``moat.engine.api.FrontDoor``."""

    @abc.abstractmethod
    async def create(self, **options: Any) -> SandboxInfo:
        """Resolve ``options`` (``AsyncSandbox.create``'s arguments) and start a sandbox."""

    @abc.abstractmethod
    async def kill(self, sandbox_id: str) -> bool: ...

    @abc.abstractmethod
    async def set_timeout(self, sandbox_id: str, seconds: float) -> None: ...

    @abc.abstractmethod
    async def info(self, sandbox_id: str) -> SandboxInfo: ...

    @abc.abstractmethod
    async def is_running(self, sandbox_id: str) -> bool: ...

    @abc.abstractmethod
    async def list_sandboxes(
        self, metadata: Mapping[str, str] | None = None, state: str | None = "running"
    ) -> list[SandboxInfo]: ...

    async def pause(self, sandbox_id: str, memory: bool) -> None:
        """Pause the sandbox, keeping its state (``FrontDoor.pause``)."""
        raise PolicyError("this transport can't pause sandboxes")

    async def connect(
        self,
        sandbox_id: str,
        timeout: float | None = None,
        secrets: Mapping[str, str] | None = None,
    ) -> SandboxInfo:
        """The sandbox, resumed if it was paused (``FrontDoor.connect``)."""
        raise PolicyError("this transport can't resume sandboxes")

    async def create_snapshot(
        self, sandbox_id: str, name: str | None, memory: bool | None
    ) -> SnapshotInfo:
        """Snapshot a running sandbox, which keeps running (``FrontDoor.create_snapshot``)."""
        raise PolicyError("this transport can't snapshot sandboxes")

    async def list_snapshots(
        self, sandbox_id: str | None = None, name: str | None = None
    ) -> list[SnapshotInfo]:
        raise PolicyError("this transport can't list snapshots")

    async def delete_snapshot(self, snapshot_id: str) -> bool:
        raise PolicyError("this transport can't delete snapshots")

    async def fork(
        self, sandbox_id: str, count: int, timeout: float | None
    ) -> list[SandboxInfo | SandboxError]:
        """``count`` new sandboxes from the sandbox's state now (``FrontDoor.fork``)."""
        raise PolicyError("this transport can't fork sandboxes")

    @abc.abstractmethod
    async def metrics(
        self, sandbox_id: str, start: dt.datetime | None, end: dt.datetime | None
    ) -> list[SandboxMetrics]: ...

    @abc.abstractmethod
    def guard(self, sandbox_id: str) -> Any: ...

    @abc.abstractmethod
    async def update_network(self, sandbox_id: str, network: Any) -> None: ...

    @abc.abstractmethod
    async def audit(
        self, sandbox_id: str, denied_only: bool = False, limit: int = 1000
    ) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def run_code(
        self,
        sandbox_id: str,
        code: str,
        language: str,
        context: str,
        timeout: float | None,
        envs: Mapping[str, str] | None,
    ) -> AsyncIterator[Event]: ...

    @abc.abstractmethod
    async def create_context(self, sandbox_id: str, language: str, cwd: str | None) -> Context: ...

    @abc.abstractmethod
    async def list_contexts(self, sandbox_id: str) -> list[Context]: ...

    @abc.abstractmethod
    async def restart_context(self, sandbox_id: str, context: str) -> None: ...

    @abc.abstractmethod
    async def remove_context(self, sandbox_id: str, context: str) -> None: ...

    @abc.abstractmethod
    async def start_command(
        self,
        sandbox_id: str,
        cmd: str,
        envs: Mapping[str, str] | None,
        cwd: str | None,
        stdin: bool,
        user: str = "user",
    ) -> CommandEvents: ...

    @abc.abstractmethod
    async def connect_command(self, sandbox_id: str, pid: int) -> CommandEvents: ...

    @abc.abstractmethod
    async def send_stdin(self, sandbox_id: str, pid: int, data: bytes, eof: bool) -> None: ...

    @abc.abstractmethod
    async def signal(self, sandbox_id: str, pid: int, signal: str = "SIGKILL") -> bool: ...

    @abc.abstractmethod
    async def list_commands(self, sandbox_id: str) -> list[ProcessInfo]: ...

    @abc.abstractmethod
    async def read_file(
        self, sandbox_id: str, path: str, format: Literal["text", "bytes"], user: str = "user"
    ) -> str | bytes: ...

    @abc.abstractmethod
    async def write_file(
        self, sandbox_id: str, path: str, data: str | bytes | IO[Any], user: str = "user"
    ) -> EntryInfo: ...

    @abc.abstractmethod
    async def list_dir(
        self, sandbox_id: str, path: str, depth: int, user: str = "user"
    ) -> list[EntryInfo]: ...

    @abc.abstractmethod
    async def stat(self, sandbox_id: str, path: str, user: str = "user") -> EntryInfo: ...

    @abc.abstractmethod
    async def move(
        self, sandbox_id: str, path: str, destination: str, user: str = "user"
    ) -> EntryInfo: ...

    @abc.abstractmethod
    async def remove(self, sandbox_id: str, path: str, user: str = "user") -> None: ...

    @abc.abstractmethod
    async def make_dir(self, sandbox_id: str, path: str, user: str = "user") -> bool: ...

    async def watch_dir(
        self, sandbox_id: str, path: str, recursive: bool, include_entry: bool
    ) -> WatchEvents:
        """Watch a directory (not abstract: a transport without it refuses, typed)."""
        raise PolicyError("this transport lacks the capability 'files.watch'")

    # Terminals: not abstract, so a transport without them still loads (and says so).

    async def start_pty(
        self,
        sandbox_id: str,
        size: PtySize,
        cmd: str | None,
        envs: Mapping[str, str] | None,
        cwd: str | None,
        user: str = "user",
    ) -> CommandEvents:
        raise PolicyError("this transport lacks the capability 'pty.create' (not supported yet)")

    async def send_pty_input(self, sandbox_id: str, pid: int, data: bytes) -> None:
        raise PolicyError("this transport lacks the capability 'pty.input' (not supported yet)")

    async def resize_pty(self, sandbox_id: str, pid: int, size: PtySize) -> None:
        raise PolicyError("this transport lacks the capability 'pty.resize' (not supported yet)")
