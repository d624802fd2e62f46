"""The engine's ``Inside`` for a session: a command run by the agent, raw bytes in or out.

Trust domain: host engine. Used by drivers to have a sandbox archive (or restore) its own
files (``moat.runtime.inside``). The bytes are stored on the host's disk as an opaque file
and never shown to a caller, so they skip the guard; they still count against a cap, and a
command that overruns it is killed. Frames are checked as on every call (invariant 6).
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
from typing import TYPE_CHECKING, BinaryIO

from moat.engine.client import Call
from moat.errors import NotFoundError, QuotaExceededError, SandboxDiedError, SandboxError
from moat.protocol import CHUNK_SIZE, MsgType

if TYPE_CHECKING:
    from moat.engine.session.commands import CommandCalls

#: The most a persistence command may run.
INSIDE_TIMEOUT = 600.0
#: Stdin chunks sent ahead of their answers (64 KiB each; the agent's pipe holds as much).
STDIN_WINDOW = 4


class AgentInside:
    """Commands inside one session's sandbox, for its driver: as its user, or as its root
    where the sandbox has one (a root-capable container sandbox archives root's files and
    their owners too; root inside is the sandbox's own, never the host's: invariant 9)."""

    def __init__(self, session: CommandCalls, root: bool = False) -> None:
        self._s = session
        #: run as root of the sandbox (where it has one: its root's files are kept too)
        self._root = root

    async def _start(self, cmd: str, stdin: bool) -> tuple[int, object]:
        client = self._s._check()
        fields: dict[str, object] = {"cmd": cmd, "envs": {}, "stdin": stdin}
        if self._root:
            fields["root"] = True
        call = await client.open(MsgType.CMD_START, fields)
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
                await self._feed(pid, src)
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

    async def _feed(self, pid: int, src: BinaryIO) -> None:
        """``src``'s bytes, then EOF, to the command's stdin with up to ``STDIN_WINDOW``
        chunks unanswered (the agent takes frames in order and answers each; every answer
        is checked), not a round trip per chunk. A command that stops reading (``tar`` at
        its archive's end) ends the feed early; its exit status says how it went."""
        client = self._s._check()
        sent: collections.deque[Call] = collections.deque()

        async def settle(stdin: Call) -> bool:
            try:
                await self._s.consume(stdin, MsgType.CMD_STDIN, {}, "a restore's input")
                return True
            except NotFoundError:  # its stdin is closed: it has read what it wanted
                return False
            finally:
                stdin.close()

        reading = True
        try:
            while reading:
                block = await asyncio.to_thread(src.read, CHUNK_SIZE * 16)
                for i in range(0, max(len(block), 1), CHUNK_SIZE):
                    fields = {"pid": pid, "eof": not block}
                    sent.append(
                        await client.open(MsgType.CMD_STDIN, fields, block[i : i + CHUNK_SIZE])
                    )
                    if len(sent) >= STDIN_WINDOW and not await settle(sent.popleft()):
                        reading = False
                        break
                reading = reading and bool(block)
            while sent:
                await settle(sent.popleft())
        finally:
            for stdin in sent:
                stdin.close()


class _Over(Exception):
    """The command's output passed its cap."""
