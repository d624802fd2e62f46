"""Container tier driver: spawns bubblewrap as an unprivileged uid inside a fresh cgroup.

This is the one place of the container tier that does I/O; ``bwrap.build_argv`` is pure.

A sandbox without host mounts can run calls as root (docs/users.md): bubblewrap runs as root
of a user namespace a holder process made (``userns.Holder``) with two fresh host ids of the
sandbox range, ``0 -> host_root`` and ``1000 -> host_uid`` (gid 1000 -> the shared
SANDBOX_HOST_GID, as always; gid 0 -> host_root). Those ids own nothing on the host, so root's
DAC_OVERRIDE and CHOWN inside reach only the sandbox's own files (the kernel grants them only
on inodes whose owner and group are both mapped: invariant 9). A sandbox with host mounts
keeps bwrap's own one-uid namespace (no uid 0 inside at all): root there could leave files of
the shared group, setgid, in a writable host directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moat.errors import IsolationUnavailableError, SandboxDiedError
from moat.runtime import agentdir, cgroups, pipes, reaper, seccomp, templateroot
from moat.runtime.container import bwrap, checkpoint, mountns, template, userns
from moat.runtime.inside import Inside
from moat.runtime.offthread import owned, settle
from moat.runtime.rootlayout import Op
from moat.runtime.spec import SANDBOX_GID, SANDBOX_UID, SandboxSpec

log = logging.getLogger("moat.runtime.container")

#: Host uids for sandboxes come from this range, one per sandbox (so RLIMIT_NPROC, a per-uid
#: limit, is a real second layer under the pids cgroup). They own nothing on the host.
UID_BASE = 1_000_000_000
UID_SPAN = 1 << 24
#: Every sandbox shares this host gid: grant it write access to a host dir mounted writable.
SANDBOX_HOST_GID = UID_BASE


class _Child:
    """A spawned process, awaitable without blocking the event loop (pidfd)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self._exited = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._pidfd = os.pidfd_open(popen.pid)
        self._loop.add_reader(self._pidfd, self._on_exit)
        self.read_transport: asyncio.BaseTransport | None = None

    def _on_exit(self) -> None:
        if self.popen.poll() is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._exited.set()

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def wait(self) -> int:
        await self._exited.wait()
        return self.popen.returncode or 0

    def kill(self) -> None:
        if self.popen.returncode is None:
            self.popen.kill()

    def detach(self) -> None:
        """Stop watching the process from the loop (a thread reaps it with ``popen.wait``)."""
        if not self._exited.is_set():
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._pidfd)
                os.close(self._pidfd)
            self._exited.set()
        if self.read_transport is not None:
            self.read_transport.close()


def _discard(popen: subprocess.Popen[bytes]) -> None:
    """Kill and reap a bwrap nobody will use, closing our ends of its pipes."""
    with contextlib.suppress(ProcessLookupError):
        popen.kill()
    popen.wait()
    for pipe in (popen.stdin, popen.stdout):
        if pipe is not None:
            pipe.close()


async def _spawn_child(
    argv: list[str], preexec: Any, fd: int
) -> tuple[_Child, asyncio.StreamReader, asyncio.StreamWriter]:
    """Start bwrap from a worker thread, then attach its pipes to the loop.

    Forking and the child's cgroup move (an RCU grace period on cgroup v1, ~10 ms) would
    otherwise stall the event loop, and with it every other sandbox's I/O.
    """
    popen = await owned(
        lambda: subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            pass_fds=(fd,),
            preexec_fn=preexec,  # os calls only (see ContainerRuntime._spawn)
            env={"PATH": "/usr/bin:/bin"},  # bwrap itself gets nothing of ours either
            cwd="/",
        ),
        _discard,  # the thread still creates the process if we are cancelled: leave nothing
    )
    assert popen.stdin is not None and popen.stdout is not None
    pipes.widen(popen.stdout.fileno())  # the agent's frames to us (issue 10's throughput)
    loop = asyncio.get_running_loop()
    try:
        reader = asyncio.StreamReader(limit=1 << 21)
        rtransport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), popen.stdout
        )
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), popen.stdin
        )
    except BaseException:
        await settle(loop.run_in_executor(None, _discard, popen))
        raise
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    child = _Child(popen)
    child.read_transport = rtransport
    return child, reader, writer


class ContainerProcess:
    """A running bubblewrap sandbox."""

    def __init__(
        self,
        proc: _Child,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cgroup: cgroups.SandboxCgroup,
        host_uid: int,
        holder: userns.Holder | None = None,
    ) -> None:
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.cgroup = cgroup
        self.host_uid = host_uid
        #: the user namespace's holder of a root-capable sandbox (None: bwrap's own userns)
        self.holder = holder
        #: whether its agent can run calls as root (uid 0 of its own user namespace)
        self.can_root = holder is not None
        self._killed = False
        #: commands inside, lent by the engine once the agent is up (checkpoint.py)
        self.inside: Inside | None = None
        #: a checkpoint to replay once the agent is up (``finish_restore``)
        self.restore_from: Path | None = None

    async def finish_restore(self) -> None:
        """Replay the checkpoint this sandbox was restored from (its agent now up)."""
        src, self.restore_from = self.restore_from, None
        if src is not None:
            await checkpoint.unpack(self, src)

    async def kill(self) -> None:
        """End the sandbox now; reaping and removing its cgroup go to the background reaper.

        Synchronously: the sandbox's cgroup is frozen and every process in it but our bwrap
        gets SIGKILL, and the agent's channel is closed; nothing of it runs again. Then, on
        the reaper's thread (drained at exit; a crash leaves a cgroup the next start sweeps,
        invariant 5): thaw, so they die; bwrap reaps the namespace's init and exits (killing
        bwrap at once instead orphans the init to the host's pid 1, where it may stay a
        zombie); then the cgroup is killed again (whatever escaped the namespace) and removed.
        """
        if self._killed:
            return
        self._killed = True
        proc, cgroup = self.proc, self.cgroup
        # Not to be cut short (a loop's shutdown cancels every task, kills in flight too):
        # the reaper must get the job, or the cgroup outlives the program (invariant 5).
        stop = asyncio.get_running_loop().run_in_executor(None, cgroup.stop_now, proc.pid)
        cancelled = await settle(stop)
        with contextlib.suppress(Exception):
            self.writer.close()
        proc.detach()
        holder = self.holder
        reaper.submit(cgroup.name, lambda: _reap(proc.popen, cgroup, holder))
        if cancelled:
            raise asyncio.CancelledError
        stop.result()

    def alive(self) -> bool:
        return not self._killed and self.proc.returncode is None

    def cpu_ns(self) -> int:
        """CPU time (ns) the sandbox has used: one counter (the metrics' baseline)."""
        return self.cgroup.cpu_ns()

    def stats(self) -> dict[str, int]:
        out = self.cgroup.stats()
        if out:
            out.update(_disk_usage(self.cgroup.pids(), self.proc.pid))
        return out


#: The sandbox's writable filesystems (each its own capped tmpfs, see bwrap.build_argv).
_WRITABLE = ("home/user", "tmp", "dev/shm")


def _disk_usage(pids: list[int], bwrap_pid: int) -> dict[str, int]:
    """Used and total bytes of the sandbox's tmpfs mounts, as the host's kernel counts them.

    Read through a process inside the sandbox's mount namespace (``/proc/<pid>/root``); the
    paths are mount points the sandbox's user cannot replace. Empty if none is found.
    """
    try:
        host_ns = os.readlink("/proc/self/ns/mnt")
        skip = {host_ns, os.readlink(f"/proc/{bwrap_pid}/ns/mnt")}
    except OSError:
        return {}
    for pid in pids:
        try:
            if pid == bwrap_pid or os.readlink(f"/proc/{pid}/ns/mnt") in skip:
                continue
            used = total = 0
            for path in _WRITABLE:
                st = os.statvfs(f"/proc/{pid}/root/{path}")
                used += (st.f_blocks - st.f_bfree) * st.f_frsize
                total += st.f_blocks * st.f_frsize
        except OSError:
            continue
        return {"disk_used_bytes": used, "disk_total_bytes": total}
    return {}


def _reap(
    popen: subprocess.Popen[bytes],
    cgroup: cgroups.SandboxCgroup,
    holder: userns.Holder | None = None,
) -> None:
    """The slow half of ContainerProcess.kill, on the reaper's thread. Blocking, bounded."""
    cgroup.thaw()
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(2)  # bwrap exits once it has reaped the namespace's init
    try:
        cgroup.kill()
    finally:
        with contextlib.suppress(ProcessLookupError):
            popen.kill()
        try:
            popen.wait(5)
        except subprocess.TimeoutExpired:
            log.error("bwrap pid %s did not exit after kill", popen.pid)
        if holder is not None:
            holder.close()  # killed with the cgroup already; reaped here
        cgroup.destroy()


async def _root_ops(spec: SandboxSpec) -> tuple[Op, ...]:
    """The template's root around moat's own paths (issue 12); none for the host's /usr."""
    if spec.rootfs is None:
        return ()
    try:
        return await asyncio.to_thread(templateroot.ops_for, spec.rootfs, bwrap.owned(spec))
    except OSError as exc:
        raise SandboxDiedError("the sandbox's template root could not be read") from exc


class ContainerRuntime:
    """The `container` tier."""

    name = "container"
    #: pause keeps the writable files only (checkpoint.py: NO_MEMORY)
    keeps_memory = False

    def __init__(self) -> None:
        self._cgroups: cgroups.CgroupManager | None = None
        self._bwrap: str | None = None

    def _bwrap_path(self) -> str | None:
        """bwrap's path: searched once (``shutil.which`` stats every PATH entry, on every
        create), then only checked to be still there and executable (one syscall)."""
        path = self._bwrap
        if path is None or not os.access(path, os.X_OK):
            path = self._bwrap = shutil.which("bwrap")
        return path

    def probe(self) -> str | None:
        if self._bwrap_path() is None:
            return "bubblewrap is not installed (Debian package 'bubblewrap')"
        if os.geteuid() != 0:
            return "the container tier needs root to create cgroups and drop to a sandbox uid"
        max_ns = Path("/proc/sys/user/max_user_namespaces")
        if max_ns.exists() and max_ns.read_text().strip() == "0":
            return "user namespaces are disabled (user.max_user_namespaces = 0)"
        try:
            self._manager()
            seccomp.build_filter()
        except IsolationUnavailableError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - a probe reports, it does not raise
            return f"seccomp or cgroups unavailable: {type(exc).__name__}"
        return None

    def _manager(self) -> cgroups.CgroupManager:
        if self._cgroups is None:
            self._cgroups = cgroups.detect()
        return self._cgroups

    def sweep(self) -> int:
        return self._manager().sweep()

    async def checkpoint(self, proc: Any, dest: Path, *, memory: bool, leave_running: bool) -> None:
        """Checkpointable (issue 11): ``/home/user`` and ``/tmp`` as a tar made inside."""
        await checkpoint.checkpoint(
            proc, dest, memory=memory, cap=getattr(proc, "checkpoint_cap", None)
        )

    async def restore(self, spec: SandboxSpec, src: Path) -> ContainerProcess:
        """A fresh sandbox of ``spec``; its files come back once its agent is up."""
        if checkpoint.archive(src) is None:
            raise SandboxDiedError("the paused sandbox's files are missing")
        # Its own cgroup name: the paused one's may still be on the reaper's queue.
        name = spec.sandbox_id.removeprefix("sbx-")[:56] + "-r" + secrets.token_hex(3)
        proc = await self._start(spec, name)
        proc.restore_from = src
        return proc

    async def restore_into(self, proc: Any, src: Path) -> None:
        """ReplaysFiles: the checkpoint's files into a running sandbox (a warm one)."""
        await checkpoint.unpack(proc, src)

    async def start(self, spec: SandboxSpec) -> ContainerProcess:
        return await self._start(spec, spec.sandbox_id.removeprefix("sbx-"))

    async def _start(self, spec: SandboxSpec, cg_name: str) -> ContainerProcess:
        reason = self.probe() if self._cgroups is None else None
        if reason:
            raise IsolationUnavailableError(f"container tier unavailable: {reason}")
        manager = self._manager()
        bpf = seccomp.build_filter()
        host = bwrap.HostLayout(
            agent_dir=str(agentdir.prepare()),
            etc_dir=str(template.etc_dir()),
            seccomp_fd=-1,
            # a dozen stat calls on the host's /etc and /: microseconds, less than a thread hop
            host_etc=tuple(n for n in bwrap.HOST_ETC if os.path.exists(f"/etc/{n}")),  # noqa: ASYNC240
            usr_links=tuple((t, ln) for t, ln in bwrap.USR_LINKS if os.path.islink(ln)),  # noqa: ASYNC240
            root_ops=await _root_ops(spec),
        )
        # Opened here, as root: a path under a parent the sandbox uid cannot traverse (0700
        # /root) still mounts; a missing or unusable one is a typed error (see mountns.py).
        # moat's own trees are copied onto the staging tmpfs, never bound from the state dir:
        # a bind's mountinfo entry would name the host path (issue 17 §4, invariant 1).
        trees = (("agent", host.agent_dir), ("etc", host.etc_dir))
        staged = await asyncio.to_thread(
            mountns.open_sources, spec.mounts, SANDBOX_HOST_GID, trees, spec.rootfs
        )
        staged = mountns.with_boot_id(staged, str(uuid.uuid4()))
        cgroup = await owned(
            lambda: manager.create(cg_name, spec.limits),
            lambda made: made.destroy(),
        )
        try:
            return await self._spawn(spec, host, bpf, cgroup, staged)
        except BaseException:
            await settle(asyncio.get_running_loop().run_in_executor(None, cgroup.destroy))
            raise

    async def _spawn(
        self,
        spec: SandboxSpec,
        host: bwrap.HostLayout,
        bpf: bytes,
        cgroup: cgroups.SandboxCgroup,
        staged: mountns.Staged,
    ) -> ContainerProcess:
        # The filter goes in through a memfd (no file system, no path): bwrap reads it from
        # the fd, from offset 0.
        with _memfd(bpf) as fd:
            host = bwrap.HostLayout(
                agent_dir=staged.tree("agent"),
                etc_dir=staged.tree("etc"),
                seccomp_fd=fd,
                host_etc=host.host_etc,
                usr_links=host.usr_links,
                mount_sources=staged.sources(),
                root_ops=host.root_ops,
                root_source=staged.root_dir() if spec.rootfs else "",
                boot_id=staged.boot_id(),
                root_merged=bool(staged.top),
            )
            root = not spec.mounts  # root-capable: see the module doc
            argv = bwrap.build_argv(
                spec,
                host,
                agentdir.agent_argv(workdir=spec.workdir, split_root=root),
                root=root,
            )
            argv[0] = self._bwrap_path() or "bwrap"
            uid, root_id = _fresh_ids()
            procs_files = list(cgroup.procs_files)
            limits = spec.limits
            rlimits = (
                (resource.RLIMIT_CORE, 0),
                (resource.RLIMIT_NOFILE, 4096),
                (resource.RLIMIT_FSIZE, limits.disk_mb * 1024 * 1024),
                # per host uid, and the uid is this sandbox's alone; a little slack for bwrap
                (resource.RLIMIT_NPROC, limits.pids + 4),
            )
            holder: userns.Holder | None = None
            if root:
                # Not in the sandbox's cgroup: a cgroup v1 move waits for an RCU grace period
                # (~5 ms measured); it ends on its pipe's EOF or the reaper's close, and no
                # code of the sandbox can reach it (another pid namespace) (invariant 5).
                holder = await owned(
                    lambda: userns.Holder(
                        (),
                        [(0, root_id, 1), (SANDBOX_UID, uid, 1)],
                        [(0, root_id, 1), (SANDBOX_GID, SANDBOX_HOST_GID, 1)],
                    ),
                    lambda made: made.close(),
                )
            ns_fd = -1 if holder is None else holder.fd

            def preexec() -> None:
                # Runs in the forked child before exec: only os-level calls, no locks.
                pid = str(os.getpid()).encode()
                for path in procs_files:
                    cfd = os.open(path, os.O_WRONLY)
                    try:
                        os.write(cfd, pid)
                    finally:
                        os.close(cfd)
                staged.enter()  # still root: bind the opened mount sources (mountns.py)
                for res, value in rlimits:
                    resource.setrlimit(res, (value, value))
                if ns_fd >= 0:
                    userns.enter(ns_fd)  # root of the holder's namespace, nothing more
                    return
                os.setgroups([])
                os.setresgid(SANDBOX_HOST_GID, SANDBOX_HOST_GID, SANDBOX_HOST_GID)
                os.setresuid(uid, uid, uid)

            try:
                proc, reader, writer = await _spawn_child(argv, preexec, fd)
            except BaseException as exc:
                if holder is not None:
                    await settle(asyncio.get_running_loop().run_in_executor(None, holder.close))
                if isinstance(exc, subprocess.SubprocessError):  # preexec failed
                    what = "user namespace" if holder is not None else "mounts"
                    raise SandboxDiedError(f"the sandbox's {what} could not be set up") from exc
                raise
        return ContainerProcess(proc, reader, writer, cgroup, uid, holder)


@contextlib.contextmanager
def _memfd(data: bytes) -> Iterator[int]:
    """An anonymous in-memory file holding ``data``, positioned at its start; closed after."""
    fd = os.memfd_create("moat-seccomp", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


def _fresh_ids() -> tuple[int, int]:
    """Two distinct random host ids of the sandbox range: the user's and root's (the latter
    used only by a root-capable sandbox). They own nothing on the host."""
    uid = UID_BASE + 1 + secrets.randbelow(UID_SPAN - 1)
    while (root_id := UID_BASE + 1 + secrets.randbelow(UID_SPAN - 1)) == uid:
        pass
    return uid, root_id
