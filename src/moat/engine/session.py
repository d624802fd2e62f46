"""One sandbox as the engine sees it: its process, its agent client, its clock, its calls."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import IO, Any, Protocol

from moat.egress import Gateway
from moat.engine.client import AgentClient, Call, fail_to_error
from moat.engine.output import DEFAULT_MAX_OUTPUT, OutputSink, StreamFilter
from moat.engine.tunnels import Tunnels
from moat.errors import (
    InvalidArgumentError,
    LeakBlockedError,
    NotFoundError,
    PolicyError,
    SandboxDiedError,
    SandboxError,
    TimeoutError,
)
from moat.model import (
    CA_BUNDLE_PATH,
    PROXY_PORT,
    CommandResult,
    Context,
    EntryInfo,
    Execution,
    ExecutionError,
    Logs,
    ProcessInfo,
    Result,
    SandboxInfo,
)
from moat.protocol import CHUNK_SIZE, MsgType
from moat.runtime.base import Runtime, SandboxProcess
from moat.runtime.spec import SandboxSpec

log = logging.getLogger("moat.engine")

#: How long the agent gets to come up.
START_TIMEOUT = 20.0
#: After asking the agent to interrupt a call, how long before we declare it dead.
INTERRUPT_GRACE = 5.0
#: Caps on file transfers through the SDK.
MAX_READ_BYTES = 64 * 1024 * 1024
MAX_WRITE_BYTES = 512 * 1024 * 1024
_RESULT_KEYS = {
    "text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "json", "javascript", "data",
}  # fmt: skip


class Guard(Protocol):
    """What the session needs of moat.guard (invariant 4)."""

    def stream(self, channel: str) -> StreamFilter: ...

    def redact_text(self, text: str, channel: str) -> str: ...

    def redact_bytes(self, data: bytes, channel: str) -> bytes: ...

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


class Session:
    """A live sandbox. All methods are coroutines on the engine's loop."""

    def __init__(
        self,
        spec: SandboxSpec,
        runtime: Runtime,
        guard: Guard,
        timeout: float,
        metadata: dict[str, str],
        on_end: Callable[[Session], None],
        audit: Audit | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
        gateway: Gateway | None = None,
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
        self._timer: asyncio.TimerHandle | None = None
        self._on_end = on_end
        self._exec_counts: dict[str, int] = {}
        self._kill_lock = asyncio.Lock()
        self._timeout = timeout
        self.gateway = gateway
        self.tunnels: Tunnels | None = None
        self._net_setup: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def _prepare_guard(self) -> None:
        """Build the guard's matchers in a thread when its values changed: with thousands of
        registered values that takes seconds, which must not stall the event loop (and with
        it every sandbox's I/O)."""
        if not self.guard.prepared:
            await asyncio.to_thread(self.guard.prepare)

    async def start(self, pooled: bool = False) -> None:
        """Start the sandbox; a ``pooled`` one waits (no lifetime yet) until ``adopt``."""
        if not pooled:
            await self._prepare_guard()
        self.proc = await self.runtime.start(self.spec)
        self.client = AgentClient(self.proc, self._agent_died)
        try:
            await self.client.wait_ready(START_TIMEOUT)
            if self.gateway is not None:
                await self._start_egress(self.client, self.gateway)
        except BaseException:
            await self.kill("died: the agent did not start")
            raise
        if not pooled:
            self.set_timeout(self._timeout)
            self._audit_life("created", None)

    async def adopt(
        self,
        guard: Guard,
        inspect: Callable[[bytes], object],
        network: Any,
        timeout: float,
        metadata: dict[str, str],
        max_output: int,
    ) -> None:
        """Hand a warm (pooled, never used) sandbox to its caller."""
        self._check()
        self.guard = guard
        await self._prepare_guard()
        if self.gateway is not None:
            self.gateway.set_inspect(inspect)
            await self.gateway.update_policy(network)
        self.metadata = metadata
        self.max_output = max_output
        self.started_at = dt.datetime.now(dt.UTC)
        self.set_timeout(timeout)
        self._audit_life("created", "warm pool")

    def _audit_life(self, event: str, reason: str | None) -> None:
        record = getattr(self.audit, "record_sandbox", None)
        if record is None:
            return
        try:
            record(self.id, event, self.spec.tier, reason)
        except Exception:
            log.exception("audit write failed")

    async def _start_egress(self, client: AgentClient, gateway: Gateway) -> None:
        """Connect the agent's proxy port to this sandbox's gateway (DESIGN §3)."""
        self.tunnels = Tunnels(client.send, client.drain, gateway.handle_connection)
        client.tunnels = self.tunnels
        # Only the sandbox's own CA travels (1 KiB, not the 200 KiB of system roots: that
        # matters on a microVM's serial line); the agent prepends the template's system roots.
        # Not awaited: the agent handles frames in order, so anything the caller sends next
        # finds the proxy port up; its answer is checked in the background and a failure
        # ends the sandbox (fail closed). Saves a round trip on every start.
        call = await client.open(
            MsgType.NET_SETUP,
            {"port": PROXY_PORT, "ca_path": CA_BUNDLE_PATH},
            payload=gateway.ca_cert_pem(),
        )
        self._net_setup = asyncio.get_running_loop().create_task(self._check_net_setup(call))

    async def _check_net_setup(self, call: Call) -> None:
        try:
            async with asyncio.timeout(START_TIMEOUT):
                frame = await call.next()
            ok = frame.type is MsgType.DONE
        except (builtins.TimeoutError, SandboxError):
            ok = False
        finally:
            call.close()
        if not ok and self.ended is None:
            log.warning("sandbox %s: egress setup failed; ending it", self.id)
            await self.kill("died: the sandbox's network setup failed")

    async def update_network(self, policy: Any) -> None:
        """Replace the egress policy; open tunnels it no longer allows are closed."""
        self._check()
        if self.gateway is None:
            raise PolicyError("this sandbox has no egress gateway")
        await self.gateway.update_policy(policy)

    def _agent_died(self, reason: str) -> None:
        if self.ended is None:
            log.warning("sandbox %s: %s", self.id, reason)
            self.ended = f"died: {reason}"
            asyncio.get_running_loop().create_task(self.kill(self.ended))

    def set_timeout(self, seconds: float) -> None:
        """Reset the sandbox's remaining lifetime to ``seconds`` from now."""
        self._check()
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self.end_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
        self._timer = loop.call_later(seconds, lambda: loop.create_task(self.kill("timeout")))

    async def kill(self, reason: str = "killed") -> None:
        """Kill the sandbox and everything in it. Idempotent."""
        async with self._kill_lock:
            if self.ended is None or self.ended == reason:
                self.ended = reason
            if self.proc is not None:
                self._audit_life("ended", self.ended)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            # The gateway first: its tunnels end (and are audited) as closed by moat.
            if self.tunnels is not None:
                self.tunnels.close_all()
            if self.gateway is not None:
                with contextlib.suppress(Exception):
                    await self.gateway.close()
            if self.proc is not None:
                proc, self.proc = self.proc, None
                await proc.kill()
            if self.client is not None:
                client, self.client = self.client, None
                client._die("the sandbox was killed")
                await client.close()
            self._on_end(self)

    def is_running(self) -> bool:
        return self.ended is None and self.proc is not None and self.proc.alive()

    def info(self) -> SandboxInfo:
        return SandboxInfo(
            sandbox_id=self.id,
            tier=self.spec.tier,
            template=self.spec.template,
            limits=self.spec.limits,
            started_at=self.started_at,
            end_at=self.end_at,
            metadata=dict(self.metadata),
        )

    def _check(self) -> AgentClient:
        if self.ended is not None or self.client is None:
            raise ended_error(self.ended or "killed")
        return self.client

    # -- code --------------------------------------------------------------------------------

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
        call = await client.open(MsgType.EXEC, fields)
        sink = self._sink(on_stdout, on_stderr)
        execution = Execution()
        restarted = False
        try:
            try:
                async with asyncio.timeout(timeout):
                    restarted = await self._exec_frames(call, sink, execution, on_result, on_error)
                await sink.finish()
            except LeakBlockedError:
                # Block mode: nothing more of this call is released; stop the code, and wait
                # (discarding) until the context is free again.
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
        execution.truncated = sink.truncated
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

    def _sink(
        self, on_stdout: Callable[[str], Any] | None, on_stderr: Callable[[str], Any] | None
    ) -> OutputSink:
        return OutputSink(
            {"stdout": self.guard.stream("stdout"), "stderr": self.guard.stream("stderr")},
            {"stdout": on_stdout, "stderr": on_stderr},
            self.max_output,
        )

    async def _interrupt(self, call: Call) -> None:
        client = self._check()
        with contextlib.suppress(SandboxError):
            client.send(MsgType.INTERRUPT, 0, {"target": call.id})
            await client.drain()

    async def _discard_until_done(self, call: Call) -> None:
        """Drop an interrupted call's frames until it ends; a call that won't end kills us."""
        try:
            async with asyncio.timeout(INTERRUPT_GRACE):
                while (await call.next()).type not in (MsgType.DONE, MsgType.FAIL):
                    pass
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
        try:
            async with asyncio.timeout(INTERRUPT_GRACE if grace else None):
                while True:
                    frame = await call.next()
                    t = frame.type
                    if t is MsgType.STDOUT:
                        await sink.feed("stdout", frame.payload)
                    elif t is MsgType.STDERR:
                        await sink.feed("stderr", frame.payload)
                    elif t is MsgType.RESULT:
                        result = self._result(frame.fields["data"], frame.fields["is_main"])
                        execution.results.append(result)
                        if on_result is not None:
                            await _maybe_await(on_result(result))
                    elif t is MsgType.ERROR:
                        err = ExecutionError(
                            name=self.guard.redact_text(frame.fields["name"], "error"),
                            value=self.guard.redact_text(frame.fields["value"], "error"),
                            traceback=self.guard.redact_text(frame.fields["traceback"], "error"),
                        )
                        execution.error = err
                        if on_error is not None:
                            await _maybe_await(on_error(err))
                    elif t is MsgType.DONE:
                        return bool(frame.fields.get("restarted"))
                    elif t is MsgType.FAIL:
                        raise fail_to_error(self._guard_fail(frame))
                    else:
                        raise self._violation("unexpected frame in an execution")
        except builtins.TimeoutError:
            # The agent did not finish an interrupted call: it is not to be trusted any more.
            await self.kill("died: the agent did not stop an interrupted execution")
            raise SandboxDiedError("the sandbox did not stop a timed-out execution") from None

    def _guard_fail(self, frame: Any) -> Any:
        frame.fields["message"] = self.guard.redact_text(frame.fields["message"], "error")
        return frame

    def _violation(self, what: str) -> SandboxDiedError:
        asyncio.get_running_loop().create_task(self.kill(f"died: {what}"))
        return SandboxDiedError(f"the sandbox's agent broke the protocol ({what})")

    def _result(self, data: dict[str, Any], is_main: bool) -> Result:
        if set(data) - _RESULT_KEYS:
            raise self._violation("unknown result format")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("json", "data"):
                text = self.guard.redact_text(_json_dumps(value), "result")
                kwargs[key] = _json_loads(text, value)
            elif not isinstance(value, str):
                raise self._violation("result format is not text")
            elif key in ("png", "jpeg", "pdf"):
                _check_base64(value)
                kwargs[key] = value  # binary passes; its text metadata is scanned by the guard
            else:
                kwargs[key] = self.guard.redact_text(value, "result")
        return Result(is_main_result=is_main, **kwargs)

    # -- contexts ----------------------------------------------------------------------------

    async def create_context(self, language: str, cwd: str | None) -> Context:
        fields: dict[str, Any] = {"language": language}
        if cwd is not None:
            fields["cwd"] = cwd
        reply = await self._check().request(MsgType.CTX_CREATE, fields, timeout=30)
        return _context(reply)

    async def list_contexts(self) -> list[Context]:
        reply = await self._check().request(MsgType.CTX_LIST, {})
        items = reply.get("contexts")
        if not isinstance(items, list):
            raise self._violation("bad context list")
        return [_context(c) for c in items]

    async def restart_context(self, context: str) -> None:
        await self._check().request(MsgType.CTX_RESTART, {"context": context}, timeout=30)
        self._exec_counts.pop(context, None)

    async def remove_context(self, context: str) -> None:
        await self._check().request(MsgType.CTX_REMOVE, {"context": context})
        self._exec_counts.pop(context, None)

    # -- commands ----------------------------------------------------------------------------

    async def start_command(
        self,
        cmd: str,
        envs: dict[str, str],
        cwd: str | None,
        stdin: bool,
        on_stdout: Callable[[str], Any] | None,
        on_stderr: Callable[[str], Any] | None,
    ) -> tuple[int, Call, OutputSink]:
        fields: dict[str, Any] = {"cmd": cmd, "envs": envs, "stdin": stdin}
        if cwd is not None:
            fields["cwd"] = cwd
        self._check()
        await self._prepare_guard()
        call = await self._check().open(MsgType.CMD_START, fields)
        try:
            async with asyncio.timeout(30):
                frame = await call.next()
        except builtins.TimeoutError:
            call.close()
            await self.kill("died: the agent did not start a command")
            raise SandboxDiedError("the sandbox's agent stopped answering") from None
        if frame.type is MsgType.FAIL:
            call.close()
            raise fail_to_error(self._guard_fail(frame))
        if frame.type is not MsgType.STARTED:
            call.close()
            raise self._violation("expected a started frame")
        return frame.fields["pid"], call, self._sink(on_stdout, on_stderr)

    async def wait_command(
        self, call: Call, sink: OutputSink, timeout: float | None, pid: int
    ) -> CommandResult:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    frame = await call.next()
                    if frame.type is MsgType.STDOUT:
                        await sink.feed("stdout", frame.payload)
                    elif frame.type is MsgType.STDERR:
                        await sink.feed("stderr", frame.payload)
                    elif frame.type is MsgType.FAIL:  # e.g. the agent could not watch it
                        raise fail_to_error(self._guard_fail(frame))
                    elif frame.type is MsgType.DONE:
                        code = frame.fields.get("exit_code")
                        if not isinstance(code, int) or isinstance(code, bool):
                            raise self._violation("bad exit code")
                        break
                    else:
                        raise self._violation("unexpected frame in a command")
        except builtins.TimeoutError:
            with contextlib.suppress(SandboxError):
                await self.kill_command(pid)
            call.close()
            raise TimeoutError(
                f"command exceeded its {timeout:g}s timeout and was killed"
            ) from None
        except LeakBlockedError:
            with contextlib.suppress(SandboxError):
                await self.kill_command(pid)
            call.close()
            raise
        call.close()
        await sink.finish()
        return CommandResult(
            exit_code=code,
            stdout=sink.text("stdout"),
            stderr=sink.text("stderr"),
            truncated=sink.truncated,
        )

    async def send_stdin(self, pid: int, data: bytes, eof: bool = False) -> None:
        client = self._check()
        for i in range(0, max(len(data), 1), CHUNK_SIZE):
            last = i + CHUNK_SIZE >= len(data)
            chunk = data[i : i + CHUNK_SIZE]
            await client.request(
                MsgType.CMD_STDIN, {"pid": pid, "eof": eof and last}, payload=chunk
            )

    async def kill_command(self, pid: int, signal: int | None = None) -> bool:
        fields: dict[str, Any] = {"pid": pid}
        if signal is not None:
            fields["signal"] = signal
        try:
            await self._check().request(MsgType.CMD_KILL, fields)
        except NotFoundError:
            return False
        return True

    async def list_commands(self) -> list[ProcessInfo]:
        self._check()
        await self._prepare_guard()
        reply = await self._check().request(MsgType.CMD_LIST, {})
        items = reply.get("processes")
        if not isinstance(items, list):
            raise self._violation("bad process list")
        out = []
        for p in items:
            if not isinstance(p, dict) or not isinstance(p.get("pid"), int):
                raise self._violation("bad process entry")
            out.append(
                ProcessInfo(pid=p["pid"], cmd=self.guard.redact_text(str(p.get("cmd", "")), "list"))
            )
        return out

    # -- files -------------------------------------------------------------------------------

    async def read_file(self, path: str, max_bytes: int = MAX_READ_BYTES) -> bytes:
        client = self._check()
        await self._prepare_guard()
        call = await client.open(MsgType.FILE_READ, {"path": path, "max_bytes": max_bytes})
        buf = bytearray()
        try:
            async with asyncio.timeout(120):
                while True:
                    frame = await call.next()
                    if frame.type is MsgType.DATA:
                        buf += frame.payload
                        if len(buf) > max_bytes:
                            raise self._violation("file larger than announced")
                    elif frame.type is MsgType.DONE:
                        break
                    elif frame.type is MsgType.FAIL:
                        raise fail_to_error(self._guard_fail(frame))
                    else:
                        raise self._violation("unexpected frame in a file read")
        except builtins.TimeoutError:
            raise TimeoutError("reading the file took too long") from None
        finally:
            call.close()
        return bytes(buf)

    async def write_file(
        self, path: str, chunks: AsyncIterator[bytes], max_bytes: int = MAX_WRITE_BYTES
    ) -> EntryInfo:
        client = self._check()
        call = await client.open(MsgType.FILE_WRITE, {"path": path, "max_bytes": max_bytes})
        total = 0
        try:
            async for chunk in chunks:
                total += len(chunk)
                if total > max_bytes:
                    raise InvalidArgumentError(
                        f"file is larger than the write cap ({max_bytes} bytes)"
                    )
                for i in range(0, len(chunk), CHUNK_SIZE):
                    client.send(MsgType.FILE_CHUNK, call.id, {}, chunk[i : i + CHUNK_SIZE])
                    await client.drain()
                    if call.pending():  # an early FAIL (e.g. disk full)
                        break
            client.send(MsgType.FILE_CHUNK, call.id, {"eof": True})
            await client.drain()
            async with asyncio.timeout(60):
                frame = await call.next()
            if frame.type is MsgType.FAIL:
                raise fail_to_error(self._guard_fail(frame))
            if frame.type is not MsgType.DONE:
                raise self._violation("unexpected frame in a file write")
        except BaseException:
            # Tell the agent to give up on this write (an empty eof closes the file).
            with contextlib.suppress(SandboxError):
                client.send(MsgType.FILE_CHUNK, call.id, {"eof": True})
            raise
        finally:
            call.close()
        return await self.stat(path)

    async def list_dir(self, path: str, depth: int) -> list[EntryInfo]:
        self._check()
        await self._prepare_guard()
        reply = await self._check().request(
            MsgType.FILE_LIST, {"path": path, "depth": depth}, timeout=60
        )
        items = reply.get("entries")
        if not isinstance(items, list):
            raise self._violation("bad directory listing")
        return [self._entry(e) for e in items]

    async def stat(self, path: str) -> EntryInfo:
        self._check()
        await self._prepare_guard()
        return self._entry(await self._check().request(MsgType.FILE_STAT, {"path": path}))

    async def remove(self, path: str) -> None:
        await self._check().request(MsgType.FILE_REMOVE, {"path": path}, timeout=60)

    async def make_dir(self, path: str) -> bool:
        reply = await self._check().request(MsgType.FILE_MKDIR, {"path": path})
        return bool(reply.get("created"))

    def _entry(self, e: Any) -> EntryInfo:
        try:
            target = e.get("symlink_target")
            return EntryInfo(
                name=self.guard.redact_text(str(e["name"]), "files"),
                path=self.guard.redact_text(str(e["path"]), "files"),
                type=str(e["type"]),
                size=int(e["size"]),
                mode=int(e["mode"]),
                permissions=str(e["permissions"]),
                modified_time=dt.datetime.fromtimestamp(float(e["mtime"]), dt.UTC),
                symlink_target=self.guard.redact_text(str(target), "files") if target else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, OSError):
            raise self._violation("bad file entry") from None


def ended_error(reason: str) -> SandboxError:
    """What a call on a sandbox that ended (for ``reason``) raises."""
    if reason == "timeout":
        return TimeoutError("the sandbox reached the end of its lifetime and was killed")
    if reason.startswith("died"):
        return SandboxDiedError(f"the sandbox is gone ({reason[6:]})")
    return NotFoundError("the sandbox was killed")


def _context(reply: Any) -> Context:
    try:
        return Context(id=str(reply["id"]), language=str(reply["language"]), cwd=str(reply["cwd"]))
    except (KeyError, TypeError) as exc:
        raise SandboxDiedError("the sandbox's agent broke the protocol (bad context)") from exc


async def _maybe_await(value: Any) -> None:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        await value


_B64 = re.compile(r"[A-Za-z0-9+/=\s]*")


def _check_base64(value: str) -> None:
    if not _B64.fullmatch(value):
        raise SandboxDiedError("the sandbox's agent broke the protocol (bad image)")


def _json_dumps(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def _json_loads(text: str, original: Any) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text  # redaction broke the JSON: return the redacted text rather than the value


def file_chunks(data: str | bytes | IO[Any]) -> Any:
    """Normalise what files.write accepts into an async iterator of bytes chunks."""

    async def gen() -> AsyncIterator[bytes]:
        if isinstance(data, str):
            raw = data.encode("utf-8")
            for i in range(0, len(raw), 1 << 20):
                yield raw[i : i + (1 << 20)]
        elif isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
            for i in range(0, len(raw), 1 << 20):
                yield raw[i : i + (1 << 20)]
        else:
            while True:
                chunk = await asyncio.to_thread(data.read, 1 << 20)
                if not chunk:
                    break
                yield chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)

    return gen()
