"""The engine's ``Inside`` for a session: a command run by the agent, raw bytes in or out.

Trust domain: host engine. Used by drivers to have a sandbox archive (or restore) its own
files (``moat.runtime.inside``). The bytes are stored on the host's disk as an opaque file
and never shown to a caller, so they skip the guard; they still count against a cap, and a
command that overruns it is killed. Frames are checked as on every call (invariant 6).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from typing import TYPE_CHECKING, BinaryIO

from moat.errors import QuotaExceededError, SandboxDiedError, SandboxError
from moat.protocol import CHUNK_SIZE, MsgType

if TYPE_CHECKING:
    from moat.engine.session.commands import CommandCalls

#: The most a persistence command may run.
INSIDE_TIMEOUT = 600.0


class AgentInside:
    """Commands inside one session's sandbox, for its driver."""

    def __init__(self, session: CommandCalls) -> None:
        self._s = session

    async def _start(self, cmd: str, stdin: bool) -> tuple[int, object]:
        client = self._s._check()
        call = await client.open(MsgType.CMD_START, {"cmd": cmd, "envs": {}, "stdin": stdin})
        pid = await self._s._started(call)
        return pid, call

    async def output_to(self, cmd: str, dest: BinaryIO, cap: int) -> int:
        pid, call = await self._start(cmd, False)
        total = 0
        over = False

        def out(frame: object) -> None:
            nonlocal total, over
            data = frame.payload  # type: ignore[attr-defined]
            total += len(data)
            if total > cap:
                over = True
                raise _Over
            dest.write(data)

        try:
            async with asyncio.timeout(INSIDE_TIMEOUT):
                done = await self._s.consume(
                    call,  # type: ignore[arg-type]
                    MsgType.CMD_START,
                    {MsgType.STDOUT: out, MsgType.STDERR: lambda f: None},
                    "a checkpoint",
                )
        except _Over:
            with contextlib.suppress(SandboxError):
                await self._s.kill_command(pid)
            raise QuotaExceededError(
                f"the sandbox's files exceed the {max(1, cap >> 20)} MiB that may be kept "
                "(the tenant's snapshot quota or the checkpoint cap); the sandbox keeps running"
            ) from None
        except builtins.TimeoutError:
            with contextlib.suppress(SandboxError):
                await self._s.kill_command(pid)
            raise SandboxError("archiving the sandbox's files took too long") from None
        finally:
            call.close()  # type: ignore[attr-defined]
        if call.overflowed:  # type: ignore[attr-defined]
            raise SandboxDiedError("the sandbox's archive outran the host; nothing was kept")
        code: int = done["exit_code"]
        return code

    async def input_from(self, cmd: str, src: BinaryIO) -> int:
        pid, call = await self._start(cmd, True)
        try:
            async with asyncio.timeout(INSIDE_TIMEOUT):
                while True:
                    chunk = await asyncio.to_thread(src.read, CHUNK_SIZE * 16)
                    await self._s.send_stdin(pid, chunk, eof=not chunk)
                    if not chunk:
                        break
                done = await self._s.consume(
                    call,  # type: ignore[arg-type]
                    MsgType.CMD_START,
                    {MsgType.STDOUT: lambda f: None, MsgType.STDERR: lambda f: None},
                    "a restore",
                )
        except builtins.TimeoutError:
            with contextlib.suppress(SandboxError):
                await self._s.kill_command(pid)
            raise SandboxError("restoring the sandbox's files took too long") from None
        finally:
            call.close()  # type: ignore[attr-defined]
        code: int = done["exit_code"]
        return code


class _Over(Exception):
    """The command's output passed its cap."""
