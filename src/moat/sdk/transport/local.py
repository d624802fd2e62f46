"""``LocalTransport``: the front door of the engine in this process, for one tenant."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Mapping
from typing import IO, Any, Literal

from moat.engine.api import (
    DEFAULT_TENANT,
    CommandStream,
    FrontDoor,
    Secret,
    WatchStream,
    is_snapshot_id,
)
from moat.errors import InvalidArgumentError, SandboxError
from moat.model import (
    Context,
    EntryInfo,
    Event,
    ProcessInfo,
    PtySize,
    SandboxInfo,
    SandboxMetrics,
    SnapshotInfo,
)
from moat.sdk.transport import Transport

#: What a start from a snapshot keeps from the snapshot (its source's): set otherwise, refused.
_KEPT_BY_SNAPSHOT = ("isolation", "trust", "envs", "mounts", "limits", "network", "guard",
                     "profile", "policy_file", "max_output_bytes", "idle_timeout")  # fmt: skip


def _snapshot_options(options: dict[str, Any], gateway_config: Any) -> None:
    """A create from a snapshot takes a timeout, metadata and secret values only: what the
    snapshot keeps (tier, files, network...) is never quietly replaced (invariant 7)."""
    given = [k for k in _KEPT_BY_SNAPSHOT if options.get(k) is not None]
    if options.get("allow_internet_access") or options.get("on_timeout", "kill") != "kill":
        given.append("allow_internet_access/on_timeout")
    if gateway_config is not None:
        given.append("gateway_config")
    if given:
        raise InvalidArgumentError(
            "a sandbox started from a snapshot keeps the snapshot's settings; not allowed: "
            + ", ".join(given)
        )


__all__ = ["LocalTransport"]


class LocalTransport(Transport):
    """Calls ``FrontDoor`` directly (no wire); the embedded SDK's default."""

    def __init__(self, front_door: FrontDoor | None = None, tenant: str = DEFAULT_TENANT) -> None:
        self.front_door = front_door or FrontDoor()
        self.tenant = tenant

    async def create(self, **options: Any) -> SandboxInfo:
        secrets: Mapping[str, Secret] | None = options.get("secrets")
        sensitive = options.pop("sensitive", None)
        gateway_config = options.pop("gateway_config", None)
        if is_snapshot_id(options.get("template")):  # a snapshot is a template (E2B's shape)
            _snapshot_options(options, gateway_config)
            return await self.front_door.create_from_snapshot(
                self.tenant,
                options["template"],
                timeout=options.get("timeout"),
                metadata=options.get("metadata"),
                secrets={name: s.value for name, s in (secrets or {}).items()} or None,
                sensitive=sensitive,
            )
        if all(options.get(k) is None for k in ("isolation", "trust", "profile")):
            tier = self.front_door.default_tier(self.tenant)  # the tenant policy's default
            if tier is not None:
                options["isolation"] = tier
        config = self.front_door.resolve(**options)  # validates secrets (refs) too
        values = {name: s.value for name, s in (secrets or {}).items()}
        return await self.front_door.create(
            self.tenant,
            config,
            secrets=values,
            sensitive=sensitive,
            gateway_config=gateway_config,
        )

    async def kill(self, sandbox_id: str) -> bool:
        return await self.front_door.kill(self.tenant, sandbox_id)

    async def set_timeout(self, sandbox_id: str, seconds: float) -> None:
        await self.front_door.set_timeout(self.tenant, sandbox_id, seconds)

    async def info(self, sandbox_id: str) -> SandboxInfo:
        return await self.front_door.info(self.tenant, sandbox_id)

    async def is_running(self, sandbox_id: str) -> bool:
        return await self.front_door.is_running(self.tenant, sandbox_id)

    async def list_sandboxes(
        self, metadata: Mapping[str, str] | None = None, state: str | None = "running"
    ) -> list[SandboxInfo]:
        return await self.front_door.list_sandboxes(self.tenant, metadata=metadata, state=state)

    async def pause(self, sandbox_id: str, memory: bool) -> None:
        await self.front_door.pause(self.tenant, sandbox_id, memory)

    async def connect(
        self,
        sandbox_id: str,
        timeout: float | None = None,
        secrets: Mapping[str, str] | None = None,
    ) -> SandboxInfo:
        info, _ = await self.front_door.connect(
            self.tenant, sandbox_id, timeout=timeout, secrets=secrets
        )
        return info

    async def create_snapshot(
        self, sandbox_id: str, name: str | None, memory: bool | None
    ) -> SnapshotInfo:
        return await self.front_door.create_snapshot(self.tenant, sandbox_id, name, memory)

    async def list_snapshots(
        self, sandbox_id: str | None = None, name: str | None = None
    ) -> list[SnapshotInfo]:
        return await self.front_door.list_snapshots(self.tenant, sandbox_id, name)

    async def delete_snapshot(self, snapshot_id: str) -> bool:
        return await self.front_door.delete_snapshot(self.tenant, snapshot_id)

    async def fork(
        self, sandbox_id: str, count: int, timeout: float | None
    ) -> list[SandboxInfo | SandboxError]:
        return await self.front_door.fork(self.tenant, sandbox_id, count, timeout=timeout)

    async def metrics(
        self, sandbox_id: str, start: dt.datetime | None, end: dt.datetime | None
    ) -> list[SandboxMetrics]:
        return await self.front_door.metrics(self.tenant, sandbox_id, start, end)

    def guard(self, sandbox_id: str) -> Any:
        return self.front_door.guard(self.tenant, sandbox_id)

    async def update_network(self, sandbox_id: str, network: Any) -> None:
        await self.front_door.update_network(self.tenant, sandbox_id, network)

    async def audit(
        self, sandbox_id: str, denied_only: bool = False, limit: int = 1000
    ) -> list[dict[str, Any]]:
        return await self.front_door.audit(
            self.tenant, sandbox_id, denied_only=denied_only, limit=limit
        )

    def run_code(
        self,
        sandbox_id: str,
        code: str,
        language: str,
        context: str,
        timeout: float | None,
        envs: Mapping[str, str] | None,
    ) -> AsyncIterator[Event]:
        return self.front_door.run_code(
            self.tenant,
            sandbox_id,
            code,
            language=language,
            context=context,
            timeout=timeout,
            envs=envs,
        )

    async def create_context(self, sandbox_id: str, language: str, cwd: str | None) -> Context:
        return await self.front_door.create_context(self.tenant, sandbox_id, language, cwd)

    async def list_contexts(self, sandbox_id: str) -> list[Context]:
        return await self.front_door.list_contexts(self.tenant, sandbox_id)

    async def restart_context(self, sandbox_id: str, context: str) -> None:
        await self.front_door.restart_context(self.tenant, sandbox_id, context)

    async def remove_context(self, sandbox_id: str, context: str) -> None:
        await self.front_door.remove_context(self.tenant, sandbox_id, context)

    async def start_command(
        self,
        sandbox_id: str,
        cmd: str,
        envs: Mapping[str, str] | None,
        cwd: str | None,
        stdin: bool,
        user: str = "user",
    ) -> CommandStream:
        return await self.front_door.start_command(
            self.tenant, sandbox_id, cmd, envs=envs, cwd=cwd, stdin=stdin, user=user
        )

    async def connect_command(self, sandbox_id: str, pid: int) -> CommandStream:
        return await self.front_door.connect_command(self.tenant, sandbox_id, pid)

    async def send_stdin(self, sandbox_id: str, pid: int, data: bytes, eof: bool) -> None:
        await self.front_door.send_stdin(self.tenant, sandbox_id, pid, data, eof)

    async def signal(self, sandbox_id: str, pid: int, signal: str = "SIGKILL") -> bool:
        return await self.front_door.signal(self.tenant, sandbox_id, pid, signal)

    async def list_commands(self, sandbox_id: str) -> list[ProcessInfo]:
        return await self.front_door.list_commands(self.tenant, sandbox_id)

    async def read_file(
        self, sandbox_id: str, path: str, format: Literal["text", "bytes"], user: str = "user"
    ) -> str | bytes:
        return await self.front_door.read_file(self.tenant, sandbox_id, path, format, user=user)

    async def write_file(
        self, sandbox_id: str, path: str, data: str | bytes | IO[Any], user: str = "user"
    ) -> EntryInfo:
        return await self.front_door.write_file(self.tenant, sandbox_id, path, data, user=user)

    async def list_dir(
        self, sandbox_id: str, path: str, depth: int, user: str = "user"
    ) -> list[EntryInfo]:
        return await self.front_door.list_dir(self.tenant, sandbox_id, path, depth, user=user)

    async def stat(self, sandbox_id: str, path: str, user: str = "user") -> EntryInfo:
        return await self.front_door.stat(self.tenant, sandbox_id, path, user=user)

    async def move(
        self, sandbox_id: str, path: str, destination: str, user: str = "user"
    ) -> EntryInfo:
        return await self.front_door.move(self.tenant, sandbox_id, path, destination, user=user)

    async def remove(self, sandbox_id: str, path: str, user: str = "user") -> None:
        await self.front_door.remove(self.tenant, sandbox_id, path, user=user)

    async def make_dir(self, sandbox_id: str, path: str, user: str = "user") -> bool:
        return await self.front_door.make_dir(self.tenant, sandbox_id, path, user=user)

    async def watch_dir(
        self, sandbox_id: str, path: str, recursive: bool, include_entry: bool
    ) -> WatchStream:
        return await self.front_door.watch_dir(
            self.tenant, sandbox_id, path, recursive=recursive, include_entry=include_entry
        )

    async def start_pty(
        self,
        sandbox_id: str,
        size: PtySize,
        cmd: str | None,
        envs: Mapping[str, str] | None,
        cwd: str | None,
        user: str = "user",
    ) -> CommandStream:
        return await self.front_door.start_pty(
            self.tenant, sandbox_id, size, cmd=cmd, envs=envs, cwd=cwd, user=user
        )

    async def send_pty_input(self, sandbox_id: str, pid: int, data: bytes) -> None:
        await self.front_door.send_pty_input(self.tenant, sandbox_id, pid, data)

    async def resize_pty(self, sandbox_id: str, pid: int, size: PtySize) -> None:
        await self.front_door.resize_pty(self.tenant, sandbox_id, pid, size)
