"""Pure ``config -> argv`` builder for QEMU's microvm machine (golden-tested, no I/O).

Trust domain: host engine. Everything that varies per host (paths, clock rate, fds) comes in
through ``VMConfig``; the driver gathers it. Devices are exactly: the kernel + initramfs, one
read-only virtio-blk disk (/usr), one virtio-serial port (the agent's channel) and one more
read-only virtio-blk disk per host mount (mountimg.py). No network
device, no display, no USB, no option ROMs, no default devices (invariant 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moat.errors import InvalidArgumentError
from moat.runtime.spec import Limits

#: Guest RAM on top of ``limits.memory_mb``: the guest kernel (~20 MiB resident), the
#: unpacked initramfs and agent (~10 MiB), page cache for /usr and slack so that the
#: sandbox cgroup's ``memory.max`` (= limits.memory_mb) is what bites, not the VM's size.
MEMORY_OVERHEAD_MB = 96
#: 64 MiB panics the 6.1 cloud kernel; 128 MiB is the measured floor.
MIN_VM_MB = 128
#: Name of the virtio-serial port; the guest sees it as /dev/vport0p1.
AGENT_PORT = "moat.agent"
#: Name of the second port (guest root's control port); the guest sees it as /dev/vport0p2.
CTL_PORT = "moat.ctl"


@dataclass(frozen=True)
class VMConfig:
    """Everything one QEMU invocation depends on."""

    qemu: str
    accel: str
    vmlinux: str
    initrd: str
    usr_image: str
    memory_mb: int
    cpus: int
    tsc_khz: int
    name: str
    #: inherited fd of a connected unix socket: the agent's channel
    agent_fd: int
    #: inherited fd to restore a migration stream from (a snapshot), or None to boot
    incoming_fd: int | None = None
    #: inherited fd of a connected unix socket for QMP (base VMs only), or None
    qmp_fd: int | None = None
    #: file the guest console is written to (debugging only: unbounded), or None to drop it
    console_log: str | None = None
    #: inherited read-only fds of the sandbox's mount images (mountimg.py), in mount order
    mount_fds: tuple[int, ...] = ()
    #: inherited fd of a connected unix socket: the guest root's control port (restores'
    #: reseed and resume notice, checkpoint.py), or None for no such port
    ctl_fd: int | None = None

    def __post_init__(self) -> None:
        if self.accel not in ("tcg", "kvm"):
            raise InvalidArgumentError("accel must be tcg or kvm")
        if not MIN_VM_MB <= self.memory_mb <= 1 << 20:
            raise InvalidArgumentError("VM memory out of range")
        if not 1 <= self.cpus <= 64:
            raise InvalidArgumentError("VM cpus out of range")
        if not 1000 <= self.tsc_khz <= 100_000_000:
            raise InvalidArgumentError("tsc_khz out of range")
        for value in (self.vmlinux, self.initrd, self.usr_image, self.name):
            # QEMU splits option values on commas; paths here come from moat's state dir.
            if "," in value or "\0" in value:
                raise InvalidArgumentError("VM paths may not contain commas")


def vm_memory_mb(limits: Limits) -> int:
    """Guest RAM for a sandbox: its memory limit plus the guest's own overhead."""
    return max(MIN_VM_MB, limits.memory_mb + MEMORY_OVERHEAD_MB)


def vm_cpus(limits: Limits) -> int:
    """vCPUs: the limit rounded up; the guest cgroup's cpu.max enforces the fraction."""
    return max(1, math.ceil(limits.cpus))


def kernel_cmdline(tsc_khz: int) -> str:
    """The guest kernel's command line (DESIGN §6; tsc_early_khz avoids a calibration hang)."""
    return (
        f"console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz={tsc_khz} mitigations=off "
        "nokaslr pci=off rdinit=/init"
    )


def build_argv(cfg: VMConfig) -> list[str]:
    """The QEMU command line for ``cfg``."""
    argv = [
        cfg.qemu,
        "-name", cfg.name,
        "-M", "microvm,x-option-roms=off",
        # TCG's translation cache defaults to 1 GiB of host memory; 256 MiB is plenty.
        "-accel", "tcg,tb-size=256" if cfg.accel == "tcg" else "kvm",
        "-cpu", "max" if cfg.accel == "tcg" else "host",
        "-m", str(cfg.memory_mb),
        "-smp", str(cfg.cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-nic", "none",
        "-kernel", cfg.vmlinux,
        "-initrd", cfg.initrd,
        "-append", kernel_cmdline(cfg.tsc_khz),
        # The serial device first: the guest names the port after the virtio index (vport0p1).
        # max_ports > 1 is load-bearing: with the multiport feature QEMU takes no data from the
        # agent socket until the guest opens the port, so the host may send its first line as
        # soon as QEMU starts (moat/guest/init.py's boot protocol).
        "-chardev", f"socket,id=agent,fd={cfg.agent_fd}",
        # port 0 is the console's (unused), 1 the agent's, 2 the control port (if any)
        "-device", f"virtio-serial-device,max_ports={2 if cfg.ctl_fd is None else 3}",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
    ]  # fmt: skip
    if cfg.ctl_fd is not None:
        # Port 2 (/dev/vport0p2): guest root's, outside the sandbox (moat/guest/boot.py).
        argv += [
            "-chardev", f"socket,id=ctl,fd={cfg.ctl_fd}",
            "-device", f"virtserialport,chardev=ctl,name={CTL_PORT}",
        ]  # fmt: skip
    argv += [
        "-drive", f"id=usr,file={cfg.usr_image},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=usr",
    ]  # fmt: skip
    for i, fd in enumerate(cfg.mount_fds):
        # A read-only disk per mount, from an fd QEMU inherits (the image is already unlinked);
        # the guest finds it by its serial (mountimg.SERIAL_PREFIX).
        argv += [
            "-add-fd", f"fd={fd},set={i + 1}",
            "-drive", f"id=m{i},file=/dev/fdset/{i + 1},format=raw,if=none,readonly=on",
            "-device", f"virtio-blk-device,drive=m{i},serial=moat-m{i}",
        ]  # fmt: skip
    if cfg.console_log:
        argv += ["-chardev", f"file,id=con,path={cfg.console_log}", "-serial", "chardev:con"]
    else:
        argv += ["-chardev", "null,id=con", "-serial", "chardev:con"]
    if cfg.qmp_fd is not None:
        argv += ["-chardev", f"socket,id=qmp,fd={cfg.qmp_fd}", "-mon", "chardev=qmp,mode=control"]
    if cfg.incoming_fd is not None:
        argv += ["-incoming", f"fd:{cfg.incoming_fd}"]
    # QEMU's own seccomp filter: no exec, no set*id, no obsolete syscalls. (The driver starts
    # QEMU as an unprivileged uid; QEMU's -runas would need the set*id calls denied here.)
    argv += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    return argv
