"""What every verb of a session shares: its state, the one frame loop, guarded requests.

Trust domain: host engine. Every frame comes from an agent that may be the attacker's
(invariant 6): replies are schema-checked (``moat.protocol.replies``), FAIL messages pass the
guard before they become exceptions (invariant 4), and a frame out of place ends the sandbox.
"""

from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from moat.engine.client import AgentClient, Call, fail_to_error
from moat.engine.output import OutputSink, StreamFilter
from moat.errors import NotFoundError, SandboxDiedError, SandboxError, TimeoutError
from moat.guard import GuardBudgetError
from moat.model import DEFAULT_MAX_OUTPUT
from moat.protocol import Frame, MsgType, ProtocolError
from moat.protocol.replies import check_reply
from moat.runtime.base import Runtime, SandboxProcess
from moat.runtime.spec import SandboxSpec

log = logging.getLogger("moat.engine")

#: A frame handler of ``consume``: sync or async.
Handler = Callable[[Frame], Awaitable[None] | None]


class OutputGuard(Protocol):
    """What a session needs of its guard (``moat.guard.Guard``; invariant 4)."""

    def stream(self, channel: str) -> StreamFilter: ...

    def redact_text(self, text: str, channel: str) -> str: ...

    def redact_bytes(self, data: bytes, channel: str) -> bytes: ...

    def scan_binary_result(
        self, mime: str, data: bytes, channel: str = "result"
    ) -> tuple[bytes | None, list[Any]]: ...

    @property
    def prepared(self) -> bool: ...

    def prepare(self) -> None: ...


class Audit(Protocol):
    def record_exec(
        self,
        sandbox_id: str,
        language: str,
        code_sha256: str,
        duration_ms: int,
        error_name: str | None = None,
    ) -> None: ...


class SessionCore:
    """A live sandbox's state and the helpers its verbs share (see ``Session``)."""

    def __init__(
        self,
        spec: SandboxSpec,
        runtime: Runtime,
        guard: OutputGuard,
        timeout: float,
        metadata: dict[str, str],
        audit: Audit | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> None:
        self.spec = spec
        self.id = spec.sandbox_id
        #: the tenant it belongs to; None while it waits in the warm pool (nobody's)
        self.tenant: str | None = None
        self.runtime = runtime
        self.guard = guard
        self.metadata = metadata
        self.audit = audit
        self.max_output = max_output
        self.started_at = dt.datetime.now(dt.UTC)
        self.end_at = self.started_at + dt.timedelta(seconds=timeout)
        self.proc: SandboxProcess | None = None
        self.client: AgentClient | None = None
        self.ended: str | None = None  # why it ended: "killed", "timeout", "died: ..."
        self._exec_counts: dict[str, int] = {}
        self._timeout = timeout

    async def kill(self, reason: str = "killed") -> None:
        raise NotImplementedError  # pragma: no cover - Session's

    async def _prepare_guard(self) -> None:
        """Build the guard's matchers in a thread when its values changed: with thousands of
        registered values that takes seconds, which must not stall the event loop (and with
        it every sandbox's I/O)."""
        if not self.guard.prepared:
            await asyncio.to_thread(self.guard.prepare)

    def audit_budget(self, channel: str) -> None:
        """A scan ran past its CPU budget: audited like a finding (the output was withheld,
        and the caller gets a TimeoutError)."""
        record = getattr(self.audit, "record_finding", None)
        if record is not None:
            try:
                record(self.id, "guard:budget", channel, canary=False)
            except Exception:
                log.exception("audit write failed")

    def _check(self) -> AgentClient:
        if self.ended is not None or self.client is None:
            raise ended_error(self.ended or "killed")
        return self.client

    def _violation(self, what: str) -> SandboxDiedError:
        asyncio.get_running_loop().create_task(self.kill(f"died: {what}"))
        return SandboxDiedError(f"the sandbox's agent broke the protocol ({what})")

    def _fail(self, frame: Frame, *, root: bool = False) -> SandboxError:
        """An agent FAIL as our exception, its message guarded (invariant 4)."""
        frame.fields["message"] = self.guard.redact_text(frame.fields["message"], "error")
        return fail_to_error(frame, root=root)

    def _sink(
        self, on_stdout: Callable[[str], Any] | None, on_stderr: Callable[[str], Any] | None
    ) -> OutputSink:
        return OutputSink(
            {"stdout": self.guard.stream("stdout"), "stderr": self.guard.stream("stderr")},
            {"stdout": on_stdout, "stderr": on_stderr},
            self.max_output,
        )

    async def consume(
        self, call: Call, request: MsgType, on: Mapping[MsgType, Handler], what: str
    ) -> dict[str, Any]:
        """The one frame loop: hand ``call``'s frames to ``on`` until DONE, and return DONE's
        fields checked against ``request``'s reply schema. FAIL is raised (guarded); any
        other frame, or a reply off its schema, ends the sandbox (invariant 6)."""
        while True:
            frame = await call.next()
            handler = on.get(frame.type)
            if handler is not None:
                out = handler(frame)
                if out is not None:
                    await out
            elif frame.type is MsgType.DONE:
                try:
                    return check_reply(request, frame.fields)
                except ProtocolError:
                    raise self._violation(f"bad reply in {what}") from None
            elif frame.type is MsgType.FAIL:
                raise self._fail(frame, root=call.root)
            else:
                raise self._violation(f"unexpected frame in {what}")

    async def request(
        self, mtype: MsgType, fields: dict[str, Any], timeout: float = 30.0, payload: bytes = b""
    ) -> dict[str, Any]:
        """A simple request: its checked DONE fields, or its (guarded) FAIL raised. A silent
        agent ends the sandbox."""
        client = self._check()
        call = await client.open(mtype, fields, payload)
        try:
            async with asyncio.timeout(timeout):
                return await self.consume(call, mtype, {}, mtype.value)
        except GuardBudgetError:
            self.audit_budget("error")
            raise  # the guard's TimeoutError (a FAIL message withheld), not a silent agent
        except builtins.TimeoutError:
            client._die("the sandbox's agent stopped answering")
            raise SandboxDiedError("the sandbox's agent stopped answering") from None
        finally:
            call.close()


def ended_error(reason: str) -> SandboxError:
    """What a call on a sandbox that ended (for ``reason``) raises."""
    if reason == "timeout":
        return TimeoutError("the sandbox reached the end of its lifetime and was killed")
    if reason == "paused":
        return NotFoundError("the sandbox was paused (connect resumes it)")
    if reason.startswith("died"):
        return SandboxDiedError(f"the sandbox is gone ({reason[6:]})")
    return NotFoundError("the sandbox was killed")
