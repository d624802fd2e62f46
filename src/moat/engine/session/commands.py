"""Commands: start, wait (stream), stdin, signals, list."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import Callable
from typing import Any

from moat.engine.client import Call
from moat.engine.output import OutputSink, off_loop
from moat.engine.session.core import SessionCore
from moat.errors import (
    LeakBlockedError,
    NotFoundError,
    SandboxDiedError,
    SandboxError,
    TimeoutError,
)
from moat.guard import GuardBudgetError
from moat.model import CommandResult, ProcessInfo
from moat.protocol import CHUNK_SIZE, Frame, MsgType


class CommandCalls(SessionCore):
    """Shell commands inside the sandbox."""

    async def start_command(
        self,
        cmd: str,
        envs: dict[str, str],
        cwd: str | None,
        stdin: bool,
        on_stdout: Callable[[str], Any] | None,
        on_stderr: Callable[[str], Any] | None,
        *,
        root: bool = False,
    ) -> tuple[int, Call, OutputSink]:
        fields: dict[str, Any] = {"cmd": cmd, "envs": envs, "stdin": stdin}
        if root:  # as root of the sandbox (docs/users.md)
            fields["root"] = True
        if cwd is not None:
            fields["cwd"] = cwd
        self._check()
        await self._prepare_guard()
        call = await self._check().open(MsgType.CMD_START, fields)
        pid = await self._started(call)
        return pid, call, self._sink(on_stdout, on_stderr)

    async def connect_command(
        self,
        pid: int,
        on_stdout: Callable[[str], Any] | None,
        on_stderr: Callable[[str], Any] | None,
    ) -> tuple[int, Call, OutputSink]:
        """Re-attach to running command ``pid``: its output from now on, and its end."""
        self._check()
        await self._prepare_guard()
        call = await self._check().open(MsgType.CMD_CONNECT, {"pid": pid})
        started = await self._started(call)
        if started != pid:
            call.close()
            raise self._violation("started frame of another process")
        return pid, call, self._sink(on_stdout, on_stderr)

    async def _started(self, call: Call) -> int:
        """The pid of a STARTED frame, first on ``call``; its FAIL raised (guarded)."""
        frame = await self._started_frame(call)
        pid: int = frame.fields["pid"]
        return pid

    async def _started_frame(self, call: Call) -> Frame:
        """The STARTED frame, first on ``call``; its FAIL raised (guarded)."""
        try:
            async with asyncio.timeout(30):
                frame = await call.next()
        except builtins.TimeoutError:
            call.close()
            await self.kill("died: the agent did not start a command")
            raise SandboxDiedError("the sandbox's agent stopped answering") from None
        except asyncio.CancelledError:
            call.close()  # the caller left: its frames must not queue up for nobody
            raise
        if frame.type is MsgType.FAIL:
            call.close()
            raise self._fail(frame, root=call.root)
        if frame.type is not MsgType.STARTED:
            call.close()
            raise self._violation("expected a started frame")
        return frame

    async def wait_command(
        self,
        call: Call,
        sink: OutputSink,
        timeout: float | None,
        pid: int,
        request: MsgType = MsgType.CMD_START,
    ) -> CommandResult:
        handlers = {
            MsgType.STDOUT: lambda f: sink.feed("stdout", f.payload),
            MsgType.STDERR: lambda f: sink.feed("stderr", f.payload),
        }
        try:
            async with asyncio.timeout(timeout):
                done = await self.consume(call, request, handlers, "a command")
        except (LeakBlockedError, GuardBudgetError) as exc:
            # Block mode or a scan past its CPU budget: withheld, the command stopped.
            if isinstance(exc, GuardBudgetError):
                self.audit_budget("stdout")
            with contextlib.suppress(SandboxError):
                await self.kill_command(pid)
            call.close()
            raise
        except builtins.TimeoutError:
            with contextlib.suppress(SandboxError):
                await self.kill_command(pid)
            call.close()
            raise TimeoutError(
                f"command exceeded its {timeout:g}s timeout and was killed"
            ) from None
        except asyncio.CancelledError:
            # The caller stopped reading (a face's stream abandoned): the command runs on,
            # but its output no longer queues into a call nobody reads (up to 64 MiB each).
            call.close()
            raise
        call.close()
        await sink.finish()
        return CommandResult(
            exit_code=done["exit_code"],
            stdout=sink.text("stdout"),
            stderr=sink.text("stderr"),
            truncated=sink.truncated or call.overflowed,
        )

    async def send_stdin(self, pid: int, data: bytes, eof: bool = False) -> None:
        self._check()
        for i in range(0, max(len(data), 1), CHUNK_SIZE):
            last = i + CHUNK_SIZE >= len(data)
            chunk = data[i : i + CHUNK_SIZE]
            await self.request(MsgType.CMD_STDIN, {"pid": pid, "eof": eof and last}, payload=chunk)

    async def kill_command(self, pid: int, signal: int | None = None) -> bool:
        """Signal (default: kill) a command's process group. False if it had ended."""
        fields: dict[str, Any] = {"pid": pid}
        if signal is not None:
            fields["signal"] = signal
        try:
            await self.request(MsgType.CMD_KILL, fields)
        except NotFoundError:
            return False
        return True

    async def list_commands(self) -> list[ProcessInfo]:
        self._check()
        await self._prepare_guard()
        reply = await self.request(MsgType.CMD_LIST, {})
        procs = reply["processes"]
        # Command lines are text chosen inside the sandbox (invariant 4); many or long ones
        # are scanned off the event loop.
        cmds = await off_loop(
            sum(len(p["cmd"]) for p in procs),
            lambda: [self.guard.redact_text(p["cmd"], "list") for p in procs],
        )
        return [ProcessInfo(pid=p["pid"], cmd=c) for p, c in zip(procs, cmds, strict=True)]
