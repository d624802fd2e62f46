"""The validated, frozen description of one sandbox that every runtime driver consumes.

Limits, Mount and the contract constants live in ``moat.model``; re-exported here for the drivers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from moat.errors import InvalidArgumentError
from moat.model.config import Limits, Mount
from moat.model.validate import check_env
from moat.protocol.contract import AGENT_DIR, HOME, PROXY_PORT, SANDBOX_GID, SANDBOX_UID

__all__ = [
    "AGENT_DIR",
    "HOME",
    "SANDBOX_GID",
    "SANDBOX_UID",
    "SSH_CONFIG",
    "Limits",
    "Mount",
    "SandboxSpec",
    "check_env",
]


#: The sandbox's ``/etc/ssh/ssh_config`` on every tier: ``ssh`` (and git over SSH, which runs
#: it) reaches other hosts through the egress gateway's raw TCP endpoint, which opens a host
#: and port only for an ``allow_tcp`` entry (issue 15). The user's own ``~/.ssh/config`` or
#: ``-o ProxyCommand=`` still win (ssh takes the first value it finds).
SSH_CONFIG = (
    "# moat: ssh goes through the sandbox's egress gateway (allow_tcp opens host:port)\n"
    "Host * !localhost !127.0.0.1 !::1\n"
    f"    ProxyCommand /usr/bin/python3 -I {AGENT_DIR}/moat/agent/tcpconnect.py %h %p"
    f" {PROXY_PORT}\n"
)


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
    #: host path of the template's root filesystem (issue 12), or None: the host's /usr
    rootfs: str | None = None
    #: the template's id (its root's cache key on the microVM tier); "" with no rootfs
    template_id: str = ""
    #: where commands and code run by default (the template's working directory)
    workdir: str = HOME

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9-]{4,64}", self.sandbox_id):
            raise InvalidArgumentError("bad sandbox id")
        if self.rootfs is not None and (
            not self.rootfs.startswith("/") or not re.fullmatch(r"[0-9a-f]{64}", self.template_id)
        ):
            raise InvalidArgumentError("bad template root")
        if not self.workdir.startswith("/") or "\0" in self.workdir:
            raise InvalidArgumentError("bad working directory")
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
