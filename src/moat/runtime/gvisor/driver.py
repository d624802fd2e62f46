"""The gvisor tier's Runtime: one ``runsc run`` per sandbox, the agent on its stdio.

Trust domain: host engine. Per sandbox, under ``state_dir()/gvisor/<sandbox id>/``:

* ``bundle/`` with ``config.json`` (:func:`moat.runtime.gvisor.oci.build_config`) and the
  read-only root skeleton;
* ``root/``, runsc's ``--root`` state directory (unique per sandbox, so ``runsc list`` of one
  sandbox never shows another, and its host processes are found by it);
* ``owner``, the engine's pid and start time, so that ``sweep`` only reaps what a dead engine
  left behind.

runsc runs with ``--network=none`` (the sandbox has loopback only: invariant 2),
``--oci-seccomp`` and the configured platform. The OCI process has ``terminal: false``, so
``runsc run`` passes its stdin/stdout through to the agent: the engine's byte stream.

Limits are enforced by runsc's host cgroup (``linux.resources``) and the sentry's rlimits;
before handing a sandbox over, :meth:`GvisorRuntime.start` reads the cgroup from outside and
refuses the sandbox if the limits are not really in place (invariant 7).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import secrets
import shutil
import signal
import time
from pathlib import Path
from typing import Final

from moat.errors import (
    DiskFullError,
    InvalidArgumentError,
    IsolationUnavailableError,
    PolicyError,
    SandboxDiedError,
)
from moat.paths import state_dir
from moat.protocol import MAX_FRAME, Frame, MsgType, encode, resume
from moat.runtime import reaper, templateroot
from moat.runtime.agentdir import agent_argv, prepare
from moat.runtime.announce import read_announcement
from moat.runtime.base import SandboxProcess
from moat.runtime.gvisor import compat, rootcache
from moat.runtime.gvisor.channel import AgentPipes
from moat.runtime.gvisor.checkpoint import (
    RESTORE_TIMEOUT,
    RestoreImage,
    check_space,
    load_image,
    run_checkpoint,
    wait_running,
    write_manifest,
)
from moat.runtime.gvisor.fscopy import epoll_listener, load_home, save_home
from moat.runtime.gvisor.hostcg import CGROUP_ROOT, HostCgroup, layout
from moat.runtime.gvisor.hostproc import kill_processes_of_root, processes_of_root
from moat.runtime.gvisor.oci import CGROUP_PREFIX, Bundle, build_config, cgroup_name
from moat.runtime.gvisor.probe import PLATFORMS, RUNSC_ENV, probe, runsc_path
from moat.runtime.gvisor.rootfs import OWNED, copied, etc_binds, write_skeleton
from moat.runtime.mounts import check_owners
from moat.runtime.mounts import resolve as resolve_mount
from moat.runtime.offthread import owned
from moat.runtime.quiesce import AgentGate
from moat.runtime.spec import SANDBOX_GID, SandboxSpec

__all__ = ["GvisorRuntime", "GvisorSandbox"]

#: Seconds runsc may take to put the sandbox into its cgroup before we give up.
START_TIMEOUT: Final = 15.0
#: Seconds each cleanup step (runsc delete, waiting for processes to go) may take.
KILL_TIMEOUT: Final = 5.0
#: Seconds kill() waits for ``runsc run`` itself to be reaped (the rest goes to the reaper).
EXIT_WAIT: Final = 0.05
#: Seconds a failed ``runsc checkpoint`` may take to end the sandbox (its save failure does).
FAILED_SAVE_WAIT: Final = 1.0
#: Bytes of runsc's log past which a restore in place starts it afresh.
LOG_KEEP: Final = 1 << 20
#: Bytes of runsc's stderr kept for diagnostics (the agent's stderr goes there too: bounded).
STDERR_KEEP: Final = 64 * 1024
#: Seconds the agent gets to answer QUIESCE before a memory checkpoint (it answers at once
#: unless its reader is stuck); past it the checkpoint is refused and the sandbox runs on.
QUIESCE_TIMEOUT: Final = 10.0
#: What a restored (quiesced) agent may write before its announcement: nothing, honestly;
#: past one frame's worth the restore fails closed (invariant 6).
ANNOUNCE_DISCARD_MAX: Final = MAX_FRAME
#: Bytes of host entropy in the RESUME frame (the agent reseeds before it announces).
RESUME_SEED_BYTES: Final = 64
_PYTHON: Final = "/usr/bin/python3"


def _base() -> Path:
    base = state_dir() / "gvisor"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return base


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells a live engine from a recycled pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


class GvisorSandbox:
    """One running gVisor sandbox as the engine sees it (implements ``SandboxProcess``).

    Its channel (:class:`~moat.runtime.gvisor.channel.AgentPipes`) outlives the runsc process
    behind it: a snapshot with ``leave_running`` replaces that process with a restored one
    (:meth:`adopt`) while the engine keeps reading and writing the same stream.
    """

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        *,
        pipes: AgentPipes,
        runsc: str,
        sandbox_id: str,
        workdir: Path,
        cgroup: HostCgroup,
    ) -> None:
        if pipes.reader is None or pipes.writer is None:
            raise SandboxDiedError("the gvisor sandbox has no channel")
        self.reader: asyncio.StreamReader = pipes.reader
        self.writer: asyncio.StreamWriter = pipes.writer
        self._pipes = pipes
        #: whether the agent announces itself with READY (False after a memory restore)
        self.sends_ready = True
        self._runsc = runsc
        self._id = sandbox_id
        self._workdir = workdir
        self._root = str(workdir / "root")
        self._cgroup = cgroup
        self._stderr: collections.deque[bytes] = collections.deque()
        self._lock = asyncio.Lock()
        #: held by a checkpoint (never by kill, which must not wait for one)
        self.op_lock = asyncio.Lock()
        self._killed = False
        #: a checkpoint is replacing the runsc process: its exit is not the sandbox's end
        self.swapping = False
        #: checkpointed without leave_running: stopped for good, the channel open until kill
        self.stopped = False
        #: the engine's hold on the agent for a memory checkpoint (lent once it is up)
        self.agent_gate: AgentGate | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._proc = proc
        self._watch(proc)

    def _watch(self, proc: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        if proc.stderr is not None:
            self._tasks.append(loop.create_task(self._drain(proc.stderr)))
        self._tasks.append(loop.create_task(self._on_exit(proc)))

    async def _on_exit(self, proc: asyncio.subprocess.Process) -> None:
        await proc.wait()
        if proc is self._proc and not self.swapping and not self.stopped:
            # The sandbox ended by itself: let the engine's reader see EOF (invariant 6).
            self._pipes.release()

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        kept = sum(len(c) for c in self._stderr)
        while chunk := await stream.read(8192):
            self._stderr.append(chunk)
            kept += len(chunk)
            while kept > STDERR_KEEP and self._stderr:
                kept -= len(self._stderr.popleft())

    def stderr_tail(self) -> bytes:
        """The last bytes runsc and the agent wrote to stderr (for the audit log, not callers)."""
        return b"".join(self._stderr)

    def alive(self) -> bool:
        if self._killed or self.stopped:
            return False
        return self.swapping or self._proc.returncode is None

    def stats(self) -> dict[str, int]:
        return self._cgroup.stats() if self.alive() else {}

    @property
    def workdir(self) -> Path:
        """The host directory holding this sandbox's bundle and runsc state."""
        return self._workdir

    @property
    def sandbox_id(self) -> str:
        return self._id

    @property
    def cgroup(self) -> HostCgroup:
        return self._cgroup

    @property
    def killed(self) -> bool:
        return self._killed

    @property
    def pipes(self) -> AgentPipes:
        return self._pipes

    @property
    def process(self) -> asyncio.subprocess.Process:
        """The runsc process behind the sandbox now (``runsc run`` or ``runsc restore``)."""
        return self._proc

    def adopt(self, proc: asyncio.subprocess.Process) -> None:
        """Make ``proc`` (a ``runsc restore`` on this sandbox's pipes) the process behind it."""
        self._proc = proc
        self._tasks = [t for t in self._tasks if not t.done()]  # one swap's worth at most
        self._watch(proc)

    async def kill(self) -> None:
        """End the sandbox now; its files, cgroup and runsc state go in the background.

        Returns once every host process of the sandbox (sentry, gofer, ptrace stubs, ``runsc
        run`` or ``runsc restore``, a checkpoint in flight) has a SIGKILL pending and the
        agent's channel is closed: nothing of it can run or be reached. Waiting for them to
        exit and the removals are left to :mod:`moat.runtime.reaper`, drained at exit and
        covered by ``sweep`` after a crash (invariant 5). Never waits for a checkpoint.
        """
        async with self._lock:
            if self._killed:
                return
            self._killed = True
            _kill_now(self._cgroup, self._root, self._proc)
            self._pipes.close()
            workdir, cgroup = self._workdir, self._cgroup
            if self.stopped:
                # Checkpointed (paused): runsc has ended every process and removed its state
                # and cgroup already; removing the rest now lets a restore under the same id
                # follow at once (the reaper would race it for the work dir and the cgroup).
                await asyncio.to_thread(_reap_blocking, workdir, cgroup)
            else:
                reaper.submit(self._id, lambda: _reap_blocking(workdir, cgroup))
            # `runsc run` (our child) dies within milliseconds of its SIGKILL: reap it while
            # the loop is surely alive, but never let it hold kill() up.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), EXIT_WAIT)
            # Not reaped yet (a loaded host), or reaped while a process of the sandbox that
            # the reaper has yet to see gone still holds runsc's stderr: close asyncio's
            # transport now, so that it is not finalised unclosed after the loop has gone
            # (a ResourceWarning; seen after pauses, the stderr pipe still open).
            transport = getattr(self._proc, "_transport", None)
            if isinstance(transport, asyncio.BaseTransport) and not transport.is_closing():
                transport.close()
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def _spawn(argv: list[str], workdir: Path, pipes: AgentPipes) -> asyncio.subprocess.Process:
    """Start a runsc process with the agent's pipes as its stdin/stdout."""
    stdin, stdout = pipes.sandbox_ends()
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=stdin,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        env=RUNSC_ENV,
        cwd=workdir,
        start_new_session=True,
    )


async def _run_bounded(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env=RUNSC_ENV,
        start_new_session=True,
    )
    try:
        await asyncio.wait_for(proc.wait(), KILL_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def _kill_now(cgroup: HostCgroup, root: str, proc: asyncio.subprocess.Process | None) -> int:
    """SIGKILL every host process of the sandbox, without waiting; return how many.

    The cgroup holds the sentry, the gofer and the ptrace stubs; the per-sandbox --root finds
    anything else (``runsc run`` itself). Sandboxed code only runs in stubs the sentry drives,
    and both are signalled here.
    """
    n = cgroup.kill() + kill_processes_of_root(root)
    if proc is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return n


def _reap_blocking(workdir: Path, cgroup: HostCgroup) -> None:
    """The rest of a kill, on the reaper's thread: wait for the processes, remove the cgroup
    and the sandbox's directory (bundle and runsc state).

    No ``runsc delete`` here: everything it would stop is dead already and everything it would
    remove (its state under --root, the cgroup) is removed below; it only added 1-2 s of
    retries and a process of its own that outlived kill().
    """
    root = str(workdir / "root")
    deadline = time.monotonic() + KILL_TIMEOUT
    while True:
        left = cgroup.kill() + kill_processes_of_root(root)
        removed = cgroup.remove()
        if (not left and removed) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    shutil.rmtree(workdir, ignore_errors=True)


async def _teardown(
    runsc: str,
    sandbox_id: str,
    workdir: Path,
    cgroup: HostCgroup,
    proc: asyncio.subprocess.Process | None,
) -> None:
    """Kill everything of one sandbox and remove its files and cgroup (invariant 5)."""
    root = str(workdir / "root")
    # 1. Kill first, directly (see _kill_now).
    _kill_now(cgroup, root, proc)
    # 2. Let runsc release what it holds (its state, its cgroups) the way it knows.
    if Path(root).is_dir():  # noqa: ASYNC240 - one stat, in the background reaper
        await _run_bounded([runsc, "--root", root, "delete", "--force", sandbox_id])
    if proc is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), KILL_TIMEOUT)
    # 3. Belt and braces: whatever is still there is killed, waited for and removed.
    deadline = time.monotonic() + KILL_TIMEOUT
    while True:
        left = cgroup.kill() + kill_processes_of_root(root)
        removed = cgroup.remove()
        if (not left and removed) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    shutil.rmtree(workdir, ignore_errors=True)


class GvisorRuntime:
    """The gvisor tier (implements ``Runtime`` and ``Checkpointable``).

    ``platform`` is runsc's platform: ``ptrace`` (default; works everywhere), ``kvm`` (fast
    where KVM is real; it hangs on PVM hosts, which the probe detects) or ``systrap`` (newer
    runsc only). ``runsc`` is the binary, by name on PATH or absolute.
    """

    name = "gvisor"
    #: runsc checkpoints keep every process and its memory (issue 11).
    keeps_memory = True

    def __init__(self, *, platform: str = "ptrace", runsc: str = "runsc") -> None:
        if platform not in PLATFORMS:
            raise InvalidArgumentError(
                f"gvisor platform must be one of {', '.join(sorted(PLATFORMS))}"
            )
        if not isinstance(runsc, str) or not runsc or "\0" in runsc:
            raise InvalidArgumentError("runsc must be a program name or an absolute path")
        self.platform = platform
        self.runsc = runsc

    def probe(self) -> str | None:
        return probe(self.platform, self.runsc)

    async def start(self, spec: SandboxSpec) -> GvisorSandbox:
        reason = self.probe()
        if reason is not None:
            raise IsolationUnavailableError(reason)
        exe = runsc_path(self.runsc)
        if exe is None:  # removed since the (cached) probe
            raise IsolationUnavailableError("gvisor: runsc is not installed")
        workdir = _base() / spec.sandbox_id
        try:
            workdir.mkdir(mode=0o700)
        except FileExistsError as exc:
            raise InvalidArgumentError("a sandbox with this id already exists") from exc
        return await self._launch(exe, spec, workdir, None)

    async def _launch(
        self, exe: str, spec: SandboxSpec, workdir: Path, image: RestoreImage | None
    ) -> GvisorSandbox:
        """``runsc run`` (or, with ``image``, ``runsc restore``) of ``spec`` in ``workdir``."""
        cgroup = HostCgroup(cgroup_name(spec))
        proc: asyncio.subprocess.Process | None = None
        pipes = AgentPipes()
        try:
            (workdir / "owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
            # Built once per host (make install does it); a compile the first time otherwise.
            preload = await asyncio.to_thread(compat.build)
            # The gofer keeps host owners and the sandbox's user is uid/gid 1000: refuse an
            # entry that would give it more than other host users get (walks the trees).
            for m in spec.mounts:
                await asyncio.to_thread(check_owners, m, "gvisor")
            agent_dir = prepare() if image is None else image.agent_dir
            # on a thread (a template's first start writes its skeleton), finished before a
            # cancellation's teardown below removes the work dir
            config = await owned(
                lambda: self._bundle(spec, workdir, preload, agent_dir), lambda _: None
            )
            if image is not None:
                image.check(config, workdir, "/" + cgroup_name(spec))
            await pipes.connect()
            nonce = None
            if image is not None and image.handshake:
                # Its agent was quiesced: this RESUME is the first thing it reads on its
                # new stdin (written now: it waits in the pipe until the sandbox runs).
                nonce = secrets.token_hex(resume.NONCE_BYTES)
                seed = secrets.token_bytes(RESUME_SEED_BYTES)
                if pipes.writer is None:  # connect() sets it
                    raise SandboxDiedError("the gvisor sandbox has no channel")
                pipes.writer.write(encode(Frame(MsgType.RESUME, 1, {"nonce": nonce}, seed)))
            argv = self._argv(exe, workdir, spec.sandbox_id, image=image)
            proc = await _spawn(argv, workdir, pipes)
            await self._verify_limits(proc, cgroup, config)
            if image is not None:
                await wait_running(proc, workdir / "root", spec.sandbox_id)
            if nonce is not None:
                await _announced(pipes, nonce)
            sb = GvisorSandbox(
                proc,
                pipes=pipes,
                runsc=exe,
                sandbox_id=spec.sandbox_id,
                workdir=workdir,
                cgroup=cgroup,
            )
            # A memory restore's agent announces itself with READY after its line (a
            # checkpoint of before the handshake: it carries on, no READY; the engine pings).
            sb.sends_ready = image is None or not image.memory or image.handshake
            return sb
        except BaseException:
            pipes.close()
            await _teardown(exe, spec.sandbox_id, workdir, cgroup, proc)
            raise

    async def checkpoint(
        self, proc: SandboxProcess, dest: Path, *, memory: bool, leave_running: bool
    ) -> None:
        """Save ``proc`` into the empty directory ``dest`` with ``runsc checkpoint``.

        runsc 20221219 stops the sandbox once it is saved (its ``--leave-running`` restores
        onto the checkpoint command's own stdio, which no one reads), so with
        ``leave_running`` the driver restores it in place at once, on the same pipes
        (:mod:`moat.runtime.gvisor.channel`): the engine's stream carries on. Without it the
        sandbox is left stopped, its channel open, for the caller's ``kill``.

        ``memory=False`` saves ``/home/user`` only, as a tar made inside the sandbox; a
        failure leaves the sandbox running.
        """
        if not isinstance(proc, GvisorSandbox):
            raise InvalidArgumentError("not a gvisor sandbox")
        if not dest.is_dir() or any(dest.iterdir()):  # noqa: ASYNC240 - one small listing
            raise InvalidArgumentError("the checkpoint destination must be an empty directory")
        exe = runsc_path(self.runsc)
        if exe is None:
            raise IsolationUnavailableError("gvisor: runsc is not installed")
        async with proc.op_lock:
            if not proc.alive():
                raise SandboxDiedError("the gvisor sandbox is not running")
            if memory:
                if await epoll_listener(exe, proc.workdir, proc.sandbox_id):
                    if proc.killed or not proc.alive():  # the probe failed as it was killed
                        raise SandboxDiedError("the gvisor sandbox was killed")
                    raise PolicyError(
                        "gvisor: this runsc cannot save a listening socket that a process "
                        "watches with epoll (e.g. an asyncio or Node server); stop it, or "
                        "pause with memory=False"
                    )
                await self._quiesced_checkpoint(exe, proc, dest, leave_running)
                return
            await self._save_files(exe, proc, dest)
            if not leave_running:
                # Stopped like a memory pause, so that its kill frees the id at once.
                proc.stopped = True
                _kill_now(proc.cgroup, str(proc.workdir / "root"), proc.process)
                await _stopped(proc, KILL_TIMEOUT)

    async def _save_files(self, exe: str, sb: GvisorSandbox, dest: Path) -> None:
        """``memory=False``: ``/home/user`` as a tar (:mod:`moat.runtime.gvisor.fscopy`)."""
        try:
            await asyncio.to_thread(check_space, dest, sb.stats().get("memory_bytes", 0))
            await save_home(
                exe, sb.workdir, sb.sandbox_id, dest, getattr(sb, "checkpoint_cap", None)
            )
            await asyncio.to_thread(
                write_manifest,
                dest,
                exe=exe,
                platform=self.platform,
                workdir=sb.workdir,
                cgroups_path="/" + sb.cgroup.name,
                sandbox_id=sb.sandbox_id,
                memory=False,
            )
        except BaseException:
            _empty(dest)
            raise

    async def _quiesced_checkpoint(
        self, exe: str, sb: GvisorSandbox, dest: Path, leave_running: bool
    ) -> None:
        """The agent quiesced around the checkpoint (moat.runtime.quiesce), when the engine
        lent a gate: its image then holds no half frame either way, and a restore onto a
        new stream starts with a RESUME handshake (moat.protocol.resume). Released after a
        restore in place or a failure; a paused (stopped) sandbox is never released."""
        gate = sb.agent_gate
        if gate is None:  # the driver used on its own (no engine): no handshake
            await self._checkpoint(exe, sb, dest, leave_running, quiesced=False)
            return
        await gate.quiesce(QUIESCE_TIMEOUT)
        saved = False
        try:
            await self._checkpoint(exe, sb, dest, leave_running, quiesced=True)
            saved = True
        finally:
            if leave_running or not saved:
                gate.release()

    async def _checkpoint(
        self, exe: str, sb: GvisorSandbox, dest: Path, leave_running: bool, *, quiesced: bool
    ) -> None:
        """Checkpoint, then (``leave_running``) restore in place. On any failure ``dest`` is
        emptied; the sandbox is as it was (refused before runsc ran), or dead."""
        sb.swapping = True
        try:
            await self._save(exe, sb, dest, quiesced)
            if not leave_running:
                sb.stopped = True
                return
            try:
                await self._restore_in_place(exe, sb, dest)
            except BaseException as exc:
                killed = sb.killed
                await sb.kill()  # stopped by its checkpoint and not restored: end it
                if killed:
                    raise SandboxDiedError("the gvisor sandbox was killed") from exc
                raise
        except BaseException:
            _empty(dest)
            raise
        finally:
            sb.swapping = False
            if sb.process.returncode is not None and not sb.stopped:
                sb.pipes.release()  # it ended during the swap: the engine must see EOF

    async def _save(self, exe: str, sb: GvisorSandbox, dest: Path, quiesced: bool) -> None:
        try:
            await run_checkpoint(
                exe,
                sb.workdir / "root",
                sb.workdir / "runsc.log",
                sb.sandbox_id,
                dest,
                sb.stats().get("memory_bytes", 0),
            )
        except DiskFullError:
            raise  # refused before runsc ran: the sandbox is as it was
        except BaseException:
            # runsc ends a sandbox whose save failed: then it is stopped for good
            if not sb.killed and await _stopped(sb, FAILED_SAVE_WAIT):
                sb.stopped = True
                sb.pipes.release()
            raise
        # Saved: the sentry kills its tasks and `runsc run` exits, removing its state.
        if not await _stopped(sb, KILL_TIMEOUT):
            await sb.kill()
            raise SandboxDiedError("the gvisor sandbox did not stop after its checkpoint")
        await asyncio.to_thread(  # reads files, may run `runsc --version`: off the loop
            write_manifest,
            dest,
            exe=exe,
            platform=self.platform,
            workdir=sb.workdir,
            cgroups_path="/" + sb.cgroup.name,
            sandbox_id=sb.sandbox_id,
            handshake=quiesced,
        )

    async def _restore_in_place(self, exe: str, sb: GvisorSandbox, src: Path) -> None:
        """Restore ``sb`` from ``src`` under its own id, work dir and pipes."""
        image = await asyncio.to_thread(load_image, src, exe, self.platform)
        config = json.loads((sb.workdir / "bundle" / "config.json").read_text())
        root = sb.workdir / "root"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(mode=0o700)
        log = sb.workdir / "runsc.log"
        with contextlib.suppress(OSError):
            if log.stat().st_size > LOG_KEEP:  # each swap appends to it: keep it bounded
                log.write_bytes(b"")
        if sb.killed:
            raise SandboxDiedError("the gvisor sandbox was killed")
        argv = self._argv(exe, sb.workdir, sb.sandbox_id, image=image)
        try:
            proc = await _spawn(argv, sb.workdir, sb.pipes)
        except OSError as exc:
            raise SandboxDiedError("the gvisor sandbox could not be restored") from exc
        if sb.killed:  # killed while spawning: the reaper's loop finds it by its --root
            _kill_now(sb.cgroup, str(root), proc)
            raise SandboxDiedError("the gvisor sandbox was killed")
        sb.adopt(proc)
        await self._verify_limits(proc, sb.cgroup, config)
        await wait_running(proc, root, sb.sandbox_id)

    async def restore(self, spec: SandboxSpec, src: Path) -> GvisorSandbox:
        """Start a sandbox for ``spec`` from the checkpoint in ``src`` (left unchanged).

        The bundle is built afresh for ``spec`` (a fork has its own id, work dir, cgroup and
        pipes) and must match the checkpointed one (:mod:`moat.runtime.gvisor.checkpoint`).
        Its agent was quiesced at the checkpoint: it gets RESUME with a fresh nonce first and
        announces itself (``resume.line`` + READY, read here up to the line). An image of
        before the handshake: the agent carries on reading its (new) stdin, no READY.
        """
        reason = self.probe()
        if reason is not None:
            raise IsolationUnavailableError(reason)
        exe = runsc_path(self.runsc)
        if exe is None:
            raise IsolationUnavailableError("gvisor: runsc is not installed")
        image = await asyncio.to_thread(load_image, src, exe, self.platform)
        workdir = _base() / spec.sandbox_id
        try:
            workdir.mkdir(mode=0o700)
        except FileExistsError as exc:
            raise InvalidArgumentError("a sandbox with this id already exists") from exc
        if image.memory:
            return await self._launch(exe, spec, workdir, image)
        # Files only: a fresh sandbox (its agent sends READY, as after start) and its home.
        sb = await self._launch(exe, spec, workdir, None)
        try:
            await wait_running(sb.process, workdir / "root", spec.sandbox_id)  # for runsc exec
            await load_home(exe, workdir, spec.sandbox_id, src)
        except BaseException:
            await sb.kill()
            raise
        return sb

    def _bundle(
        self, spec: SandboxSpec, workdir: Path, preload: Path | None, agent_dir: Path
    ) -> dict[str, object]:
        bundle_dir = workdir / "bundle"
        bundle_dir.mkdir(mode=0o700)
        (workdir / "root").mkdir(mode=0o700)
        rootfs = bundle_dir / "rootfs"
        ops = None
        if spec.rootfs is not None:  # a template's root (issue 12), around moat's own paths
            owned = OWNED + tuple(m.sandbox_path for m in spec.mounts)
            ops = templateroot.ops_for(spec.rootfs, owned)
        if ops is not None and not spec.mounts:
            # the template's skeleton, shared: nothing in it is this sandbox's (rootcache)
            rootfs.symlink_to(rootcache.ensure(spec.rootfs or "", spec.hostname, preload, ops))
        else:
            write_skeleton(rootfs, spec.hostname, preload=preload, template=ops, source=spec.rootfs)
        for m in spec.mounts:
            # Checked as root (runsc's gofer opens it as root too: 0700 parents are fine);
            # missing, a device or unreadable to the sandbox's uid is a typed error.
            source = resolve_mount(m, SANDBOX_GID)
            # Mount points outside the tmpfs mounts must exist in the read-only skeleton.
            point = rootfs / m.sandbox_path.lstrip("/")
            if source.is_dir:
                point.mkdir(parents=True, exist_ok=True, mode=0o755)
            else:
                point.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                point.touch(exist_ok=True)
        config = build_config(
            spec,
            Bundle(
                rootfs=str(rootfs),
                agent_dir=str(agent_dir),
                argv=tuple(agent_argv(python=_PYTHON, workdir=spec.workdir)),
                etc_binds=etc_binds() if spec.rootfs is None else (),
                root_binds=tuple(
                    (f"{spec.rootfs}/{op.path}", f"/{op.path}")
                    for op in ops or ()
                    if op.op == "bind" and not copied(op)
                ),
            ),
        )
        (bundle_dir / "config.json").write_text(json.dumps(config, indent=1))
        return config

    def _argv(
        self, exe: str, workdir: Path, sandbox_id: str, image: RestoreImage | None = None
    ) -> list[str]:
        verb = ["run"] if image is None else ["restore", f"--image-path={image.path}"]
        return [
            exe,
            "--root",
            str(workdir / "root"),
            "--network=none",
            f"--platform={self.platform}",
            "--oci-seccomp",
            # runsc logs to stdout by default: that is the agent's stream, so never there
            f"--log={workdir / 'runsc.log'}",
            *verb,
            "--bundle",
            str(workdir / "bundle"),
            sandbox_id,
        ]

    @staticmethod
    async def _verify_limits(
        proc: asyncio.subprocess.Process, cgroup: HostCgroup, config: dict[str, object]
    ) -> None:
        linux = config["linux"]
        if not isinstance(linux, dict):  # our own builder's output: cannot happen
            raise IsolationUnavailableError("gvisor: bad sandbox configuration")
        res = linux["resources"]
        want = (res["memory"]["limit"], res["pids"]["limit"], res["cpu"]["quota"])
        deadline = time.monotonic() + START_TIMEOUT
        while not cgroup.enforced(*want):
            if proc.returncode is not None:
                raise SandboxDiedError("the gvisor sandbox exited while starting")
            if time.monotonic() > deadline:
                raise IsolationUnavailableError(
                    "gvisor: the sandbox's resource limits could not be put in place"
                )
            await asyncio.sleep(0.005)

    def sweep(self) -> int:
        """Reap sandboxes of engines that are gone: processes, cgroups, directories."""
        base = _base()
        count = 0
        live_ids: set[str] = set()
        for workdir in sorted(base.iterdir()):
            if workdir.name.startswith(".probe-"):
                # .probe-<owner pid>-<random>: another engine's probe in flight is not ours
                # to kill (it would fail that engine's start with "exit -9")
                owner = workdir.name.split("-")[1]
                if owner.isdigit() and Path(f"/proc/{owner}").exists():
                    continue
                root = str(workdir)
            else:
                if _owner_alive(workdir):
                    live_ids.add(workdir.name)
                    continue
                root = str(workdir / "root")
            kill_processes_of_root(root)
            cg = HostCgroup(CGROUP_PREFIX + workdir.name)
            cg.kill()
            _wait_gone(root)
            deadline = time.monotonic() + KILL_TIMEOUT
            while cg.pids() and time.monotonic() < deadline:  # dying: let them leave it
                cg.kill()
                time.sleep(0.02)
            cg.remove()
            shutil.rmtree(workdir, ignore_errors=True)
            count += 1
        count += _sweep_cgroups(live_ids) + rootcache.sweep()
        return count


async def _announced(pipes: AgentPipes, nonce: str) -> None:
    """Wait for a restored agent's announcement (bounded; moat.runtime.announce): what it
    writes before it is dropped, and the next frame is its READY."""
    if pipes.reader is None:  # connect() sets it
        raise SandboxDiedError("the gvisor sandbox has no channel")
    deadline = time.monotonic() + RESTORE_TIMEOUT
    try:
        await read_announcement(pipes.reader, nonce, deadline, ANNOUNCE_DISCARD_MAX)
    except (TimeoutError, asyncio.IncompleteReadError) as exc:
        raise SandboxDiedError("the restored sandbox's agent did not announce itself") from exc


async def _stopped(sb: GvisorSandbox, timeout: float) -> bool:
    """Wait (bounded) for the runsc process behind ``sb`` to exit and its cgroup to empty."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(sb.process.wait(), timeout)
    deadline = time.monotonic() + timeout
    while True:
        if not sb.cgroup.pids():
            return sb.process.returncode is not None
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)


def _empty(dest: Path) -> None:
    """Remove what a failed checkpoint wrote into ``dest`` (the caller's directory stays)."""
    for entry in dest.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _owner_alive(workdir: Path) -> bool:
    try:
        pid_s, start = (workdir / "owner").read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return False
    return _start_time(pid) == start


def _wait_gone(root: str) -> None:
    deadline = time.monotonic() + KILL_TIMEOUT
    while processes_of_root(root) and time.monotonic() < deadline:
        kill_processes_of_root(root)
        time.sleep(0.02)


def _sweep_cgroups(live_ids: set[str]) -> int:
    """Remove this tier's cgroups whose sandbox directory is gone."""
    names: set[str] = set()
    parents = (
        [CGROUP_ROOT] if layout() == "v2" else [p for p in CGROUP_ROOT.iterdir() if p.is_dir()]
    )
    for parent in parents:
        with contextlib.suppress(OSError):
            names.update(
                p.name for p in parent.iterdir() if p.is_dir() and p.name.startswith(CGROUP_PREFIX)
            )
    count = 0
    for name in sorted(names):
        if name[len(CGROUP_PREFIX) :] in live_ids:
            continue
        cg = HostCgroup(name)
        if cg.pids():
            # Not ours to kill: cgroups are host-wide, but this engine only knows the sandboxes
            # of its own state directory, and another engine (another MOAT_STATE_DIR) may
            # still be using this one. Orphans of our own state directory were killed above.
            continue
        if cg.remove():
            count += 1
    return count
