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
import time
from pathlib import Path

from moat.errors import IsolationUnavailableError, SandboxDiedError
from moat.guest.init import BOOT_MARKER
from moat.runtime import agentdir, cgroups, reaper, seccomp
from moat.runtime.microvm import (
    artifacts,
    initramfs,
    mountimg,
    probe,
    qemu,
    rootimage,
    snapshot,
)
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
    ) -> None:
        self.proc = proc
        self.cgroup = cgroup
        self.reader = reader
        self.writer = writer
        self.restored = restored
        self.vm_memory_mb = vm_memory_mb
        self._killed = False

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
        reaper.submit(cgroup.name, lambda: _stop(proc, cgroup))

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
        )  # fmt: skip
        snap: Path | None = None
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
            return await self._launch(spec, base, snap, cgroup, mount_fds)
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
    ) -> MicroVMProcess:
        snap_fd = None
        if snap is not None:
            try:
                snap_fd = os.open(snap, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                snap = None  # pruned meanwhile: boot instead (same isolation, just slower)
        host_sock, guest_sock = socket.socketpair()
        console = None
        if self.console_log:
            console = os.path.join(self.console_log, f"{spec.sandbox_id}.log")
        cfg = qemu.VMConfig(
            **{**base.__dict__, "agent_fd": guest_sock.fileno(), "incoming_fd": snap_fd,
               "console_log": console, "mount_fds": mount_fds}
        )  # fmt: skip
        fds = (guest_sock.fileno(),) + ((snap_fd,) if snap_fd is not None else ()) + mount_fds
        t0 = time.monotonic()
        try:
            proc = _spawn(qemu.build_argv(cfg), fds, cgroup.procs_files, kvm=cfg.accel == "kvm")
        except OSError as exc:
            host_sock.close()
            raise SandboxDiedError("the microVM could not be started") from exc
        finally:
            guest_sock.close()
            if snap_fd is not None:
                os.close(snap_fd)
        try:
            reader, writer = await asyncio.open_unix_connection(sock=host_sock, limit=1 << 21)
            # Sent at once, also to a booting guest: it waits in the socket until stage 2
            # opens the port (see moat/guest/init.py), so the guest never waits for the host.
            writer.write(_guest_config(spec) + b"\n")
            await asyncio.wait_for(writer.drain(), BOOT_TIMEOUT_S)
            if snap is None:
                # A cold boot announces stage 2; a restored base VM already did, before saving.
                marker = await asyncio.wait_for(
                    reader.readexactly(len(BOOT_MARKER)), BOOT_TIMEOUT_S
                )
                if marker != BOOT_MARKER:
                    raise SandboxDiedError("the microVM sent an unexpected boot message")
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            await asyncio.to_thread(_stop, proc, cgroup)
            raise SandboxDiedError("the microVM did not boot") from exc
        except BaseException:
            await asyncio.to_thread(_stop, proc, cgroup)
            raise
        log.info(
            "microvm %s: %s in %.2fs (pid %d)",
            spec.sandbox_id, "restored" if snap else "booted", time.monotonic() - t0, proc.pid,
        )  # fmt: skip
        return MicroVMProcess(
            proc, cgroup, reader, writer, restored=snap is not None, vm_memory_mb=base.memory_mb
        )

    def _spawn_base(self, argv: list[str], fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
        return _spawn(argv, fds, [], kvm=self._accel == "kvm")


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
