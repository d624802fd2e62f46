"""Base VM snapshots: boot once, save with QEMU migration, restore per sandbox.

Trust domain: host engine. A base VM runs only moat's own guest (init and stage 2, which
block waiting for a per-sandbox configuration); no user code has run when it is saved, so
the snapshot holds nothing of any sandbox. Restored guests get a fresh RNG seed, clock,
hostname and limits through that configuration (see moat/guest/boot.py).

The snapshot is keyed by a hash of everything the saved state depends on: the kernel,
initramfs and agent (the initrd digest), the /usr image's build id, QEMU's version, the
accelerator, clock rate, VM memory and vCPU count. A mismatch means a new base VM.
Migration goes to and from file descriptors (``getfd`` + ``fd:``), never ``exec:`` shell
strings, so QEMU's seccomp filter can deny spawning processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from moat.errors import SandboxDiedError
from moat.guest.init import BASE_REQUEST, BOOT_MARKER, WARM_MARKER
from moat.runtime.microvm import artifacts, qemu
from moat.runtime.microvm.qmp import QMP

#: A base VM must boot and save within this (TCG on a loaded 2-core host is slow).
BASE_TIMEOUT_S = 120.0
#: Snapshots kept (newest first); each is ~85 MB for a 608 MiB guest. Older ones belong to
#: earlier agents, kernels or VM shapes. Running VMs keep reading theirs through their fd.
KEEP = 4


@functools.cache
def qemu_version(binary: str) -> str:
    out = subprocess.run(
        [binary, "--version"], capture_output=True, timeout=30, check=False
    ).stdout.decode(errors="replace")
    return out.splitlines()[0] if out else "unknown"


def key(cfg: qemu.VMConfig, arts: artifacts.Artifacts, initrd_digest: str, image: str = "") -> str:
    """The snapshot key of a VM configuration (paths and fds excluded: they vary per run);
    ``image``: the digest of a template's root image (issue 12), "" for the host's /usr."""
    parts = {
        "artifacts": arts.digest,
        "initrd": initrd_digest,
        "qemu": qemu_version(cfg.qemu),
        "accel": cfg.accel,
        "tsc_khz": cfg.tsc_khz,
        "memory_mb": cfg.memory_mb,
        "cpus": cfg.cpus,
        "argv_shape": qemu.build_argv(
            qemu.VMConfig(
                qemu="qemu", accel=cfg.accel, vmlinux="K", initrd="I", usr_image="U",
                memory_mb=cfg.memory_mb, cpus=cfg.cpus, tsc_khz=cfg.tsc_khz, name="N",
                agent_fd=3, ctl_fd=None if cfg.ctl_fd is None else 4,
            )
        ),
    }  # fmt: skip
    if image:
        parts["image"] = image
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def directory() -> Path:
    path = artifacts.root() / "snapshots"
    path.mkdir(exist_ok=True, mode=0o700)
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure(
    cfg: qemu.VMConfig,
    snap_key: str,
    spawn: Callable[[list[str], tuple[int, ...]], subprocess.Popen[bytes]],
    folder: Path | None = None,
) -> Path:
    """Return the snapshot file for ``snap_key``, booting and saving a base VM if needed.

    Blocking (run it in a thread). ``spawn(argv, pass_fds)`` starts QEMU the way the driver
    starts every VM (unprivileged uid, limits). Concurrent callers wait on a lock file.
    ``folder``: where to keep it (a template's own, issue 12: its snapshots then neither evict
    the host's nor outlive the template), else :func:`directory`.
    """
    if folder is None:
        folder = directory()
    else:
        folder.mkdir(exist_ok=True, mode=0o700)
    path = folder / f"{snap_key}.bin"
    if path.is_file():
        return path
    with _locked(folder / f"{snap_key}.lock"):
        if path.is_file():
            return path
        tmp = folder / f".tmp-{os.getpid()}-{snap_key}.bin"
        try:
            _save_base(cfg, tmp, spawn)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    prune(folder, "*.bin", KEEP)
    return path


def prune(folder: Path, pattern: str, keep: int) -> int:
    """Delete all but the ``keep`` most recently modified files matching ``pattern``."""
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[keep:]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
            old.with_suffix(".lock").unlink(missing_ok=True)
    return max(0, len(files) - keep)


def _save_base(
    cfg: qemu.VMConfig,
    out: Path,
    spawn: Callable[[list[str], tuple[int, ...]], subprocess.Popen[bytes]],
) -> None:
    deadline = time.monotonic() + BASE_TIMEOUT_S
    agent_host, agent_guest = socket.socketpair()
    qmp_host, qmp_guest = socket.socketpair()
    # The same device set as the sandboxes restored from it (their control port included).
    ctl_host, ctl_guest = socket.socketpair()
    has_ctl = cfg.ctl_fd is not None
    tcfg = qemu.VMConfig(**{**cfg.__dict__, "agent_fd": agent_guest.fileno(),
                            "qmp_fd": qmp_guest.fileno(), "incoming_fd": None,
                            "ctl_fd": ctl_guest.fileno() if has_ctl else None,
                            "name": "moat-base"})  # fmt: skip
    fds = (agent_guest.fileno(), qmp_guest.fileno()) + ((ctl_guest.fileno(),) if has_ctl else ())
    proc = spawn(qemu.build_argv(tcfg), fds)
    agent_guest.close()
    qmp_guest.close()
    ctl_guest.close()
    try:
        # A base VM warms up (imports the agent) before it waits for its configuration.
        agent_host.sendall(BASE_REQUEST)
        expected = BOOT_MARKER + WARM_MARKER
        buf = b""
        while len(buf) < len(expected):
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxDiedError("the microVM base VM did not boot in time")
            agent_host.settimeout(left)
            chunk = agent_host.recv(len(expected) - len(buf))
            if not chunk:
                raise SandboxDiedError("the microVM base VM stopped during boot")
            buf += chunk
        if buf != expected:
            raise SandboxDiedError("the microVM base VM sent an unexpected boot message")
        mon = QMP(qmp_host, deadline)
        mon.greeting()
        mon.call("qmp_capabilities")
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            mon.call("getfd", fds=[fd], fdname="snapshot")
        finally:
            os.close(fd)
        # Saved while running: the stream then says "running" and restored VMs start at once.
        mon.call("migrate", uri="fd:snapshot")
        while True:
            status = mon.call("query-migrate").get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise SandboxDiedError("saving the microVM base VM failed")
            if time.monotonic() > deadline:
                raise SandboxDiedError("saving the microVM base VM timed out")
            time.sleep(0.05)
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        raise SandboxDiedError("the microVM base VM could not be saved") from exc
    finally:
        agent_host.close()
        qmp_host.close()
        ctl_host.close()
        proc.kill()
        proc.wait(timeout=10)
    with open(out, "rb") as f:
        os.fsync(f.fileno())
