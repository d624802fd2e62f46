"""Can the microVM tier run here, and with which accelerator (KVM or TCG)?

Trust domain: host engine. ``/dev/kvm`` existing is not enough: on hosts that are themselves
VMs with PVM-based KVM (``kvm_pvm``), a standard guest kernel crawls and dies with a KVM
internal error, leaving QEMU paused. So KVM is used only when ``kvm_intel``/``kvm_amd`` is
loaded, or when a bounded probe boot of the real guest reaches its init; the probe's result
is cached per host boot. Everything else is TCG (slow, but a real hardware-emulation boundary).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from moat.guest.init import BOOT_MARKER
from moat.runtime.microvm import artifacts, qemu

log = logging.getLogger("moat.runtime.microvm")

#: How long a KVM probe boot may take before KVM is declared unusable.
KVM_PROBE_TIMEOUT_S = 8.0
QEMU_BINARY = "qemu-system-x86_64"


def qemu_binary() -> str | None:
    return shutil.which(QEMU_BINARY)


def kvm_modules_loaded() -> bool:
    return any(Path(f"/sys/module/{m}").is_dir() for m in ("kvm_intel", "kvm_amd"))


def dev_kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def host_tsc_khz() -> int:
    """The host's CPU clock in kHz (for the guest's ``tsc_early_khz``), 2 GHz if unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 2_000_000


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def choose_accel(arts: artifacts.Artifacts, initrd: str) -> str:
    """``kvm`` if a standard guest really runs under KVM here, else ``tcg``."""
    if not dev_kvm_usable():
        return "tcg"
    if kvm_modules_loaded():
        return "kvm"
    cache = artifacts.root() / "kvm-probe.json"
    key = f"{_boot_id()}:{arts.digest}"
    try:
        cached = json.loads(cache.read_text())
        if isinstance(cached, dict) and cached.get("key") == key:
            return "kvm" if cached.get("kvm") is True else "tcg"
    except (OSError, ValueError):
        pass
    ok = kvm_probe_boot(arts, initrd)
    log.info("KVM probe boot %s", "succeeded" if ok else "failed: using TCG")
    tmp = cache.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "kvm": ok}))
    os.replace(tmp, cache)
    return "kvm" if ok else "tcg"


def kvm_probe_boot(arts: artifacts.Artifacts, initrd: str) -> bool:
    """Boot the guest under KVM until its init reaches stage 2; hard timeout, kill by pid."""
    binary = qemu_binary()
    if binary is None:
        return False
    host, guest = socket.socketpair()
    cfg = qemu.VMConfig(
        qemu=binary, accel="kvm", vmlinux=str(arts.vmlinux), initrd=initrd,
        usr_image=str(arts.usr_image), memory_mb=qemu.MIN_VM_MB, cpus=1,
        tsc_khz=host_tsc_khz(), name="moat-kvm-probe", agent_fd=guest.fileno(),
    )  # fmt: skip
    proc = subprocess.Popen(
        qemu.build_argv(cfg),
        pass_fds=(guest.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # /dev/kvm is root-only on most hosts; the probe runs moat's own guest, no user code
        env={"PATH": "/usr/bin:/bin"},
    )
    guest.close()
    deadline = time.monotonic() + KVM_PROBE_TIMEOUT_S
    buf = b""
    try:
        while len(buf) < len(BOOT_MARKER):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            host.settimeout(left)
            try:
                chunk = host.recv(64)
            except TimeoutError:
                return False
            if not chunk:
                return False
            buf += chunk
        return buf.startswith(BOOT_MARKER)
    finally:
        host.close()
        proc.kill()  # a paused QEMU (KVM internal error) never exits on its own
        proc.wait(timeout=10)
