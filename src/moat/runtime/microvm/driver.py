"""The microvm tier's driver: one QEMU ``microvm`` guest per sandbox.

Trust domain: host engine; the one module of this tier that spawns processes (``qemu.py``
builds the argv purely). QEMU itself runs as a fresh unprivileged host uid, inside a host
cgroup, under its own seccomp filter, with no network device and no files but the read-only
kernel, initramfs and /usr image (and unlinked read-only images of the sandbox's mounts). The
agent channel is one end of a socketpair (no socket file), a snapshot is passed as an fd, and
the guest's writable space is tmpfs in guest RAM: killing the QEMU process leaves nothing
behind (invariant 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import resource
import secrets
import shutil
import socket
import subprocess
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from moat.errors import IsolationUnavailableError, PolicyError, SandboxDiedError
from moat.guest.init import BOOT_MARKER
from moat.protocol import resume
from moat.runtime import agentdir, cgroups, reaper, seccomp
from moat.runtime.announce import read_announcement
from moat.runtime.base import SandboxProcess
from moat.runtime.microvm import (
    artifacts,
    checkpoint,
    initramfs,
    mountimg,
    probe,
    qemu,
    rootimage,
    snapshot,
)
from moat.runtime.microvm.qmp import QMP, QMPError
from moat.runtime.spec import Limits, SandboxSpec

log = logging.getLogger("moat.runtime.microvm")

#: Host uids for QEMU processes: a fresh one per VM, owning nothing on the host. (Same range
#: convention as the container tier, so one uid range is reserved for moat.)
UID_BASE = 1_000_000_000
UID_SPAN = 1 << 24
#: A cold TCG boot takes ~3 s on an idle 2-core host; leave room for a loaded one.
BOOT_TIMEOUT_S = 60.0
#: Host memory for QEMU beyond guest RAM: TCG's translation cache (capped by tb-size in
#: qemu.py) plus QEMU's own heap.
QEMU_HOST_OVERHEAD_MB = 256
#: QEMU's threads: vCPUs, I/O, RCU, workers.
QEMU_PIDS = 64
#: The guest port the agent speaks on (virtio-serial port 1 of virtio device 0).
GUEST_PORT = "/dev/vport0p1"
#: A checkpoint (stop, migrate, compress, fsync) of a guest must finish within this.
CHECKPOINT_TIMEOUT_S = 120.0
#: A restore must reach the agent's announcement within this (TCG on a loaded host).
RESTORE_TIMEOUT_S = 60.0
#: How long a restore waits for the reaper to finish a VM of the same sandbox id.
REAP_WAIT_S = 30.0
#: What a restored agent may have queued for the old host before its announcement: output
#: frames already in the guest's virtio queue. Past this the restore fails closed.
RESUME_DISCARD_MAX = 64 << 20
FIRECRACKER_HOOK = "firecracker"


class MicroVMProcess:
    """A running microVM sandbox."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        cgroup: cgroups.SandboxCgroup,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        restored: bool,
        vm_memory_mb: int,
        qmp: socket.socket | None = None,
        ctl: socket.socket | None = None,
        mount_fds: tuple[int, ...] = (),
        identity: dict[str, Any] | None = None,
    ) -> None:
        self.proc = proc
        self.cgroup = cgroup
        self.reader = reader
        self.writer = writer
        self.restored = restored
        self.vm_memory_mb = vm_memory_mb
        #: the host ends of QEMU's monitor and of guest root's control port (checkpoint.py)
        self.qmp = qmp
        self.ctl = ctl
        #: our own read-only copies of the mount images' fds (a checkpoint copies them)
        self.mount_fds = mount_fds
        #: what a checkpoint of this VM records and a restore must match
        self.identity = identity
        self._monitor: QMP | None = None
        self._lock = asyncio.Lock()
        self._killed = False
        #: set once the reaper has reaped QEMU and removed the cgroup (a restore under the
        #: same sandbox id waits for it: the cgroup's name is the id's)
        self.reaped = threading.Event()

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def kill(self) -> None:
        """End the VM now: QEMU (and anything else in its cgroup) gets SIGKILL, the channel
        is closed.

        Reaping QEMU and removing its cgroup go to :mod:`moat.runtime.reaper` (drained at exit;
        after a crash the next start's sweep removes the cgroup: invariant 5).
        """
        if self._killed:
            return
        self._killed = True
        proc, cgroup = self.proc, self.cgroup
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # QEMU is one process (-sandbox spawn=deny): its vCPUs stop with it
        await asyncio.to_thread(cgroup.stop_now, freeze=False)
        with contextlib.suppress(Exception):
            self.writer.close()
        self._release()
        reaped = self.reaped

        def reap() -> None:
            try:
                _stop(proc, cgroup)
            finally:
                reaped.set()

        reaper.submit(cgroup.name, reap)

    def _release(self) -> None:
        """Close our monitor and control sockets and mount fds (QEMU is gone or going)."""
        for sock in (self.qmp, self.ctl):
            if sock is not None:
                sock.close()
        self.qmp = self.ctl = None
        for fd in self.mount_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.mount_fds = ()

    def monitor(self, deadline: float) -> QMP:
        """QEMU's monitor, its greeting read on first use; blocking."""
        if self.qmp is None:
            raise SandboxDiedError("the microVM has no monitor")
        if self._monitor is None:
            self._monitor = QMP(self.qmp, deadline).handshake()
        self._monitor.deadline = deadline
        return self._monitor

    def alive(self) -> bool:
        return not self._killed and self.proc.poll() is None

    def stats(self) -> dict[str, int]:
        out = dict(self.cgroup.stats())
        out["vm_memory_mb"] = self.vm_memory_mb
        return out


def _stop(proc: subprocess.Popen[bytes], cgroup: cgroups.SandboxCgroup) -> None:
    """Kill QEMU by pid and through its cgroup, reap it, remove the cgroup. Blocking."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    try:
        cgroup.kill()
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("QEMU pid %s did not exit after SIGKILL", proc.pid)
        cgroup.destroy()


class MicroVMRuntime:
    """The ``microvm`` tier: QEMU microvm, KVM where it really works, else TCG.

    ``accel``: "auto" (probe), "kvm" or "tcg". ``snapshots``: start sandboxes by restoring a
    saved base VM (booted once per VM shape) instead of booting.
    ``vmm``: "qemu"; "firecracker" is a documented hook that only probes for now.
    ``console_log``: a directory to write each guest's serial console to (debugging only).
    """

    name = "microvm"

    def __init__(
        self,
        *,
        accel: str = "auto",
        snapshots: bool = True,
        vmm: str = "qemu",
        console_log: str | None = None,
    ) -> None:
        if accel not in ("auto", "kvm", "tcg"):
            raise IsolationUnavailableError("microvm accel must be auto, kvm or tcg")
        if vmm not in ("qemu", FIRECRACKER_HOOK):
            raise IsolationUnavailableError("microvm vmm must be qemu or firecracker")
        self.accel_option = accel
        self.snapshots = snapshots
        self.vmm = vmm
        self.console_log = console_log
        self._accel: str | None = None
        self._cgroups: cgroups.CgroupManager | None = None
        #: this runtime's VMs by sandbox id (a restore may reuse the id of one being reaped)
        self._vms: weakref.WeakValueDictionary[str, MicroVMProcess] = weakref.WeakValueDictionary()

    # -- probing -----------------------------------------------------------------------------

    def probe(self) -> str | None:
        if self.vmm == FIRECRACKER_HOOK:
            # Hook: same kernel, initramfs and agent would boot under Firecracker's
            # virtio-vsock/serial; not implemented until a host with it exists to test on.
            return (
                "firecracker not installed"
                if shutil.which("firecracker") is None
                else "firecracker support is not implemented yet"
            )
        if os.geteuid() != 0:
            return "the microvm tier needs root (cgroups and an unprivileged QEMU uid)"
        if probe.qemu_binary() is None:
            return "QEMU is not installed (Debian package 'qemu-system-x86')"
        if artifacts.load() is None:
            return f"the microvm tier is not set up: run `{artifacts.SETUP_COMMAND}`"
        try:
            self._manager()
            self._choose_accel()
            seccomp.build_filter()  # the guest runs under it (invariant 9): none, no tier
        except IsolationUnavailableError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - a probe reports, it does not raise
            return f"microvm probe failed: {type(exc).__name__}"
        return None

    def _manager(self) -> cgroups.CgroupManager:
        if self._cgroups is None:
            self._cgroups = cgroups.detect()
        return self._cgroups

    def _choose_accel(self) -> str:
        if self._accel is None:
            if self.accel_option == "tcg":
                self._accel = "tcg"
            else:
                arts = _artifacts()
                chosen = probe.choose_accel(arts, str(_initrd(arts)[0]))
                if self.accel_option == "kvm" and chosen != "kvm":
                    raise IsolationUnavailableError("KVM cannot run a standard guest on this host")
                self._accel = chosen
        return self._accel

    def sweep(self) -> int:
        """Kill VMs (via their cgroups) and remove temp files a crashed host process left."""
        count = self._manager().sweep() + mountimg.sweep() + rootimage.sweep()
        snaps = artifacts.root() / "snapshots"
        for tmp in [*snaps.glob(".tmp-*"), *(artifacts.root() / "initrd").glob(".tmp-*")]:
            pid = tmp.name.split("-")[1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                    count += 1
        return count

    # -- starting ----------------------------------------------------------------------------

    async def start(self, spec: SandboxSpec) -> MicroVMProcess:
        reason = self.probe() if self._accel is None or self._cgroups is None else None
        if reason:
            raise IsolationUnavailableError(f"microvm tier unavailable: {reason}")
        # Mounts are copied in as read-only disk images (no 9p in this guest kernel); capped
        # by disk_mb, read-only directories only: anything else fails closed (invariant 7).
        mount_fds = await asyncio.to_thread(mountimg.build, spec.mounts, spec.limits.disk_mb)
        try:
            return await self._start(spec, tuple(mount_fds))
        finally:
            for fd in mount_fds:
                os.close(fd)  # QEMU holds its own copies (or failed to start)

    async def _start(self, spec: SandboxSpec, mount_fds: tuple[int, ...]) -> MicroVMProcess:
        arts = _artifacts()
        initrd, initrd_digest = await asyncio.to_thread(_initrd, arts)
        binary = probe.qemu_binary() or probe.QEMU_BINARY
        usr_image, image_digest = str(arts.usr_image), ""
        if spec.rootfs is not None:  # a template's whole root as the disk (issue 12)
            built, image_digest = await asyncio.to_thread(rootimage.ensure, Path(spec.rootfs))
            usr_image = str(built)
        base = qemu.VMConfig(
            qemu=binary, accel=self._choose_accel(), vmlinux=str(arts.vmlinux),
            initrd=str(initrd), usr_image=usr_image,
            memory_mb=qemu.vm_memory_mb(spec.limits), cpus=qemu.vm_cpus(spec.limits),
            tsc_khz=probe.host_tsc_khz(), name=f"moat-{spec.sandbox_id}", agent_fd=-1,
            ctl_fd=-1, mount_fds=mount_fds,
        )  # fmt: skip
        snap: Path | None = None
        ident = checkpoint.identity(base, arts, initrd_digest, image_digest)
        # A snapshot's device set has no mount disks (and microvm has no hotplug): cold boot.
        if self.snapshots and not mount_fds:
            snap_key = snapshot.key(base, arts, initrd_digest, image_digest)
            folder = None if spec.rootfs is None else Path(spec.rootfs).parent / rootimage.SNAPSHOTS
            snap = await asyncio.to_thread(
                snapshot.ensure, base, snap_key, self._spawn_base, folder
            )
        host_limits = Limits(
            cpus=float(base.cpus),
            memory_mb=base.memory_mb + QEMU_HOST_OVERHEAD_MB,
            pids=QEMU_PIDS,
            disk_mb=1,
        )
        cgroup = await asyncio.to_thread(self._manager().create, spec.sandbox_id, host_limits)
        try:
            return await self._launch(spec, base, snap, cgroup, mount_fds, ident=ident)
        except BaseException:
            await asyncio.to_thread(cgroup.destroy)
            raise

    async def _launch(
        self,
        spec: SandboxSpec,
        base: qemu.VMConfig,
        snap: Path | None,
        cgroup: cgroups.SandboxCgroup,
        mount_fds: tuple[int, ...] = (),
        *,
        ident: dict[str, Any],
        incoming_fd: int | None = None,
        resumed: Any = None,
    ) -> MicroVMProcess:
        """Start QEMU: boot, restore the base VM ``snap``, or (``incoming_fd`` and the
        coroutine function ``resumed(qmp, ctl, reader) -> QMP``) restore a checkpoint."""
        snap_fd = incoming_fd
        if snap is not None:
            try:
                snap_fd = os.open(snap, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                snap = None  # pruned meanwhile: boot instead (same isolation, just slower)
        try:
            host_sock, guest_sock = socket.socketpair()
            qmp_host, qmp_guest = socket.socketpair()
            ctl_host, ctl_guest = socket.socketpair()
        except OSError as exc:  # out of fds: what was made is collected with its objects
            if snap_fd is not None:
                os.close(snap_fd)
            raise SandboxDiedError("the microVM could not be started") from exc
        console = None
        if self.console_log:
            console = os.path.join(self.console_log, f"{spec.sandbox_id}.log")
        cfg = qemu.VMConfig(
            **{**base.__dict__, "agent_fd": guest_sock.fileno(), "incoming_fd": snap_fd,
               "console_log": console, "mount_fds": mount_fds, "qmp_fd": qmp_guest.fileno(),
               "ctl_fd": ctl_guest.fileno()}
        )  # fmt: skip
        fds: tuple[int, ...] = (guest_sock.fileno(), qmp_guest.fileno(), ctl_guest.fileno())
        fds += ((snap_fd,) if snap_fd is not None else ()) + mount_fds
        t0 = time.monotonic()
        try:
            proc = _spawn(qemu.build_argv(cfg), fds, cgroup.procs_files, kvm=cfg.accel == "kvm")
        except OSError as exc:
            for sock in (host_sock, qmp_host, ctl_host):
                sock.close()
            raise SandboxDiedError("the microVM could not be started") from exc
        finally:
            for sock in (guest_sock, qmp_guest, ctl_guest):
                sock.close()
            if snap_fd is not None:
                os.close(snap_fd)  # QEMU holds its own (and an incoming_fd is ours to close)
        kept: tuple[int, ...] = ()
        writer: asyncio.StreamWriter | None = None
        try:
            kept = tuple(os.dup(fd) for fd in mount_fds)  # for a checkpoint's copy
            reader, writer = await asyncio.open_unix_connection(sock=host_sock, limit=1 << 21)
            monitor: QMP | None = None
            if resumed is not None:
                monitor = await resumed(qmp_host, ctl_host, reader)
            else:
                # Sent at once, also to a booting guest: it waits in the socket until stage
                # 2 opens the port (see moat/guest/init.py): the guest never waits for us.
                writer.write(_guest_config(spec) + b"\n")
                await asyncio.wait_for(writer.drain(), BOOT_TIMEOUT_S)
            if snap is None and resumed is None:
                # A cold boot announces stage 2; a restored base VM already did, before saving.
                marker = await asyncio.wait_for(
                    reader.readexactly(len(BOOT_MARKER)), BOOT_TIMEOUT_S
                )
                if marker != BOOT_MARKER:
                    raise SandboxDiedError("the microVM sent an unexpected boot message")
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            await asyncio.to_thread(_stop, proc, cgroup)
            _close_all(writer or host_sock, qmp_host, ctl_host, kept)
            raise SandboxDiedError("the microVM did not boot") from exc
        except BaseException:
            await asyncio.to_thread(_stop, proc, cgroup)
            _close_all(writer or host_sock, qmp_host, ctl_host, kept)
            raise
        how = "resumed" if resumed else "restored" if snap else "booted"
        log.info(
            "microvm %s: %s in %.2fs (pid %d)",
            spec.sandbox_id, how, time.monotonic() - t0, proc.pid,
        )  # fmt: skip
        vm = MicroVMProcess(
            proc, cgroup, reader, writer, restored=snap is not None or resumed is not None,
            vm_memory_mb=base.memory_mb, qmp=qmp_host, ctl=ctl_host, mount_fds=kept,
            identity=ident,
        )  # fmt: skip
        vm._monitor = monitor
        self._vms[spec.sandbox_id] = vm
        return vm

    # -- checkpoint and restore (issue 11: runtime.base.Checkpointable) -----------------------

    #: ``memory=True`` keeps processes and memory: QEMU migrates the whole guest.
    keeps_memory = True

    async def checkpoint(
        self, proc: SandboxProcess, dest: Path, *, memory: bool, leave_running: bool
    ) -> None:
        """Save ``proc`` into the empty directory ``dest`` (checkpoint.py's layout).

        ``memory=False`` saves the same full checkpoint: this tier's writable filesystem is
        tmpfs in guest RAM, so there is no filesystem to keep without the memory holding it
        (docs/persistence-microvm.md). Fails closed: on any error ``proc`` runs on as before
        and ``dest`` holds nothing of ours; a full host disk is a DiskFullError.
        """
        if not isinstance(proc, MicroVMProcess) or proc.identity is None:
            raise PolicyError("this sandbox cannot be saved")
        ident = proc.identity
        async with proc._lock:  # one checkpoint of a VM at a time
            if not proc.alive():
                raise SandboxDiedError("the sandbox is not running")
            t0 = time.monotonic()
            deadline = t0 + CHECKPOINT_TIMEOUT_S

            def save() -> dict[str, Any]:
                return checkpoint.save(
                    proc.monitor(deadline), dest, ident, proc.mount_fds,
                    leave_running=leave_running,
                )  # fmt: skip

            try:
                manifest = await asyncio.to_thread(save)
            except (QMPError, EOFError, ValueError, TimeoutError, OSError) as exc:
                raise SandboxDiedError("the microVM could not be saved") from exc
        mem = manifest["memory"]
        log.info(
            "microvm pid %d: saved in %.2fs (%d bytes, %d raw)%s",
            proc.pid, time.monotonic() - t0, mem["size"], mem["raw_size"],
            "" if leave_running else ", left stopped",
        )  # fmt: skip

    async def restore(self, spec: SandboxSpec, src: Path) -> MicroVMProcess:
        """Start a sandbox from the checkpoint in ``src`` (left unchanged).

        The manifest is checked first: a checkpoint from other artifacts, another QEMU or
        another VM shape (memory, vCPUs, mounts) is refused with a PolicyError, and so is one
        whose files do not match their digests (the guest never runs: ``cont`` waits for the
        whole stream's check). The guest gets a fresh CRNG seed, clock and host name from
        the host (moat/guest/boot.py ``resume``) before the agent announces itself on the new
        channel (moat.protocol.resume); what it had queued for the old host is discarded.
        """
        reason = self.probe() if self._accel is None or self._cgroups is None else None
        if reason:
            raise IsolationUnavailableError(f"microvm tier unavailable: {reason}")
        arts = _artifacts()
        initrd, initrd_digest = await asyncio.to_thread(_initrd, arts)
        usr_image, image_digest = str(arts.usr_image), ""
        if spec.rootfs is not None:  # the template's root image, as at its start
            built, image_digest = await asyncio.to_thread(rootimage.ensure, Path(spec.rootfs))
            usr_image = str(built)
        base = qemu.VMConfig(
            qemu=probe.qemu_binary() or probe.QEMU_BINARY, accel=self._choose_accel(),
            vmlinux=str(arts.vmlinux), initrd=str(initrd), usr_image=usr_image,
            memory_mb=qemu.vm_memory_mb(spec.limits), cpus=qemu.vm_cpus(spec.limits),
            tsc_khz=probe.host_tsc_khz(), name=f"moat-{spec.sandbox_id}", agent_fd=-1,
            ctl_fd=-1, mount_fds=tuple(range(len(spec.mounts))),
        )  # fmt: skip
        ident = checkpoint.identity(base, arts, initrd_digest, image_digest)
        manifest = await asyncio.to_thread(checkpoint.load, src, ident)
        mount_fds = tuple(await asyncio.to_thread(checkpoint.open_mounts, src, manifest))
        try:
            return await self._restore(spec, src, manifest, base, ident, mount_fds)
        finally:
            _close_all(mount_fds)  # QEMU and the process hold their own

    async def _restore(
        self,
        spec: SandboxSpec,
        src: Path,
        manifest: dict[str, Any],
        base: qemu.VMConfig,
        ident: dict[str, Any],
        mount_fds: tuple[int, ...],
    ) -> MicroVMProcess:
        try:
            feeder = checkpoint.Feeder(src, manifest)
        except OSError as exc:
            raise PolicyError("the checkpoint is missing or damaged") from exc
        host_limits = Limits(
            cpus=float(base.cpus), memory_mb=base.memory_mb + QEMU_HOST_OVERHEAD_MB,
            pids=QEMU_PIDS, disk_mb=1,
        )  # fmt: skip
        deadline = time.monotonic() + RESTORE_TIMEOUT_S
        started = False

        async def resumed(
            qmp_sock: socket.socket, ctl: socket.socket, reader: asyncio.StreamReader
        ) -> QMP:
            nonlocal started
            feeder.start()
            started = True
            mon = await asyncio.to_thread(_settle, qmp_sock, feeder, deadline)
            nonce = secrets.token_hex(resume.NONCE_BYTES)
            msg = {
                "seed": secrets.token_hex(64),
                "time_ns": time.time_ns(),
                "hostname": spec.hostname,
                "nonce": nonce,
            }
            # Waits in the socket until the guest runs and guest root reads it.
            ctl.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
            await asyncio.to_thread(mon.call, "cont")
            await _announcement(reader, nonce, deadline)
            return mon

        try:
            old = self._vms.get(spec.sandbox_id)
            if old is not None:  # paused, resumed under its id: let its reaping finish first
                await asyncio.to_thread(old.reaped.wait, REAP_WAIT_S)
            # Its own cgroup name (as the container tier's restore): the paused VM's group may
            # still be on the reaper's queue on a loaded host (seen in CI: "already exists").
            cg_name = spec.sandbox_id.removeprefix("sbx-")[:56] + "-r" + secrets.token_hex(3)
            cgroup = await asyncio.to_thread(self._manager().create, cg_name, host_limits)
            try:
                cfg = qemu.VMConfig(**{**base.__dict__, "mount_fds": mount_fds})
                incoming, feeder.read_fd = feeder.read_fd, -1  # _launch closes it
                return await self._launch(
                    spec, cfg, None, cgroup, mount_fds, ident=ident, incoming_fd=incoming,
                    resumed=resumed,
                )  # fmt: skip
            except BaseException:
                await asyncio.to_thread(cgroup.destroy)
                raise
        finally:
            if started:
                await asyncio.to_thread(feeder.join, 30)
            else:
                feeder.close_unstarted()

    def _spawn_base(self, argv: list[str], fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
        return _spawn(argv, fds, [], kvm=self._accel == "kvm")


def _settle(qmp_sock: socket.socket, feeder: checkpoint.Feeder, deadline: float) -> QMP:
    """Wait until QEMU has loaded the whole checkpoint and it matched its digest; blocking.

    Returns the monitor, with the guest still paused (the checkpoint was taken stopped).
    """
    try:
        mon = QMP(qmp_sock, deadline).handshake()
        feeder.join(max(0.0, deadline - time.monotonic()))
        if feeder.ok is None:
            raise SandboxDiedError("restoring the microVM timed out")
        if not feeder.ok:
            raise PolicyError("the checkpoint is damaged")
        while (status := mon.call("query-status").get("status")) == "inmigrate":
            if time.monotonic() > deadline:
                raise SandboxDiedError("restoring the microVM timed out")
            time.sleep(0.005)
    except (QMPError, EOFError, ValueError, TimeoutError, OSError) as exc:
        feeder.join(max(0.0, deadline - time.monotonic()))
        if feeder.ok is False:
            raise PolicyError("the checkpoint is damaged") from exc
        raise SandboxDiedError("the microVM could not be restored") from exc
    if status != "paused":
        raise SandboxDiedError("the microVM could not be restored")
    return mon


async def _announcement(reader: asyncio.StreamReader, nonce: str, deadline: float) -> None:
    """Read up to the restored agent's announcement; what it had queued for the old host
    before it (bounded: RESUME_DISCARD_MAX) is dropped. The next frame is its READY."""
    dropped = await read_announcement(reader, nonce, deadline, RESUME_DISCARD_MAX)
    if dropped:
        log.info("microvm restore: dropped %d bytes queued for the old host", dropped)


def _close_all(*items: socket.socket | asyncio.StreamWriter | tuple[int, ...]) -> None:
    for item in items:
        if isinstance(item, socket.socket | asyncio.StreamWriter):
            item.close()
        else:
            for fd in item:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _guest_config(spec: SandboxSpec) -> bytes:
    """The per-sandbox configuration stage 2 applies in the guest (see moat/guest/boot.py)."""
    limits = spec.limits
    quota = max(1000, round(limits.cpus * 100_000))
    cfg = {
        "seed": secrets.token_hex(64),
        "time_ns": time.time_ns(),
        "hostname": spec.hostname,
        "env": spec.env(),
        "argv": agentdir.agent_argv(
            python="/usr/bin/python3", channel=GUEST_PORT, workdir=spec.workdir
        ),
        "disk_mb": limits.disk_mb,
        "memory_bytes": limits.memory_mb << 20,
        "pids": limits.pids,
        "cpu_max": f"{quota} 100000",
        # the container tier's filter, installed by stage 2 before the agent starts (inv. 9)
        "seccomp": seccomp.build_filter().hex(),
        # disk i (serial moat-m<i>) is mounted read-only at its sandbox path (mountimg.py)
        "mounts": [
            {"serial": f"{mountimg.SERIAL_PREFIX}{i}", "path": m.sandbox_path}
            for i, m in enumerate(spec.mounts)
        ],
    }
    return json.dumps(cfg, separators=(",", ":")).encode()


def _spawn(
    argv: list[str], fds: tuple[int, ...], procs_files: list[str], *, kvm: bool
) -> subprocess.Popen[bytes]:
    uid = UID_BASE + 1 + secrets.randbelow(UID_SPAN - 1)
    # Under KVM the VM's uid needs /dev/kvm: grant it through the device's group only.
    groups = [os.stat("/dev/kvm").st_gid] if kvm else []
    rlimits = (
        (resource.RLIMIT_CORE, 0),  # guest memory must never land in a core file
        (resource.RLIMIT_NOFILE, 1024),
        (resource.RLIMIT_NPROC, QEMU_PIDS),  # per uid, and the uid is this VM's alone
    )

    def preexec() -> None:
        # Runs in the forked child before exec: only os-level calls, no locks. Joins the
        # cgroup as root, then drops to the VM's own uid for good.
        pid = str(os.getpid()).encode()
        for path in procs_files:
            cfd = os.open(path, os.O_WRONLY)
            try:
                os.write(cfd, pid)
            finally:
                os.close(cfd)
        for res, value in rlimits:
            resource.setrlimit(res, (value, value))
        os.setgroups(groups)
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)

    return subprocess.Popen(
        argv,
        pass_fds=fds,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=preexec,  # see preexec: os calls only
        env={"PATH": "/usr/bin:/bin"},  # QEMU gets nothing of ours either (invariant 1)
        cwd="/",
        start_new_session=True,
    )


def _artifacts() -> artifacts.Artifacts:
    arts = artifacts.load()
    if arts is None:
        raise IsolationUnavailableError(
            f"microvm tier unavailable: not set up; run `{artifacts.SETUP_COMMAND}`"
        )
    return arts


#: (agent dir, base archive identity) -> (initrd path, digest): building the archive costs
#: ~20 ms of host CPU, on every start otherwise (restores take ~0.5 s in all under TCG).
_INITRD_MEMO: dict[tuple[str, int, int, int, int], tuple[Path, str]] = {}


def _initrd(arts: artifacts.Artifacts) -> tuple[Path, str]:
    """The base initramfs plus this moat's agent archive, cached by content hash."""
    agent_dir = agentdir.prepare()  # keyed by a hash of its sources: never changes in place
    st = arts.initrd_base.stat()
    memo_key = (str(agent_dir), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _INITRD_MEMO.get(memo_key)
    if hit is not None and hit[0].is_file():  # pruned meanwhile: build it again
        return hit
    agent = initramfs.agent_archive(agent_dir)
    base = arts.initrd_base.read_bytes()
    digest = hashlib.sha256(base + agent).hexdigest()[:32]
    cache = artifacts.root() / "initrd"
    cache.mkdir(exist_ok=True, mode=0o755)
    path = cache / f"{digest}.cpio"
    if not path.is_file():
        tmp = cache / f".tmp-{os.getpid()}-{digest}"
        tmp.write_bytes(base + agent)
        tmp.chmod(0o644)
        os.replace(tmp, path)
        snapshot.prune(cache, "*.cpio", snapshot.KEEP)
    _INITRD_MEMO[memo_key] = (path, digest)
    return path, digest
