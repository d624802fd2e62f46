"""``sandbox.pty``: terminals inside the sandbox (E2B's ``sandbox.pty`` shape), asyncio.

``await sbx.pty.create(80, 24, on_data=...)`` starts an interactive login shell on a
pseudo-terminal the sandbox's agent allocates; ``on_data`` gets its output as bytes (escape
sequences and all), already guarded. Input is bytes typed at the keyboard: ``b"\\x03"`` is
Ctrl-C, ``b"\\x04"`` at an empty prompt ends the shell. The sync ``Sandbox`` drives this code.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import inspect
from collections.abc import Callable
from typing import Any

from moat.errors import CommandExitError, InvalidArgumentError, SandboxError
from moat.model import CommandResult, End, PtyOutput, PtySize
from moat.model import validate as v
from moat.sdk.transport import CommandEvents, Transport

__all__ = ["AsyncPty", "AsyncPtyHandle", "PtySize"]

#: The user a terminal runs as unless the call names ``root`` (docs/users.md).
USER = "user"


class AsyncPtyHandle:
    """A running terminal: its pid, output to ``on_data``, and its end."""

    def __init__(
        self,
        transport: Transport,
        sandbox_id: str,
        started: CommandEvents,
        on_data: Callable[[bytes], Any] | None,
        timeout: float | None,
        owner: bool,
    ) -> None:
        self._t = transport
        self._sid = sandbox_id
        self.pid = started.pid
        self._on_data = on_data
        self._exit_code: int | None = None
        self._task = asyncio.get_running_loop().create_task(self._consume(started, timeout, owner))
        # Retrieve a failure even if nobody waits, so it is never reported as lost.
        self._task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _consume(
        self, started: CommandEvents, timeout: float | None, owner: bool
    ) -> CommandResult:
        end: End | None = None
        events = started.events()
        try:
            async with asyncio.timeout(timeout):
                async for event in events:
                    if isinstance(event, PtyOutput):
                        if self._on_data is not None:
                            out = self._on_data(event.data)
                            if inspect.isawaitable(out):
                                await out
                    elif isinstance(event, End):
                        end = event
        except builtins.TimeoutError:
            if owner:  # E2B: the terminal lives as long as the call that started it
                with contextlib.suppress(SandboxError):
                    await self.kill()
            raise SandboxError(f"the terminal's {timeout:g}s timeout elapsed") from None
        finally:
            with contextlib.suppress(BaseException):
                await events.aclose()  # type: ignore[attr-defined]
        if end is None or end.exit_code is None:  # pragma: no cover - the front door ends so
            raise SandboxError("the terminal ended without an exit code")
        self._exit_code = end.exit_code
        return CommandResult(exit_code=end.exit_code, stdout="", stderr="", truncated=end.truncated)

    @property
    def exit_code(self) -> int | None:
        """The exit code once the terminal's program has ended, else None."""
        return self._exit_code

    async def wait(self) -> CommandResult:
        """Wait for the terminal's program to end; CommandExitError on a non-zero exit."""
        result = await asyncio.shield(self._task)
        if result.exit_code != 0:
            raise CommandExitError(result.exit_code, "", "")
        return result

    async def send_stdin(self, data: str | bytes) -> None:
        """Type ``data`` into the terminal."""
        await self._t.send_pty_input(self._sid, self.pid, _bytes(data))

    send_input = send_stdin

    async def resize(self, cols: int | PtySize, rows: int | None = None) -> None:
        await self._t.resize_pty(self._sid, self.pid, _size(cols, rows))

    async def kill(self) -> bool:
        """Kill the terminal's session (its shell and every job). False if it had ended."""
        return await self._t.signal(self._sid, self.pid)

    async def disconnect(self) -> None:
        """Stop receiving output; the terminal runs on (``sandbox.pty.connect(pid)``)."""
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


class AsyncPty:
    """``sandbox.pty``."""

    def __init__(self, transport: Transport, sandbox_id: str) -> None:
        self._t = transport
        self._sid = sandbox_id

    async def create(
        self,
        cols: int | PtySize = 80,
        rows: int | None = 24,
        on_data: Callable[[bytes], Any] | None = None,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = 60,
        cmd: str | None = None,
    ) -> AsyncPtyHandle:
        """Start ``cmd`` (default: ``bash -i -l``) on a new ``cols`` x ``rows`` terminal.

        ``timeout`` (seconds; 0 or None: none) bounds the terminal's life, as E2B's does: the
        terminal is killed when it elapses. TERM, LANG and LC_ALL default as E2B's."""
        size = _size(cols, rows)
        v.callback("on_data", on_data)
        limit = _timeout(timeout)
        env = {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **(envs or {})}
        started = await self._t.start_pty(self._sid, size, cmd, env, cwd, user or USER)
        return AsyncPtyHandle(self._t, self._sid, started, on_data, limit, owner=True)

    async def connect(
        self,
        pid: int,
        on_data: Callable[[bytes], Any] | None = None,
        timeout: float | None = 60,
    ) -> AsyncPtyHandle:
        """Re-attach to a running terminal: its output from now on, and its end."""
        v.callback("on_data", on_data)
        limit = _timeout(timeout)
        started = await self._t.connect_command(self._sid, v.pid(pid))
        return AsyncPtyHandle(self._t, self._sid, started, on_data, limit, owner=False)

    async def send_stdin(self, pid: int, data: str | bytes) -> None:
        await self._t.send_pty_input(self._sid, v.pid(pid), _bytes(data))

    async def resize(self, pid: int, cols: int | PtySize, rows: int | None = None) -> None:
        await self._t.resize_pty(self._sid, v.pid(pid), _size(cols, rows))

    async def kill(self, pid: int) -> bool:
        """Kill a terminal's session. False if there was none."""
        return await self._t.signal(self._sid, v.pid(pid))


def _size(cols: int | PtySize, rows: int | None) -> PtySize:
    if isinstance(cols, PtySize):
        return cols
    return PtySize(cols=cols, rows=rows if rows is not None else 24)


def _timeout(timeout: float | None) -> float | None:
    if timeout is None or timeout == 0:
        return None
    return v.timeout("timeout", timeout)


def _bytes(data: str | bytes) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, bytes):
        return data
    raise InvalidArgumentError("data must be str or bytes")
