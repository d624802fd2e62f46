"""Terminals: a command on a pseudo-terminal the agent allocates inside the sandbox.

A PTY is a command (its pid, kill, re-attach and list are the commands'), started with a
size, fed input bytes, resized, and streaming ``PTY`` frames: raw terminal output that passes
the guard's ``pty`` stream before anyone sees it (``moat.engine.ptyout``; invariant 4).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from moat.engine.client import Call
from moat.engine.ptyout import PtySink
from moat.engine.session.commands import CommandCalls
from moat.errors import LeakBlockedError, SandboxError
from moat.guard import GuardBudgetError
from moat.protocol import CHUNK_SIZE, MsgType


class PtyCalls(CommandCalls):
    """PTYs inside the sandbox (over the command verbs)."""

    async def start_pty(
        self,
        cmd: str,
        envs: dict[str, str],
        cwd: str | None,
        cols: int,
        rows: int,
        *,
        root: bool = False,
    ) -> tuple[int, Call]:
        """Start ``cmd`` on a new ``cols`` x ``rows`` terminal: its pid and its call."""
        fields: dict[str, Any] = {"cmd": cmd, "envs": envs, "cols": cols, "rows": rows}
        if root:  # as root of the sandbox (docs/users.md)
            fields["root"] = True
        if cwd is not None:
            fields["cwd"] = cwd
        self._check()
        await self._prepare_guard()
        call = await self._check().open(MsgType.CMD_START, fields)
        frame = await self._started_frame(call)
        if frame.fields.get("pty") is not True:
            call.close()
            raise self._violation("a PTY started without a terminal")
        pid: int = frame.fields["pid"]
        return pid, call

    async def attach(self, pid: int) -> tuple[Call, bool]:
        """Re-attach to running command ``pid``: its call, and whether it runs on a PTY."""
        self._check()
        await self._prepare_guard()
        call = await self._check().open(MsgType.CMD_CONNECT, {"pid": pid})
        frame = await self._started_frame(call)
        if frame.fields["pid"] != pid:
            call.close()
            raise self._violation("started frame of another process")
        return call, frame.fields.get("pty") is True

    def pty_sink(self, deliver: Callable[[bytes], Awaitable[None]]) -> PtySink:
        return PtySink(self.guard.stream("pty"), deliver)

    async def wait_pty(
        self, call: Call, sink: PtySink, pid: int, request: MsgType = MsgType.CMD_START
    ) -> tuple[int, bool]:
        """Stream the PTY's output through ``sink`` until it ends: (exit code, truncated).

        Every kind of output frame is terminal output here (a hostile agent may send stdout
        frames too): all of it passes the one guarded stream."""
        handlers = {t: (lambda f: sink.feed(f.payload)) for t in _OUTPUT}
        try:
            done = await self.consume(call, request, handlers, "a terminal")
        except (LeakBlockedError, GuardBudgetError) as exc:
            if isinstance(exc, GuardBudgetError):
                self.audit_budget("pty")
            sink.abandon()
            if request is MsgType.CMD_START:
                with contextlib.suppress(SandboxError):
                    await self.kill_command(pid)
            call.close()
            raise
        except BaseException:
            sink.abandon()
            call.close()
            raise
        call.close()
        await sink.finish()
        code: int = done["exit_code"]
        return code, call.overflowed

    async def send_pty_input(self, pid: int, data: bytes) -> None:
        """Bytes typed into the terminal (0x03 is Ctrl-C, 0x04 Ctrl-D: the line discipline's)."""
        self._check()
        for i in range(0, max(len(data), 1), CHUNK_SIZE):
            await self.request(MsgType.CMD_STDIN, {"pid": pid}, payload=data[i : i + CHUNK_SIZE])

    async def resize_pty(self, pid: int, cols: int, rows: int) -> None:
        await self.request(MsgType.CMD_RESIZE, {"pid": pid, "cols": cols, "rows": rows})


_OUTPUT = (MsgType.PTY, MsgType.STDOUT, MsgType.STDERR)
