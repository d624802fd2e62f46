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
import shutil
import signal
import time
from pathlib import Path
from typing import Final

from moat.errors import InvalidArgumentError, IsolationUnavailableError, SandboxDiedError
from moat.paths import state_dir
from moat.runtime import reaper, templateroot
from moat.runtime.agentdir import agent_argv, prepare
from moat.runtime.gvisor import compat
from moat.runtime.gvisor.hostcg import CGROUP_ROOT, HostCgroup, layout
from moat.runtime.gvisor.hostproc import kill_processes_of_root, processes_of_root
from moat.runtime.gvisor.oci import CGROUP_PREFIX, Bundle, build_config, cgroup_name
from moat.runtime.gvisor.probe import PLATFORMS, RUNSC_ENV, probe, runsc_path
from moat.runtime.gvisor.rootfs import OWNED, copied, etc_binds, write_skeleton
from moat.runtime.mounts import check_owners
from moat.runtime.mounts import resolve as resolve_mount
from moat.runtime.spec import SANDBOX_GID, SandboxSpec

__all__ = ["GvisorRuntime", "GvisorSandbox"]

#: Seconds runsc may take to put the sandbox into its cgroup before we give up.
START_TIMEOUT: Final = 15.0
#: Seconds each cleanup step (runsc delete, waiting for processes to go) may take.
KILL_TIMEOUT: Final = 5.0
#: Seconds kill() waits for ``runsc run`` itself to be reaped (the rest goes to the reaper).
EXIT_WAIT: Final = 0.05
#: Bytes of runsc's stderr kept for diagnostics (the agent's stderr goes there too: bounded).
STDERR_KEEP: Final = 64 * 1024
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
    """One running gVisor sandbox as the engine sees it (implements ``SandboxProcess``)."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        *,
        runsc: str,
        sandbox_id: str,
        workdir: Path,
        cgroup: HostCgroup,
    ) -> None:
        if proc.stdout is None or proc.stdin is None or proc.stderr is None:
            raise SandboxDiedError("the gvisor sandbox has no stdio")
        self.reader: asyncio.StreamReader = proc.stdout
        self.writer: asyncio.StreamWriter = proc.stdin
        self._proc = proc
        self._runsc = runsc
        self._id = sandbox_id
        self._workdir = workdir
        self._root = str(workdir / "root")
        self._cgroup = cgroup
        self._stderr: collections.deque[bytes] = collections.deque()
        self._stderr_task = asyncio.get_running_loop().create_task(self._drain(proc.stderr))
        self._lock = asyncio.Lock()
        self._killed = False

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        kept = 0
        while chunk := await stream.read(8192):
            self._stderr.append(chunk)
            kept += len(chunk)
            while kept > STDERR_KEEP and self._stderr:
                kept -= len(self._stderr.popleft())

    def stderr_tail(self) -> bytes:
        """The last bytes runsc and the agent wrote to stderr (for the audit log, not callers)."""
        return b"".join(self._stderr)

    def alive(self) -> bool:
        return not self._killed and self._proc.returncode is None

    def stats(self) -> dict[str, int]:
        return self._cgroup.stats() if self.alive() else {}

    @property
    def workdir(self) -> Path:
        """The host directory holding this sandbox's bundle and runsc state."""
        return self._workdir

    async def kill(self) -> None:
        """End the sandbox now; its files, cgroup and runsc state go in the background.

        Returns once every host process of the sandbox (sentry, gofer, ptrace stubs, ``runsc
        run``) has a SIGKILL pending and the agent's channel is closed: nothing of it can run
        or be reached. Waiting for them to exit and the removals are left to
        :mod:`moat.runtime.reaper`, drained at exit and covered by ``sweep`` after a crash
        (invariant 5).
        """
        async with self._lock:
            if self._killed:
                return
            self._killed = True
            _kill_now(self._cgroup, self._root, self._proc)
            with contextlib.suppress(Exception):
                self.writer.close()
            workdir, cgroup = self._workdir, self._cgroup
            reaper.submit(self._id, lambda: _reap_blocking(workdir, cgroup))
            # `runsc run` (our child) dies within milliseconds of its SIGKILL: reap it while
            # the loop is surely alive, but never let it hold kill() up.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), EXIT_WAIT)
            self._stderr_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stderr_task


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
    """The gvisor tier (implements ``moat.runtime.base.Runtime``).

    ``platform`` is runsc's platform: ``ptrace`` (default; works everywhere), ``kvm`` (fast
    where KVM is real; it hangs on PVM hosts, which the probe detects) or ``systrap`` (newer
    runsc only). ``runsc`` is the binary, by name on PATH or absolute.
    """

    name = "gvisor"

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
        cgroup = HostCgroup(cgroup_name(spec))
        proc: asyncio.subprocess.Process | None = None
        try:
            (workdir / "owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
            # Built once per host (make install does it); a compile the first time otherwise.
            preload = await asyncio.to_thread(compat.build)
            # The gofer keeps host owners and the sandbox's user is uid/gid 1000: refuse an
            # entry that would give it more than other host users get (walks the trees).
            for m in spec.mounts:
                await asyncio.to_thread(check_owners, m, "gvisor")
            config = self._bundle(spec, workdir, preload)
            proc = await asyncio.create_subprocess_exec(
                *self._argv(exe, workdir, spec.sandbox_id),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=RUNSC_ENV,
                cwd=workdir,
                start_new_session=True,
            )
            await self._verify_limits(proc, cgroup, config)
            return GvisorSandbox(
                proc, runsc=exe, sandbox_id=spec.sandbox_id, workdir=workdir, cgroup=cgroup
            )
        except BaseException:
            await _teardown(exe, spec.sandbox_id, workdir, cgroup, proc)
            raise

    def _bundle(self, spec: SandboxSpec, workdir: Path, preload: Path | None) -> dict[str, object]:
        bundle_dir = workdir / "bundle"
        bundle_dir.mkdir(mode=0o700)
        (workdir / "root").mkdir(mode=0o700)
        rootfs = bundle_dir / "rootfs"
        ops = None
        if spec.rootfs is not None:  # a template's root (issue 12), around moat's own paths
            owned = OWNED + tuple(m.sandbox_path for m in spec.mounts)
            ops = templateroot.ops_for(spec.rootfs, owned)
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
                agent_dir=str(prepare()),
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

    def _argv(self, exe: str, workdir: Path, sandbox_id: str) -> list[str]:
        return [
            exe,
            "--root",
            str(workdir / "root"),
            "--network=none",
            f"--platform={self.platform}",
            "--oci-seccomp",
            # runsc logs to stdout by default: that is the agent's stream, so never there
            f"--log={workdir / 'runsc.log'}",
            "run",
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
        count += _sweep_cgroups(live_ids)
        return count


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
