"""The validated, frozen description of one sandbox that every runtime driver consumes."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from moat.errors import InvalidArgumentError

#: Where the agent's code is bound read-only inside every sandbox.
AGENT_DIR = "/opt/moat"
#: The sandbox user's home and working directory (writable, size-capped).
HOME = "/home/user"
#: uid/gid the sandboxed processes see (mapped to an unprivileged host id).
SANDBOX_UID = 1000
SANDBOX_GID = 1000

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: Paths a Mount may not cover inside the sandbox: they hold moat's own machinery.
_RESERVED = ("/proc", "/dev", "/sys", AGENT_DIR, "/usr", "/etc", "/bin", "/lib", "/lib64", "/sbin")


@dataclass(frozen=True)
class Limits:
    """Resource caps enforced by the kernel (cgroups, rlimits, the VM's size).

    Defaults protect a 2-core host: one CPU, 512 MiB, 256 processes, 1 GiB of writable disk.
    """

    cpus: float = 1.0
    memory_mb: int = 512
    pids: int = 256
    disk_mb: int = 1024

    def __post_init__(self) -> None:
        for name, lo, hi in (
            ("cpus", 0.05, 64.0),
            ("memory_mb", 32, 1 << 20),
            ("pids", 8, 1 << 16),
            ("disk_mb", 1, 1 << 20),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidArgumentError(f"Limits.{name} must be a number")
            if name != "cpus" and not isinstance(value, int):
                raise InvalidArgumentError(f"Limits.{name} must be an integer")
            if not lo <= value <= hi:
                raise InvalidArgumentError(f"Limits.{name} must be between {lo} and {hi}")


@dataclass(frozen=True)
class Mount:
    """A host directory or file bound into the sandbox; read-only unless asked."""

    host_path: str
    sandbox_path: str
    read_only: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.host_path, str) or not self.host_path.startswith("/"):
            raise InvalidArgumentError("Mount.host_path must be an absolute path")
        if not isinstance(self.sandbox_path, str) or not self.sandbox_path.startswith("/"):
            raise InvalidArgumentError("Mount.sandbox_path must be an absolute path")
        if not isinstance(self.read_only, bool):
            raise InvalidArgumentError("Mount.read_only must be a bool")
        for p in (self.host_path, self.sandbox_path):
            if "\0" in p or ".." in PurePosixPath(p).parts:
                raise InvalidArgumentError("Mount paths may not contain '..' or NUL")
        sp = PurePosixPath(self.sandbox_path)
        if sp == PurePosixPath("/") or any(
            sp == PurePosixPath(r) or sp.is_relative_to(r) for r in _RESERVED
        ):
            raise InvalidArgumentError("Mount.sandbox_path may not cover a system directory")


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a driver needs to start one sandbox. Built and validated by the engine."""

    sandbox_id: str
    tier: str
    template: str = "default"
    envs: tuple[tuple[str, str], ...] = ()
    mounts: tuple[Mount, ...] = ()
    limits: Limits = field(default_factory=Limits)
    hostname: str = "sandbox"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9-]{4,64}", self.sandbox_id):
            raise InvalidArgumentError("bad sandbox id")
        for k, v in self.envs:
            check_env(k, v)

    def env(self) -> dict[str, str]:
        """The complete environment of sandboxed processes (invariant 1: nothing else)."""
        base = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": HOME,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TERM": "dumb",
            "MPLBACKEND": "Agg",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        # Numeric libraries size their thread pools by the host's CPU count, not the
        # sandbox's share; oversubscribed spinning BLAS threads crawl (and under gVisor's
        # ptrace platform all but hang). Size them to the limit; the caller may override.
        threads = str(max(1, math.ceil(self.limits.cpus)))
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            base[name] = threads
        base.update(dict(self.envs))
        return base


def check_env(key: object, value: object) -> None:
    """Validate one environment variable given by a caller."""
    if not isinstance(key, str) or not _ENV_NAME.match(key):
        raise InvalidArgumentError("environment variable names must match [A-Za-z_][A-Za-z0-9_]*")
    if not isinstance(value, str):
        raise InvalidArgumentError(f"environment variable {key} must be a string")
    if "\0" in value or len(value) > 128 * 1024:
        raise InvalidArgumentError(f"environment variable {key} is too long or contains NUL")
