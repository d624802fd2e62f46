"""The container tier's checkpoint: its writable filesystems as a tar made INSIDE (issue 11).

Trust domain: host engine. The sandbox's ``/home/user`` and ``/tmp`` are tmpfs mounts inside
bubblewrap; there is no way to keep its processes here (docs/persistence.md: CRIU), so
``keeps_memory`` is False and ``memory=True`` is a PolicyError (invariant 7: never a quiet
filesystem-only pause). ``tar`` runs in the sandbox as its user (as its root where the
sandbox has one, so root's files and every owner are kept), through the engine's ``Inside``
channel, and writes the archive to its stdout; the host stores those bytes as an
opaque file and replays them into the new sandbox's ``tar -x``. The host never walks the
sandbox's tree (a symlink planted inside would lend it the host's authority).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from moat.errors import PolicyError, QuotaExceededError, SandboxError

log = logging.getLogger("moat.runtime.container")

#: The archive inside a container checkpoint directory: a compressed tar, zstd where the
#: sandbox has ``zstd`` (several times faster than gzip both ways, and smaller), else gzip.
#: Its format is told by its first bytes (it is the sandbox's output: only a known
#: decompressor is ever asked for, and it runs inside the new sandbox).
ARCHIVE = "fs.tar"
#: The name checkpoints made before zstd used (gzip always); still read.
LEGACY_ARCHIVE = "fs.tar.gz"
#: First bytes of each format -> tar's option for it.
#: (``--use-compress-program``, not ``--zstd``: a template's older GNU tar knows it too)
_FORMATS = ((b"\x28\xb5\x2f\xfd", "--use-compress-program=zstd"), (b"\x1f\x8b", "--gzip"))
#: What is kept: the sandbox's writable trees (relative to its /).
KEPT = ("home/user", "tmp")
#: The most one archive may hold unless MOAT_CHECKPOINT_MAX_MB says otherwise (a global cap,
#: under the tenant's snapshot quota).
DEFAULT_MAX_MB = 2048
#: Why this tier can't keep memory (shown to the caller).
NO_MEMORY = (
    "the container tier can't keep processes and memory across a pause (that needs CRIU, "
    "which fails its own kernel check on this host: docs/persistence.md); pause with "
    "memory=False to keep the files in /home/user and /tmp, or use the gvisor or microvm tier"
)

#: moat's own files in the sandbox's /tmp (the gateway's CA bundle): written afresh by the new
#: sandbox's agent, never taken from an archive (which the sandbox's code may have shaped).
_MOAT_TMP = "tmp/.moat"
# Compressed: pays on the text and wheels an agent's workspace mostly holds. zstd (level 3)
# packed 14 MiB of such files ~5x faster than gzip, 8% smaller, and unpacked them ~1.6x
# faster (docs/persistence.md); gzip where a template's root has no zstd.
# --warning=no-file-changed: a file written while tar reads it is kept as read (tar's exit 1).
_PACK = (
    "if command -v zstd >/dev/null 2>&1; then z=--use-compress-program=zstd; else z=--gzip; fi; "
    f'exec tar --create "$z" --file=- --numeric-owner --sparse --exclude={_MOAT_TMP} '
    "--directory=/ --warning=no-file-changed --warning=no-file-removed --ignore-failed-read "
    + " ".join(KEPT)
)
# exec: one process less between the agent and tar (the shell's limits stay in force).
_UNPACK = (
    "exec tar --extract {z} --file=- --directory=/ --numeric-owner --preserve-permissions "
    f"--delay-directory-restore --no-overwrite-dir --exclude={_MOAT_TMP}"
)


def max_bytes() -> int:
    raw = os.environ.get("MOAT_CHECKPOINT_MAX_MB", "")
    try:
        mb = int(raw) if raw else DEFAULT_MAX_MB
    except ValueError:
        mb = DEFAULT_MAX_MB
    return max(1, mb) << 20


def _inside(proc: Any) -> Any:
    inside = getattr(proc, "inside", None)
    if inside is None:
        raise SandboxError("the sandbox's agent is not ready to be checkpointed")
    return inside


async def checkpoint(proc: Any, dest: Path, *, memory: bool, cap: int | None = None) -> None:
    """Save ``proc``'s writable files into ``dest`` (empty, host-owned); fail closed."""
    if memory:
        raise PolicyError(NO_MEMORY)
    limit = max_bytes() if cap is None else min(cap, max_bytes())
    inside = _inside(proc)
    path = dest / ARCHIVE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        code = await inside.output_to(_PACK, out, limit)
        out.flush()
        await asyncio.to_thread(os.fsync, out.fileno())
    if code not in (0, 1):  # 1: a file changed while read (kept as read)
        raise SandboxError(f"the sandbox's files could not be archived (tar exit {code})")


def archive(src: Path) -> Path | None:
    """The archive of the checkpoint ``src`` (either name), or None."""
    for name in (ARCHIVE, LEGACY_ARCHIVE):
        if (src / name).is_file():
            return src / name
    return None


async def unpack(proc: Any, src: Path) -> None:
    """Replay the archive of ``src`` into the new sandbox ``proc`` (its agent up), streamed
    from the file to ``tar -x`` inside (no copy on the way)."""
    path = archive(src)
    if path is None:
        raise SandboxError("the paused sandbox's files are missing")
    inside = _inside(proc)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        head = f.read(4)
        option = next((opt for magic, opt in _FORMATS if head.startswith(magic)), None)
        if option is None:
            raise SandboxError("the paused sandbox's files are not in a format moat wrote")
        f.seek(0)
        code = await inside.input_from(_UNPACK.format(z=option), f)
    if code != 0:
        raise SandboxError(f"the paused sandbox's files could not be restored (tar exit {code})")


def too_large(limit: int) -> QuotaExceededError:
    return QuotaExceededError(
        f"the sandbox's files exceed the checkpoint cap of {limit >> 20} MiB; the sandbox "
        "keeps running"
    )
