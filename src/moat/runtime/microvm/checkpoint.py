"""Checkpoint and restore of a running microVM sandbox, memory included (issue 11).

Trust domain: host engine. The guest's writable space (/home/user, /tmp) is tmpfs in guest
RAM, so QEMU's migration stream of the stopped VM is the sandbox's whole state (processes,
kernels, files) apart from its read-only disks: /usr (an artifact, checked by digest) and the
sandbox's mount images, which are copied. A checkpoint directory holds::

    manifest.json   the identity restore must match, and each file's size and sha256
    memory.zst      QEMU's migration stream, zstd-compressed while QEMU writes it
    mount-<i>.img   the sandbox's read-only mount images, in mount order

QEMU writes into a pipe (``getfd`` + ``fd:``, never ``exec:``: its seccomp filter denies
spawning); a host thread hashes, compresses and writes the file, so a full disk is our own
ENOSPC, never a half-written file taken for a checkpoint. Restore feeds the stream back
through a pipe, hashing as it goes, and starts the guest (``cont``) only once the whole
stream matched its digest: a damaged or altered checkpoint never runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from moat.errors import DiskFullError, PolicyError, SandboxDiedError
from moat.runtime.microvm import artifacts, qemu, snapshot
from moat.runtime.microvm.qmp import QMP, QMPError

FORMAT = 1
MANIFEST = "manifest.json"
MEMORY = "memory.zst"
#: zstd level 1: ~3.4x on a guest's stream at ~250 MB/s per core here (level 3 saves 8% more
#: for 20% more time); decompression runs at ~1 GB/s, well ahead of QEMU's load.
ZSTD_LEVEL = 1
_CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031
#: Largest manifest read (it is a few KiB).
_MAX_MANIFEST = 1 << 20


def identity(
    cfg: qemu.VMConfig, arts: artifacts.Artifacts, initrd_digest: str, root_digest: str = ""
) -> dict[str, Any]:
    """What a restore must match exactly: QEMU, the guest's kernel, initramfs and agent, /usr
    (or the template's root image: ``root_digest``), the accelerator and clock, guest RAM,
    vCPUs and the device set (the argv's shape)."""
    shape = qemu.build_argv(
        qemu.VMConfig(
            qemu="qemu", accel=cfg.accel, vmlinux="K", initrd="I", usr_image="U",
            memory_mb=cfg.memory_mb, cpus=cfg.cpus, tsc_khz=cfg.tsc_khz, name="N",
            agent_fd=3, ctl_fd=4, qmp_fd=5, incoming_fd=6,
            mount_fds=tuple(range(7, 7 + len(cfg.mount_fds))),
        )
    )  # fmt: skip
    return {
        "format": FORMAT,
        "qemu": snapshot.qemu_version(cfg.qemu),
        "artifacts": arts.digest,
        "initrd": initrd_digest,
        "root": root_digest,
        "accel": cfg.accel,
        "tsc_khz": cfg.tsc_khz,
        "memory_mb": cfg.memory_mb,
        "cpus": cfg.cpus,
        "devices": shape,
    }


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # fewer wake-ups; the default 64 KiB works too
        fcntl.fcntl(w, _F_SETPIPE_SZ, _CHUNK)
    return r, w


def _sha256_file(fd: int) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    while chunk := os.read(fd, _CHUNK):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()


class _Writer(threading.Thread):
    """Drains QEMU's migration pipe into ``path``: hash, compress, write."""

    def __init__(self, read_fd: int, out_fd: int, path: Path) -> None:
        super().__init__(name="moat-ckpt-writer", daemon=True)
        self.read_fd = read_fd
        self.out_fd = out_fd
        self.path = path
        self.error: BaseException | None = None
        self.raw_size = 0
        self.size = 0
        self.sha256 = ""

    def run(self) -> None:
        h = hashlib.sha256()
        try:
            try:
                with open(self.out_fd, "wb", closefd=False) as out:
                    comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
                    while chunk := os.read(self.read_fd, _CHUNK):
                        self.raw_size += len(chunk)
                        data = comp.compress(chunk)
                        h.update(data)
                        self.size += out.write(data)
                    data = comp.flush()
                    h.update(data)
                    self.size += out.write(data)
                os.fsync(self.out_fd)
            finally:
                os.close(self.out_fd)
            self.sha256 = h.hexdigest()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self.error = exc
        finally:
            os.close(self.read_fd)  # QEMU's next write fails: the migration stops


def save(
    mon: QMP,
    dest: Path,
    ident: dict[str, Any],
    mount_fds: tuple[int, ...],
    *,
    leave_running: bool,
) -> dict[str, Any]:
    """Save the VM behind ``mon`` into the empty directory ``dest``; blocking.

    The VM is stopped for the save; it runs again afterwards if ``leave_running`` or if the
    save failed (fail closed: the source is left as it was, ``dest`` holds none of our files).
    """
    was_running = bool(mon.call("query-status").get("running"))
    if was_running:
        mon.call("stop")
    ok = False
    written: list[Path] = []
    try:
        manifest = dict(ident)
        manifest["memory"] = _migrate(mon, dest / MEMORY, written)
        manifest["mounts"] = [
            _copy_mount(fd, dest / f"mount-{i}.img", written) for i, fd in enumerate(mount_fds)
        ]
        manifest["saved_at"] = int(time.time())
        path = dest / MANIFEST
        written.append(path)
        with open(path, "x") as f:
            json.dump(manifest, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        dfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        ok = True
        return manifest
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError("not enough disk space on the host to save the sandbox") from exc
        raise SandboxDiedError("the microVM could not be saved") from exc
    except (QMPError, EOFError, ValueError, TimeoutError) as exc:
        raise SandboxDiedError("the microVM could not be saved") from exc
    finally:
        if not ok:
            for p in written:
                with contextlib.suppress(OSError):
                    p.unlink()
        if was_running and (leave_running or not ok):
            with contextlib.suppress(QMPError, EOFError, ValueError, TimeoutError, OSError):
                mon.call("cont")


def _migrate(mon: QMP, path: Path, written: list[Path]) -> dict[str, Any]:
    # Unthrottled: the VM is stopped, there is nothing to converge (QEMU's default cap is
    # 128 MiB/s, 0.5 s for a small guest's stream).
    mon.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
    # Created here, not on the writer's thread: a failure's cleanup then always finds it.
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    written.append(path)
    try:
        r, w = _pipe()
    except OSError:
        os.close(out)
        raise
    writer = _Writer(r, out, path)
    try:
        mon.call("getfd", fds=[w], fdname="moat-ckpt")
    except BaseException:
        os.close(r)
        os.close(out)
        raise
    finally:
        os.close(w)
    writer.start()
    try:
        mon.call("migrate", uri="fd:moat-ckpt")
        while True:
            info = mon.call("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                writer.join(timeout=30)
                if writer.error is not None:
                    raise writer.error
                raise SandboxDiedError("QEMU could not save the microVM")
            time.sleep(0.01)
    except BaseException:
        with contextlib.suppress(QMPError, EOFError, ValueError, TimeoutError, OSError):
            mon.call("migrate_cancel")
        raise
    finally:
        with contextlib.suppress(QMPError, EOFError, ValueError, TimeoutError, OSError):
            mon.call("closefd", fdname="moat-ckpt")  # gone already once the migration ended
    writer.join(timeout=60)
    if writer.is_alive():
        raise SandboxDiedError("saving the microVM timed out")
    if writer.error is not None:
        raise writer.error
    return {
        "file": MEMORY,
        "codec": "zstd",
        "raw_size": writer.raw_size,
        "size": writer.size,
        "sha256": writer.sha256,
    }


def _copy_mount(src_fd: int, path: Path, written: list[Path]) -> dict[str, Any]:
    """Copy a mount image (an unlinked read-only file QEMU also reads) into the checkpoint."""
    written.append(path)
    size = os.fstat(src_fd).st_size
    h = hashlib.sha256()
    with open(path, "xb") as out:
        off = 0
        while off < size:
            chunk = os.pread(src_fd, min(_CHUNK, size - off), off)
            if not chunk:
                break
            h.update(chunk)
            out.write(chunk)
            off += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return {"file": path.name, "size": size, "sha256": h.hexdigest()}


# -- restore ---------------------------------------------------------------------------------


def load(src: Path, ident: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's manifest, checked against this host's ``ident`` before anything runs.

    Raises PolicyError naming what differs (never a partial restore).
    """
    try:
        with open(src / MANIFEST, "rb") as f:
            raw = f.read(_MAX_MANIFEST + 1)
        if len(raw) > _MAX_MANIFEST:
            raise ValueError("manifest too large")
        manifest = json.loads(raw)
        if not isinstance(manifest, dict):
            raise ValueError("manifest is not an object")
    except (OSError, ValueError) as exc:
        raise PolicyError("the checkpoint is missing or damaged") from exc
    if manifest.get("format") != FORMAT:
        raise PolicyError("the checkpoint was saved by an incompatible moat version")
    differ = sorted(k for k, v in ident.items() if manifest.get(k) != v)
    if differ:
        raise PolicyError(
            "the checkpoint was saved with other microVM artifacts or another VM shape "
            f"({', '.join(differ)}) and cannot be restored here"
        )
    mem = manifest.get("memory")
    mounts = manifest.get("mounts")
    if not (isinstance(mem, dict) and mem.get("file") == MEMORY and mem.get("codec") == "zstd"):
        raise PolicyError("the checkpoint is damaged")
    if not isinstance(mounts, list) or not all(
        isinstance(m, dict) and m.get("file") == f"mount-{i}.img" for i, m in enumerate(mounts)
    ):
        raise PolicyError("the checkpoint is damaged")
    return manifest


def open_mounts(src: Path, manifest: dict[str, Any]) -> list[int]:
    """Read-only fds of the checkpoint's mount images, each checked against its digest."""
    fds: list[int] = []
    try:
        for m in manifest["mounts"]:
            fd = os.open(src / str(m["file"]), os.O_RDONLY | os.O_CLOEXEC)
            fds.append(fd)
            size, digest = _sha256_file(fd)
            if (size, digest) != (m.get("size"), m.get("sha256")):
                raise PolicyError("the checkpoint is damaged")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


class Feeder(threading.Thread):
    """Feeds a checkpoint's stream to QEMU's ``-incoming fd:`` pipe, checking its digest."""

    def __init__(self, src: Path, manifest: dict[str, Any]) -> None:
        super().__init__(name="moat-ckpt-feeder", daemon=True)
        mem = manifest["memory"]
        self.expected = (mem.get("size"), mem.get("sha256"))
        self.file_fd = os.open(src / MEMORY, os.O_RDONLY | os.O_CLOEXEC)
        self.read_fd, self.write_fd = _pipe()
        #: None while running; then whether the stream was whole and matched its digest
        self.ok: bool | None = None

    def run(self) -> None:
        h = hashlib.sha256()
        size = 0
        ok = False
        try:
            with open(self.file_fd, "rb", closefd=False) as f:
                dctx = zstandard.ZstdDecompressor()
                reader = dctx.stream_reader(cast("IO[bytes]", _Hashing(f, h)))
                while chunk := reader.read(_CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(self.write_fd, view) :]
                size = f.tell()
            ok = (size, h.hexdigest()) == self.expected
        except (OSError, zstandard.ZstdError):
            ok = False
        finally:
            os.close(self.file_fd)
            os.close(self.write_fd)  # EOF (or a short stream) for QEMU
            self.ok = ok

    def close_unstarted(self) -> None:
        """Close what a feeder that never ran holds (``read_fd`` is -1 once handed to QEMU)."""
        for fd in (self.file_fd, self.read_fd, self.write_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


class _Hashing:
    """A raw file reader that hashes what it hands out (the compressed bytes)."""

    def __init__(self, f: Any, h: Any) -> None:
        self.f = f
        self.h = h

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.f.read(n)
        self.h.update(data)
        return data
