"""Code and contexts: ``run_code`` and the interpreter contexts it runs in."""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from moat.engine.client import Call
from moat.engine.output import OutputSink, off_loop
from moat.engine.session.core import SessionCore
from moat.errors import LeakBlockedError, SandboxDiedError, SandboxError, TimeoutError
from moat.guard import GuardBudgetError
from moat.model import Context, Execution, ExecutionError, Logs, Result
from moat.protocol import Frame, MsgType, ProtocolError
from moat.protocol.charts import check_chart
from moat.protocol.replies import check_result_data

log = logging.getLogger("moat.engine")

#: After asking the agent to interrupt a call, how long before we declare it dead.
INTERRUPT_GRACE = 5.0
_SPACE = re.compile(r"\s+")
#: Result formats that are base64 of a binary file: scanned with the guard's binary scanners.
_BINARY = ("png", "jpeg", "pdf")


class CodeCalls(SessionCore):
    """``run_code`` and contexts."""

    async def run_code(
        self,
        code: str,
        language: str,
        context: str,
        timeout: float,
        envs: dict[str, str],
        on_stdout: Callable[[str], Any] | None,
        on_stderr: Callable[[str], Any] | None,
        on_result: Callable[[Result], Any] | None,
        on_error: Callable[[ExecutionError], Any] | None,
    ) -> Execution:
        client = self._check()
        await self._prepare_guard()
        fields = {"context": context, "language": language, "code": code, "envs": envs}
        started = time.monotonic()
        # The send is bounded by the call's timeout too: an agent that stops reading a large
        # cell ends the sandbox instead of blocking past it (invariant 6).
        call = await client.open(MsgType.EXEC, fields, timeout=timeout)
        sink = self._sink(on_stdout, on_stderr)
        execution = Execution()
        restarted = False
        try:
            try:
                async with asyncio.timeout(timeout):
                    restarted = await self._exec_frames(call, sink, execution, on_result, on_error)
                await sink.finish()
            except (LeakBlockedError, GuardBudgetError) as exc:
                # Block mode, or a scan past its CPU budget: nothing more of this call is
                # released; stop the code, and wait (discarding) until the context is free.
                if isinstance(exc, GuardBudgetError):
                    self.audit_budget("result")
                await self._interrupt(call)
                await self._discard_until_done(call)
                raise
            except asyncio.CancelledError:
                # The caller left (a face's client disconnected): stop the code rather than
                # let it hold the context; nobody waits for its end.
                with contextlib.suppress(SandboxError):
                    self._check().send(MsgType.INTERRUPT, 0, {"target": call.id})
                raise
            except builtins.TimeoutError:
                await self._interrupt(call)
                restarted = await self._exec_frames(call, sink, execution, None, None, grace=True)
                await sink.finish()
                raise TimeoutError(
                    f"code execution exceeded its {timeout:g}s timeout and was interrupted"
                    + ("; its context was restarted" if restarted else ""),
                    context_restarted=restarted,
                ) from None
        finally:
            call.close()
            self._record_exec(language, code, started, execution)
        execution.logs = Logs(stdout=sink.chunks["stdout"], stderr=sink.chunks["stderr"])
        execution.truncated = sink.truncated or call.overflowed
        count = self._exec_counts.get(context, 0) + 1
        self._exec_counts[context] = 0 if restarted else count
        execution.execution_count = count
        return execution

    def _record_exec(self, language: str, code: str, started: float, ex: Execution) -> None:
        if self.audit is None:
            return
        try:
            self.audit.record_exec(
                self.id,
                language,
                hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest(),
                round((time.monotonic() - started) * 1000),
                ex.error.name if ex.error else None,
            )
        except Exception:
            log.exception("audit write failed")

    async def _interrupt(self, call: Call) -> None:
        client = self._check()
        with contextlib.suppress(SandboxError):
            client.send(MsgType.INTERRUPT, 0, {"target": call.id})
            await client.drain()

    async def _discard_until_done(self, call: Call) -> None:
        """Drop an interrupted call's frames until it ends; a call that won't end kills us."""
        drop = {t: _drop for t in (MsgType.STDOUT, MsgType.STDERR, MsgType.RESULT, MsgType.ERROR)}
        try:
            async with asyncio.timeout(INTERRUPT_GRACE):
                with contextlib.suppress(SandboxError):  # its FAIL ends it too
                    await self.consume(call, MsgType.EXEC, drop, "an interrupted execution")
        except builtins.TimeoutError:
            await self.kill("died: the agent did not stop an interrupted execution")

    async def _exec_frames(
        self,
        call: Call,
        sink: OutputSink,
        execution: Execution,
        on_result: Callable[[Result], Any] | None,
        on_error: Callable[[ExecutionError], Any] | None,
        grace: bool = False,
    ) -> bool:
        """Consume an execution's frames until DONE; return whether its context restarted."""

        async def result(frame: Frame) -> None:
            r = await self._result(frame.fields["data"], frame.fields["is_main"], sink)
            if r is None:
                return
            execution.results.append(r)
            if on_result is not None:
                await _maybe_await(on_result(r))

        async def error(frame: Frame) -> None:
            f = frame.fields
            # An error counts against the call's cap like any output (invariant 6).
            if not sink.charge(sum(len(f[k]) for k in ("name", "value", "traceback"))):
                return

            async def scan(text: str) -> str:
                return await off_loop(len(text), self.guard.redact_text, text, "error")

            err = ExecutionError(
                name=await scan(f["name"]),
                value=await scan(f["value"]),
                traceback=await scan(f["traceback"]),
            )
            execution.error = err
            if on_error is not None:
                await _maybe_await(on_error(err))

        handlers = {
            MsgType.STDOUT: lambda f: sink.feed("stdout", f.payload),
            MsgType.STDERR: lambda f: sink.feed("stderr", f.payload),
            MsgType.RESULT: result,
            MsgType.ERROR: error,
        }
        try:
            async with asyncio.timeout(INTERRUPT_GRACE if grace else None):
                done = await self.consume(call, MsgType.EXEC, handlers, "an execution")
                return bool(done.get("restarted"))
        except GuardBudgetError:
            raise  # a TimeoutError too, but the guard's: the caller withholds and stops the code
        except builtins.TimeoutError:
            # The agent did not finish an interrupted call: it is not to be trusted any more.
            await self.kill("died: the agent did not stop an interrupted execution")
            raise SandboxDiedError("the sandbox did not stop a timed-out execution") from None

    async def _result(self, data: Any, is_main: bool, sink: OutputSink) -> Result | None:
        """A RESULT's data, checked, counted against the call's cap (None: over it, dropped)
        and guarded format by format (invariants 4, 6): text formats as text, binary ones
        decoded and scanned as files of their type; what the guard refuses is left out."""
        try:
            check_result_data(data)
        except ProtocolError as exc:
            raise self._violation(str(exc)) from None
        sizes = {k: len(v) if isinstance(v, str) else len(json.dumps(v)) for k, v in data.items()}
        if not sink.charge(sum(sizes.values())):
            return None
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("json", "data"):
                dumped = json.dumps(value, ensure_ascii=False)
                text = await off_loop(sizes[key], self.guard.redact_text, dumped, "result")
                kwargs[key] = _json_loads(text)
            elif key == "chart":
                # Titles, labels and categories are sandbox text (invariant 4): guarded as
                # JSON, and checked again after, since a redaction may change the shape
                # (invariant 6); a chart the guard broke is left out, never passed on.
                dumped = json.dumps(value, ensure_ascii=False)
                text = await off_loop(sizes[key], self.guard.redact_text, dumped, "result")
                chart = _json_loads(text)
                if check_chart(chart):
                    kwargs[key] = chart
            elif key in _BINARY:
                safe = await self._binary(key, value)
                if safe is not None:
                    kwargs[key] = safe
            else:
                kwargs[key] = await off_loop(sizes[key], self.guard.redact_text, value, "result")
        return Result(is_main_result=is_main, **kwargs)

    async def _binary(self, key: str, value: str) -> str | None:
        """A base64 result of a binary format, as the guard releases it (None: dropped).
        Not base64 at all ends the sandbox (a malformed reply)."""
        try:
            raw = base64.b64decode(_SPACE.sub("", value), validate=True)
        except (binascii.Error, ValueError):
            raise self._violation("bad binary result") from None
        # Always in a thread: decoding, inflating and scanning a file costs more than a hop.
        safe, _findings = await asyncio.to_thread(
            self.guard.scan_binary_result, key, raw, "result"
        )  # findings went to the audit trail (the guard's on_finding)
        if safe is None:
            return None
        return value if safe == raw else base64.b64encode(safe).decode("ascii")

    # -- contexts ----------------------------------------------------------------------------

    async def create_context(self, language: str, cwd: str | None) -> Context:
        fields: dict[str, Any] = {"language": language}
        if cwd is not None:
            fields["cwd"] = cwd
        await self._prepare_guard()
        return self._context(await self.request(MsgType.CTX_CREATE, fields, timeout=30))

    async def list_contexts(self) -> list[Context]:
        await self._prepare_guard()
        reply = await self.request(MsgType.CTX_LIST, {})
        return [self._context(c) for c in reply["contexts"]]

    async def restart_context(self, context: str) -> None:
        await self.request(MsgType.CTX_RESTART, {"context": context}, timeout=30)
        self._exec_counts.pop(context, None)

    async def remove_context(self, context: str) -> None:
        await self.request(MsgType.CTX_REMOVE, {"context": context})
        self._exec_counts.pop(context, None)

    def _context(self, reply: dict[str, Any]) -> Context:
        # id and language are checked by the reply schema (a pattern, an enum); cwd is text
        # chosen inside the sandbox: guarded (invariant 4).
        return Context(
            id=reply["id"],
            language=reply["language"],
            cwd=self.guard.redact_text(reply["cwd"], "list"),
        )


def _drop(frame: Frame) -> None:
    return None


async def _maybe_await(value: Any) -> None:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        await value


def _json_loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # redaction broke the JSON: return the redacted text rather than the value
