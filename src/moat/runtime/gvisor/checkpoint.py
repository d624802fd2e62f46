"""Checkpoint images of the gvisor tier: ``runsc checkpoint``, the manifest, restore checks.

Trust domain: host engine. A checkpoint directory holds runsc's ``checkpoint.img`` (the
sentry's whole state: every process, its memory, the tmpfs contents; compressed by runsc) and
``manifest.json``, written here from host-side facts only: runsc's version, the platform, the
agent's and the preload library's identities, the protocol version and the sandbox's OCI
config with its per-sandbox paths blanked. Nothing in either file is secret: the sandbox only
ever holds placeholders (invariant 3), and the gateway is rebuilt on restore.

A restore happens into a freshly built bundle for the new spec, which must equal the
checkpointed one except for the sandbox id: the image carries the processes' environment,
rlimits, hostname and mounts, so any other difference would give the sandbox limits or
mounts that its spec does not say (invariant 7: refused, never patched up). The agent
directory bound at ``/opt/moat`` is the one the checkpointed agent was running, found by its
content hash; a restore after an upgrade that removed it, or that changed the protocol, is
refused the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from moat.errors import DiskFullError, InvalidArgumentError, PolicyError, SandboxDiedError
from moat.paths import state_dir
from moat.protocol import PROTOCOL_VERSION
from moat.runtime.gvisor.fscopy import ARCHIVE
from moat.runtime.gvisor.probe import RUNSC_ENV
from moat.runtime.spec import AGENT_DIR

__all__ = [
    "IMAGE",
    "MANIFEST",
    "RESTORE_TIMEOUT",
    "RestoreImage",
    "check_space",
    "load_image",
    "run_checkpoint",
    "runsc_version",
    "wait_running",
    "write_manifest",
]

#: runsc's image file in a checkpoint directory (its name is fixed by runsc).
IMAGE: Final = "checkpoint.img"
MANIFEST: Final = "manifest.json"
_FORMAT: Final = 1
#: Seconds ``runsc checkpoint`` may take per GiB of sandbox memory, on top of a base.
CHECKPOINT_BASE_S: Final = 30.0
CHECKPOINT_PER_GIB_S: Final = 60.0
#: Seconds a restored sandbox may take to load its image and run.
RESTORE_TIMEOUT: Final = 60.0
#: Free bytes a checkpoint needs on top of the sandbox's memory in use (an upper bound of
#: the image: runsc compresses it). runsc kills the sandbox when its save fails, so the
#: check comes first (a full disk must leave the sandbox running).
SPACE_MARGIN: Final = 32 << 20
_WORKDIR: Final = "@WORKDIR@"
_CGROUP: Final = "@CGROUP@"


def runsc_version(exe: str) -> str:
    """The first line of ``runsc --version`` (``runsc version 0.0~20221219.0``); asked again
    when the binary changes (an upgrade under a running engine)."""
    try:
        st = os.stat(exe)
    except OSError as exc:
        raise PolicyError("gvisor: runsc's version could not be read") from exc
    return _version(exe, st.st_ino, st.st_mtime_ns)


@functools.cache
def _version(exe: str, _ino: int, _mtime: int) -> str:
    try:
        out = subprocess.run(
            [exe, "--version"], capture_output=True, env=RUNSC_ENV, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise PolicyError("gvisor: runsc's version could not be read") from exc
    return out.decode(errors="replace").splitlines()[0].strip() if out else "unknown"


def _normalise(config: dict[str, Any], workdir: Path, cgroups_path: str) -> dict[str, Any]:
    """The config with what differs per sandbox id (paths under the work dir, the cgroup)
    replaced by markers, so that a fork's config compares equal to its source's."""
    text = json.dumps(config, sort_keys=True)
    text = text.replace(json.dumps(str(workdir))[1:-1], _WORKDIR)
    out: dict[str, Any] = json.loads(text)
    linux = out.get("linux")
    if isinstance(linux, dict) and linux.get("cgroupsPath") == cgroups_path:
        linux["cgroupsPath"] = _CGROUP
    return out


def _agent_hash(config: dict[str, Any]) -> str:
    for m in config.get("mounts", []):
        if isinstance(m, dict) and m.get("destination") == AGENT_DIR:
            return Path(str(m.get("source", ""))).name
    raise PolicyError("gvisor: the sandbox has no agent mount")


def check_space(dest: Path, memory_bytes: int) -> None:
    """DiskFullError unless ``dest`` has room for a save of a sandbox using ``memory_bytes``."""
    st = os.statvfs(dest)
    if st.f_bavail * st.f_frsize < memory_bytes + SPACE_MARGIN:
        raise DiskFullError("not enough disk space on the host to save the sandbox")


async def run_checkpoint(
    exe: str, root: Path, log: Path, sandbox_id: str, dest: Path, memory_bytes: int
) -> None:
    """``runsc checkpoint --image-path=dest``: the sandbox stops once it is saved.

    Raises DiskFullError before touching the sandbox when ``dest`` has too little room,
    SandboxDiedError when runsc fails (its save failure ends the sandbox too).
    """
    await asyncio.to_thread(check_space, dest, memory_bytes)
    argv = [exe, "--root", str(root), f"--log={log}", "checkpoint", f"--image-path={dest}"]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        sandbox_id,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=RUNSC_ENV,
        start_new_session=True,
    )
    limit = CHECKPOINT_BASE_S + CHECKPOINT_PER_GIB_S * memory_bytes / (1 << 30)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), limit)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await proc.wait()
        raise
    if proc.returncode != 0:
        # runsc's message names host paths: the log keeps it, the caller gets a safe one
        with contextlib.suppress(OSError), log.open("ab") as f:
            f.write(b"checkpoint failed: " + err[-4096:])
        raise SandboxDiedError("the gvisor sandbox could not be checkpointed")
    if not (dest / IMAGE).is_file():
        raise SandboxDiedError("the gvisor sandbox could not be checkpointed")


def write_manifest(
    dest: Path,
    *,
    exe: str,
    platform: str,
    workdir: Path,
    cgroups_path: str,
    sandbox_id: str,
    memory: bool = True,
    handshake: bool = False,
) -> None:
    """Record what a restore must match, next to the image (written by the host only)."""
    config = json.loads((workdir / "bundle" / "config.json").read_text())
    preload = workdir / "bundle" / "rootfs" / ".moat" / "statx_compat.so"
    payload = IMAGE if memory else ARCHIVE
    manifest = {
        "format": _FORMAT,
        "tier": "gvisor",
        "memory": memory,
        "runsc": runsc_version(exe),
        "platform": platform,
        "protocol": PROTOCOL_VERSION,
        "agent": _agent_hash(config),
        "preload": _file_digest(preload),
        "source": sandbox_id,
        "created": time.time(),
        "image_bytes": (dest / payload).stat().st_size,
        "config": _normalise(config, workdir, cgroups_path),
    }
    if handshake:  # the agent was quiesced: a restore starts with RESUME (protocol.resume)
        manifest["handshake"] = 1
    tmp = dest / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, sort_keys=True))
    os.replace(tmp, dest / MANIFEST)
    for name in (payload, MANIFEST):
        os.chmod(dest / name, 0o600)


def _file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


@dataclass(frozen=True)
class RestoreImage:
    """A checkpoint directory whose manifest matched this host's runsc and platform."""

    path: Path
    manifest: dict[str, Any]

    @property
    def memory(self) -> bool:
        """A full memory image (else ``/home/user`` only: :mod:`moat.runtime.gvisor.fscopy`)."""
        return self.manifest.get("memory") is True

    @property
    def handshake(self) -> bool:
        """Its agent was quiesced: a restore onto a new stream sends RESUME with a nonce
        and reads the announcement (else, an image of before: the agent carries on)."""
        return self.memory and self.manifest.get("handshake") == 1

    @property
    def agent_dir(self) -> Path:
        """The agent directory the checkpointed agent was running (bound again)."""
        return state_dir() / "agent" / str(self.manifest["agent"])

    def check(self, config: dict[str, Any], workdir: Path, cgroups_path: str) -> None:
        """Refuse a bundle whose config differs from the checkpointed one (invariant 7)."""
        want = self.manifest["config"]
        have = _normalise(config, workdir, cgroups_path)
        if have != want:
            keys = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k)) or [
                "config"
            ]
            parts = []
            for k in keys:
                w, h = want.get(k), have.get(k)
                if isinstance(w, dict) and isinstance(h, dict):
                    sub = sorted(s for s in set(w) | set(h) if w.get(s) != h.get(s))
                    parts += [f"{k}.{s}" for s in sub]
                else:
                    parts.append(k)
            raise PolicyError(
                "gvisor: the sandbox's configuration differs from the checkpoint's "
                f"({', '.join(parts)}); a checkpoint restores only with the same settings"
            )
        preload = workdir / "bundle" / "rootfs" / ".moat" / "statx_compat.so"
        if _file_digest(preload) != self.manifest.get("preload"):
            raise PolicyError("gvisor: the checkpoint was taken with another compat library")


def load_image(src: Path, exe: str, platform: str) -> RestoreImage:
    """Read and check ``src``'s manifest against this host; raise a typed error if unusable."""
    try:
        manifest = json.loads((src / MANIFEST).read_text())
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
            raise ValueError("format")
        if manifest.get("tier") != "gvisor" or manifest.get("memory") not in (True, False):
            raise ValueError("tier")
        size = (src / (IMAGE if manifest["memory"] else ARCHIVE)).stat().st_size
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError("not a gvisor checkpoint (or a damaged one)") from exc
    if manifest.get("image_bytes") != size or not isinstance(manifest.get("config"), dict):
        raise InvalidArgumentError("the gvisor checkpoint is damaged (its image changed)")
    if manifest["memory"] is False:
        return RestoreImage(src, manifest)  # files only: a fresh sandbox of today's moat
    if manifest.get("runsc") != runsc_version(exe):
        raise PolicyError(
            f"gvisor: the checkpoint was taken with {manifest.get('runsc')!s:.60}, "
            f"this host has {runsc_version(exe)}: it cannot be restored here"
        )
    if manifest.get("platform") != platform:
        raise PolicyError(
            f"gvisor: the checkpoint was taken on the {manifest.get('platform')!s:.20} "
            f"platform, not {platform}"
        )
    if manifest.get("protocol") != PROTOCOL_VERSION:
        raise PolicyError("gvisor: the checkpointed agent speaks another protocol version")
    image = RestoreImage(src, manifest)
    agent = str(manifest.get("agent", ""))
    if not agent.isalnum() or not image.agent_dir.is_dir():
        raise PolicyError("gvisor: the moat version that took the checkpoint is not installed")
    return image


def _state(root: Path, sandbox_id: str) -> str | None:
    try:
        data = json.loads((root / f"{sandbox_id}_sandbox:{sandbox_id}.state").read_text())
    except (OSError, ValueError):
        return None
    status = data.get("status") if isinstance(data, dict) else None
    return status if isinstance(status, str) else None


async def wait_running(proc: asyncio.subprocess.Process, root: Path, sandbox_id: str) -> None:
    """Wait until runsc records the restored sandbox as running (its image is loaded)."""
    deadline = time.monotonic() + RESTORE_TIMEOUT
    while _state(root, sandbox_id) != "running":
        if proc.returncode is not None:
            raise SandboxDiedError("the gvisor sandbox could not be restored")
        if time.monotonic() > deadline:
            raise SandboxDiedError("the gvisor sandbox did not restore in time")
        await asyncio.sleep(0.005)
