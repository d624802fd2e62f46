"""One sandbox as the engine sees it: its lifecycle (start, adopt, egress, timeout, kill).

The verbs are split by kind: ``code`` (run_code, contexts), ``commands``, ``files``, all over
``core`` (shared state, the one frame loop, schema-checked and guarded replies).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from moat.egress import Gateway
from moat.engine.client import AgentClient, Call
from moat.engine.inside import AgentInside
from moat.engine.metrics import MetricsRing, interval_s
from moat.engine.session.code import INTERRUPT_GRACE, CodeCalls
from moat.engine.session.core import Audit, OutputGuard, SessionCore, ended_error
from moat.engine.session.files import MAX_READ_BYTES, MAX_WRITE_BYTES, FileCalls, file_chunks
from moat.engine.session.pty import PtyCalls
from moat.engine.session.watch import DirWatch, WatchCalls
from moat.engine.tunnels import PortNotOpen, Tunnel, Tunnels
from moat.errors import PolicyError, PortNotOpenError, SandboxError
from moat.model import CA_BUNDLE_PATH, DEFAULT_MAX_OUTPUT, PROXY_PORT, SandboxInfo
from moat.protocol import MsgType
from moat.runtime.base import Runtime
from moat.runtime.spec import SandboxSpec

__all__ = [
    "INTERRUPT_GRACE",
    "MAX_READ_BYTES",
    "MAX_WRITE_BYTES",
    "START_TIMEOUT",
    "Audit",
    "DirWatch",
    "OutputGuard",
    "Session",
    "SessionCore",
    "ended_error",
    "file_chunks",
]

log = logging.getLogger("moat.engine")

#: How long the agent gets to come up.
START_TIMEOUT = 20.0
#: Request ids of a restored sandbox's client start at or above this (far from the ids its
#: old host used, which its agent may still answer), below the protocol's 2**53.
RESTORED_FIRST_ID = 1 << 48


class Session(CodeCalls, PtyCalls, FileCalls, WatchCalls):
    """A live sandbox. All methods are coroutines on the engine's loop.

    Its verbs live in their own modules (code and contexts, commands, files, watches) over one core
    (``core.SessionCore``: state, the frame loop, guarded requests); this is its lifecycle.
    """

    def __init__(
        self,
        spec: SandboxSpec,
        runtime: Runtime,
        guard: OutputGuard,
        timeout: float,
        metadata: dict[str, str],
        on_end: Callable[[Session], None],
        audit: Audit | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
        gateway: Gateway | None = None,
    ) -> None:
        super().__init__(spec, runtime, guard, timeout, metadata, audit, max_output)
        self._timer: asyncio.TimerHandle | None = None
        self._on_end = on_end
        self._kill_lock = asyncio.Lock()
        self.gateway = gateway
        self.tunnels: Tunnels | None = None
        self._net_setup: asyncio.Task[None] | None = None
        self.metrics = MetricsRing(spec.limits, self._stats)
        self._sampler: asyncio.Task[None] | None = None
        self._watches = set()
        #: what it was created with: (config, secrets, sensitive, gateway config), for pause
        self.origin: tuple[Any, Any, Any, Any] | None = None
        #: a warm-pool sandbox: the template it was started on (None: the host's /usr)
        self.pool_template: str | None = None
        #: a face's own non-secret names, kept with a pause (``FrontDoor.set_face``)
        self.face: dict[str, Any] = {}
        #: what the end of its lifetime does instead of a kill (auto-pause), if set
        self.on_expiry: Callable[[], Awaitable[None]] | None = None
        self._idle: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, pooled: bool = False, restore: Path | None = None) -> None:
        """Start the sandbox; a ``pooled`` one waits (no lifetime yet) until ``adopt``;
        ``restore``: from that checkpoint (``moat.engine.persist``)."""
        if not pooled:
            await self._prepare_guard()
        if restore is not None:
            self.proc = await self.runtime.restore(self.spec, restore)  # type: ignore[attr-defined]
        else:
            self.proc = await self.runtime.start(self.spec)
        # A restored agent may still send output for its old host's requests (a command,
        # a cell): the new client's ids start far from those (moat.protocol.resume).
        first = 1 if restore is None else RESTORED_FIRST_ID + secrets.randbelow(1 << 40)
        self.client = AgentClient(self.proc, self._agent_died, first_id=first)
        if hasattr(self.proc, "inside"):  # its driver archives files through the agent
            self.proc.inside = AgentInside(self, root=bool(getattr(self.proc, "can_root", False)))
        if hasattr(self.proc, "agent_gate"):  # its driver quiesces the agent to checkpoint
            self.proc.agent_gate = self.client
        try:
            if getattr(self.proc, "sends_ready", True):
                await self.client.wait_ready(START_TIMEOUT)
            else:  # restored with its memory: the agent goes on where it was (no READY)
                await self.client.request(MsgType.PING, {}, timeout=START_TIMEOUT)
            if self.gateway is not None:
                await self._start_egress(self.client, self.gateway)
            finish = getattr(self.proc, "finish_restore", None)
            if restore is not None and finish is not None:
                await finish()
        except BaseException:
            await self.kill("died: the agent did not start")
            raise
        if not pooled:
            self.set_timeout(self._timeout)
            self._start_sampling()
            self._audit_life("created", None)

    async def adopt(
        self,
        guard: OutputGuard,
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
        self._start_sampling()
        self._audit_life("created", "warm pool")

    async def assume(
        self, guard: OutputGuard, gateway: Gateway | None, metadata: dict[str, str],
        max_output: int,
    ) -> None:  # fmt: skip
        """Take on a paused sandbox's guard and gateway (a warm sandbox the engine has just
        given the paused one's id: ``moat.engine.persist``); its lifetime starts with
        ``begin``. The warm sandbox's own gateway goes, its CA too: the agent is sent the new
        gateway's CA (it rewrites its bundle; its proxy port stays), so nothing of the warm
        sandbox's identity remains inside or out."""
        client = self._check()
        self.guard = guard
        await self._prepare_guard()
        if self.tunnels is not None:
            self.tunnels.close_all()  # a warm sandbox has run nothing: none are open
            self.tunnels = client.tunnels = None
        old, self.gateway = self.gateway, gateway
        if old is not None:
            await old.close()
        if gateway is not None:
            await self._start_egress(client, gateway)
        self.metadata = metadata
        self.max_output = max_output

    def begin(self, timeout: float, reason: str | None = None) -> None:
        """Start the lifetime of a sandbox started with ``pooled=True`` (audited "created")."""
        self.set_timeout(timeout)
        self._start_sampling()
        self._audit_life("created", reason)

    def _audit_life(self, event: str, reason: str | None) -> None:
        record = getattr(self.audit, "record_sandbox", None)
        if record is None:
            return
        try:
            record(self.id, event, self.spec.tier, reason, tenant=self.tenant)
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

    async def open_port(self, port: int) -> Tunnel:
        """Ingress: a stream to ``127.0.0.1:port`` inside (issue 10); PortNotOpenError when
        nothing listens there. The sandbox still has no network interface but loopback."""
        self._check()
        if self._net_setup is not None and not self._net_setup.done():
            await asyncio.shield(self._net_setup)  # the agent's stream machinery is up
        if self.tunnels is None:
            raise PolicyError("this sandbox has no stream channel")
        try:
            return await self.tunnels.dial(port)
        except PortNotOpen:
            raise PortNotOpenError(port) from None
        except (ConnectionResetError, builtins.TimeoutError) as exc:
            self._check()  # ended meanwhile: say so
            raise PortNotOpenError(port) from exc

    def _agent_died(self, reason: str) -> None:
        if self.ended is None:
            log.warning("sandbox %s: %s", self.id, reason)
            self.ended = f"died: {reason}"
            asyncio.get_running_loop().create_task(self.kill(self.ended))

    def _stats(self) -> dict[str, int]:
        proc = self.proc
        return proc.stats() if proc is not None else {}

    def _start_sampling(self) -> None:
        """Sample the sandbox's counters from now until it ends (``moat.engine.metrics``)."""
        if self._sampler is None:
            every = interval_s()  # a bad setting fails the create (the engine kills it)
            self._cpu_baseline()
            self._sampler = asyncio.get_running_loop().create_task(self._sample_loop(every))

    def _cpu_baseline(self) -> None:
        """The CPU baseline of the first sample: one counter where the driver reads it alone
        (``cpu_ns``), else a whole sample."""
        read = getattr(self.proc, "cpu_ns", None)
        if read is None:
            self.metrics.sample()
            return
        try:
            self.metrics.baseline(read())
        except (OSError, ValueError):  # its counters gone: the sandbox is ending
            log.debug("sandbox %s: CPU baseline failed", self.id, exc_info=True)

    async def _sample_loop(self, every: float) -> None:
        while self.ended is None:
            await asyncio.sleep(every)
            try:
                self.metrics.sample()
            except (OSError, ValueError):  # a counter gone mid-read: the sandbox is ending
                log.debug("sandbox %s: metrics sample failed", self.id, exc_info=True)

    def set_timeout(self, seconds: float) -> None:
        """Reset the sandbox's remaining lifetime to ``seconds`` from now."""
        self._check()
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self.end_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
        self._timer = loop.call_later(seconds, lambda: loop.create_task(self.expire()))

    async def expire(self) -> None:
        """The end of its lifetime or idle time: ``on_expiry`` (a pause) where set, else a
        kill; a pause that fails ends in the kill (never a sandbox that outlives its time)."""
        if self.ended is not None:
            return
        hook = self.on_expiry
        if hook is not None:
            try:
                await hook()
                return
            except Exception:  # noqa: BLE001 - logged; the sandbox still ends (invariant 5)
                log.warning("sandbox %s: pause at timeout failed; killing it", self.id)
        await self.kill("timeout")

    def watch_idle(self, seconds: float) -> None:
        """Expire after ``seconds`` without a call, output or traffic either way."""
        if self._idle is None:
            self._idle = asyncio.get_running_loop().create_task(self._idle_loop(seconds))

    async def _idle_loop(self, seconds: float) -> None:
        step = min(5.0, max(0.25, seconds / 4))
        while self.ended is None:
            await asyncio.sleep(step)
            client = self.client
            if client is None or self.ended is not None:
                return
            if time.monotonic() - client.last_active >= seconds:
                asyncio.get_running_loop().create_task(self.expire())
                return

    async def kill(self, reason: str = "killed") -> None:
        """Kill the sandbox and everything in it. Idempotent."""
        async with self._kill_lock:
            if self.ended is None or self.ended == reason:
                self.ended = reason
            started = self.proc is not None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._sampler is not None:
                self._sampler.cancel()
            if self._idle is not None and self._idle is not asyncio.current_task():
                self._idle.cancel()
            # The gateway first: its tunnels end (and are audited) as closed by moat.
            if self.tunnels is not None:
                self.tunnels.close_all()
            if self.gateway is not None:
                with contextlib.suppress(Exception):
                    await self.gateway.close()
            if self.proc is not None:
                proc, self.proc = self.proc, None
                await proc.kill()
            if started:
                # Last: the "ended" row drops the store's scrubber of this sandbox, and the
                # gateway's closing connections above still write rows it must scrub.
                self._audit_life("ended", self.ended)
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
