"""What a sandbox is created with: limits, mounts, policies, and the frozen ``SandboxConfig``.

Pure data. A ``SandboxConfig`` holds secrets by reference (variable name, hosts, header,
template), never their values, so it can be stored and sent over a wire; the values travel
beside it, to the front door only (DESIGN invariant 3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from moat.errors import InvalidArgumentError
from moat.model import codec
from moat.model import validate as v
from moat.model.tiers import GUARD_MODES, TIERS, TRUST_LEVELS
from moat.protocol.contract import AGENT_DIR

#: Paths a Mount may not cover inside the sandbox: they hold moat's own machinery.
_RESERVED = ("/proc", "/dev", "/sys", AGENT_DIR, "/usr", "/etc", "/bin", "/lib", "/lib64", "/sbin")
#: Default per-call cap on what one call may print, kept by the host.
DEFAULT_MAX_OUTPUT = 4 * 1024 * 1024
MAX_OUTPUT_LIMIT = 256 * 1024 * 1024
DEFAULT_TIMEOUT = 300.0
#: What a sandbox's timeout does (``SandboxConfig.on_timeout``).
ON_TIMEOUT = ("kill", "pause")


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

    @classmethod
    def parse(cls, value: Limits | Mapping[str, Any] | None) -> Limits:
        """Accept Limits, a dict of its fields, or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, Limits):
            return value
        if isinstance(value, Mapping):
            try:
                return cls(**value)
            except TypeError as exc:
                raise InvalidArgumentError("limits has an unknown field") from exc
        raise InvalidArgumentError("limits must be a moat.Limits or a dict")


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


def mounts(value: Any) -> tuple[Mount, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, Mount) for m in value):
        raise InvalidArgumentError("mounts must be a list of moat.Mount")
    targets = [m.sandbox_path for m in value]
    if len(set(targets)) != len(targets):
        raise InvalidArgumentError("two mounts share a sandbox path")
    return tuple(value)


def _strings(name: str, value: Any, most: int = 1000) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InvalidArgumentError(f"{name} must be a list of strings")
    if len(value) > most or not all(isinstance(x, str) and 0 < len(x) <= 4096 for x in value):
        raise InvalidArgumentError(f"{name} must be a list of at most {most} short strings")
    return tuple(value)


@dataclass(frozen=True)
class NetworkConfig:
    """The egress policy as data (``moat.NetworkPolicy.to_dict()``): host patterns as text.

    Host patterns are parsed and checked by the egress gateway when the front door resolves
    a config; here they are only shaped.
    """

    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()
    internet_access: bool = False
    #: raw TCP destinations, ``host:port`` (issue 15)
    allow_tcp: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow_out", _strings("allow_out", self.allow_out))
        object.__setattr__(self, "deny_out", _strings("deny_out", self.deny_out))
        object.__setattr__(self, "allow_tcp", _strings("allow_tcp", self.allow_tcp))
        if not isinstance(self.internet_access, bool):
            raise InvalidArgumentError("internet_access must be a bool")


@dataclass(frozen=True)
class GuardConfig:
    """The guard policy as data (``moat.GuardPolicy``'s fields); ``detectors=None``: default."""

    mode: str = "redact"
    detectors: tuple[str, ...] | None = None
    allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        v.choice("guard mode", self.mode, GUARD_MODES)
        if self.detectors is not None:
            object.__setattr__(self, "detectors", _strings("detectors", self.detectors, 256))
        object.__setattr__(self, "allow", _strings("allow", self.allow))


@dataclass(frozen=True)
class SecretRef:
    """A brokered secret by reference: where its placeholder goes and where it may be used.

    ``name`` is the environment variable holding the placeholder; the value is given to the
    front door beside the config (``secret_values[name]``), never stored in it.
    """

    name: str
    hosts: tuple[str, ...]
    header: str | None = "Authorization"
    template: str = "{value}"

    def __post_init__(self) -> None:
        v.check_env(self.name, "")
        object.__setattr__(self, "hosts", _strings("secret hosts", self.hosts, 64))
        if self.header is not None and not isinstance(self.header, str):
            raise InvalidArgumentError("secret header must be a header name")
        if not isinstance(self.template, str):
            raise InvalidArgumentError("secret template must be a string")


@dataclass(frozen=True)
class SandboxConfig:
    """Everything one sandbox is created with, resolved (defaults and profile applied).

    Built by the resolver (``moat.engine.resolve``) from caller input of any face; checked
    again in depth by the front door when it comes from a wire.
    """

    tier: str
    trust: str = "untrusted"
    template: str = "default"
    timeout: float = DEFAULT_TIMEOUT
    envs: tuple[tuple[str, str], ...] = ()
    mounts: tuple[Mount, ...] = ()
    limits: Limits = field(default_factory=Limits)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    secrets: tuple[SecretRef, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()
    max_output_bytes: int = DEFAULT_MAX_OUTPUT
    #: what the end of its lifetime (or idle time) does: "kill", or "pause" (issue 11)
    on_timeout: str = "kill"
    #: seconds without a call, output or traffic after which ``on_timeout`` applies; None: never
    idle_timeout: float | None = None

    def __post_init__(self) -> None:
        v.choice("isolation", self.tier, TIERS)
        v.choice("trust", self.trust, TRUST_LEVELS)
        v.template_name(self.template)
        v.number("timeout", self.timeout, 1, v.MAX_TIMEOUT)
        env = v.envs(dict(self.envs))
        object.__setattr__(self, "envs", tuple(sorted(env.items())))
        object.__setattr__(self, "mounts", mounts(self.mounts))
        for name, kind in (("limits", Limits), ("network", NetworkConfig), ("guard", GuardConfig)):
            if not isinstance(getattr(self, name), kind):
                raise InvalidArgumentError(f"{name} must be a {kind.__name__}")
        if not isinstance(self.secrets, tuple) or not all(
            isinstance(s, SecretRef) for s in self.secrets
        ):
            raise InvalidArgumentError("secrets must be SecretRefs")
        if len({s.name for s in self.secrets}) != len(self.secrets):
            raise InvalidArgumentError("two secrets share a variable name")
        meta = v.metadata(dict(self.metadata))
        object.__setattr__(self, "metadata", tuple(sorted(meta.items())))
        v.integer("max_output_bytes", self.max_output_bytes, 1024, MAX_OUTPUT_LIMIT)
        v.choice("on_timeout", self.on_timeout, ON_TIMEOUT)
        if self.idle_timeout is not None:
            v.number("idle_timeout", self.idle_timeout, 1, v.MAX_TIMEOUT)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = codec.to_dict(self)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SandboxConfig:
        return codec.from_dict(cls, data)
