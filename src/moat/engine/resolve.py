"""The one resolver: caller input (keyword arguments, a profile, a dict from JSON) ->
``SandboxConfig``, with defaults, profiles and validation in one place for every face.

Trust domain: host engine. Caller input is validated here (and again, in depth, for a config
that arrives already built, e.g. from a wire): host patterns and guard detectors are parsed
by the egress and guard packages, so a config that passes names nothing moat can't enforce
(invariant 7).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moat.egress import NetworkPolicy, Secret
from moat.egress.policy import HostPattern
from moat.engine import templating
from moat.errors import InvalidArgumentError, PolicyError
from moat.guard import GuardPolicy
from moat.model import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    DEFAULT_TRUST,
    GuardConfig,
    Limits,
    NetworkConfig,
    SandboxConfig,
    SecretRef,
    choose_tier,
)
from moat.model import validate as v
from moat.model.config import MAX_OUTPUT_LIMIT
from moat.model.config import mounts as parse_mounts  # `mounts` is a parameter below
from moat.model.tiers import TIERS, TRUST_LEVELS
from moat.profiles import resolve_profile

__all__ = [
    "guard_config",
    "guard_policy",
    "network_config",
    "network_policy",
    "resolve",
    "secret_refs",
    "sensitive_values",
    "validate_config",
]


def resolve(
    *,
    template: str = "default",
    isolation: str | None = None,
    trust: str | None = None,
    timeout: float | None = None,
    envs: Mapping[str, str] | None = None,
    mounts: Any = None,
    limits: Limits | Mapping[str, Any] | None = None,
    network: NetworkPolicy | Mapping[str, Any] | None = None,
    secrets: Mapping[str, Secret] | None = None,
    metadata: Mapping[str, str] | None = None,
    allow_internet_access: bool = False,
    guard: GuardPolicy | Mapping[str, Any] | None = None,
    profile: str | None = None,
    policy_file: str | None = None,
    max_output_bytes: int | None = None,
    on_timeout: str = "kill",
    idle_timeout: float | None = None,
) -> SandboxConfig:
    """The config of a new sandbox. A ``profile``'s settings apply where the caller gives none
    (docs/profiles.md); without one: trust "untrusted", 300 s, 4 MiB of output per call."""
    if profile is not None:
        chosen = resolve_profile(profile, policy_file)
        given = {
            "trust": trust,
            "isolation": isolation,
            "timeout": timeout,
            "limits": limits,
            "network": network,
            "guard": guard,
            "envs": envs,
        }
        kw = chosen.create_kwargs(given)
        trust, isolation, timeout = kw.get("trust"), kw.get("isolation"), kw.get("timeout")
        limits, network, guard = kw.get("limits"), kw.get("network"), kw.get("guard")
        envs = kw.get("envs")
    trust = DEFAULT_TRUST if trust is None else trust
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    v.template_name(template)
    templating.require(template)  # a default not built: a clear error, never `host` (inv. 7)
    v.choice("trust", trust, TRUST_LEVELS)
    if isolation is not None:
        v.choice("isolation", isolation, TIERS)
    v.number("timeout", timeout, 1, v.MAX_TIMEOUT)
    if not isinstance(allow_internet_access, bool):
        raise InvalidArgumentError("allow_internet_access must be a bool")
    net = network_config(network)
    if allow_internet_access:
        net = NetworkConfig(net.allow_out, net.deny_out, True, net.allow_tcp)
    return SandboxConfig(
        tier=choose_tier(isolation, trust),
        trust=trust,
        template=template,
        timeout=float(timeout),
        envs=tuple(sorted(v.envs(envs).items())),
        mounts=parse_mounts(mounts),
        limits=Limits.parse(limits),
        network=net,
        guard=guard_config(guard),
        secrets=secret_refs(secrets),
        metadata=tuple(sorted(v.metadata(metadata).items())),
        max_output_bytes=DEFAULT_MAX_OUTPUT
        if max_output_bytes is None
        else int(v.number("max_output_bytes", max_output_bytes, 1024, MAX_OUTPUT_LIMIT)),
        on_timeout=on_timeout,
        idle_timeout=None
        if idle_timeout is None
        else v.number("idle_timeout", idle_timeout, 1, v.MAX_TIMEOUT),
    )


def network_config(value: NetworkPolicy | Mapping[str, Any] | None) -> NetworkConfig:
    """A network policy (object or dict) checked by the gateway's parser, as data."""
    d = NetworkPolicy.parse(value).to_dict()
    return NetworkConfig(
        tuple(d["allow_out"]), tuple(d["deny_out"]), d["internet_access"], tuple(d["allow_tcp"])
    )


def network_policy(config: NetworkConfig) -> NetworkPolicy:
    return NetworkPolicy(
        config.allow_out, config.deny_out, config.internet_access, config.allow_tcp
    )


def guard_policy(value: GuardPolicy | GuardConfig | Mapping[str, Any] | None) -> GuardPolicy:
    """Accept a GuardPolicy, a GuardConfig, a dict of its fields, or None (redact)."""
    if value is None:
        return GuardPolicy()
    if isinstance(value, GuardPolicy):
        return value
    if isinstance(value, GuardConfig):
        if value.detectors is None:
            return GuardPolicy(mode=value.mode, allow=value.allow)  # type: ignore[arg-type]
        return GuardPolicy(
            mode=value.mode,  # type: ignore[arg-type]
            detectors=value.detectors,
            allow=value.allow,
        )
    if isinstance(value, Mapping):
        try:
            return GuardPolicy(**value)
        except TypeError as exc:
            raise InvalidArgumentError("guard has an unknown field") from exc
    raise InvalidArgumentError("guard must be a moat.GuardPolicy or a dict")


def guard_config(value: GuardPolicy | Mapping[str, Any] | None) -> GuardConfig:
    """The guard policy as data; detectors are kept only when the caller chose them."""
    given_detectors = isinstance(value, Mapping) and "detectors" in value
    policy = guard_policy(value)
    default = GuardPolicy()
    detectors = policy.detectors
    keep = given_detectors or (isinstance(value, GuardPolicy) and detectors != default.detectors)
    return GuardConfig(policy.mode, detectors if keep else None, policy.allow)


def secret_refs(secrets: Mapping[str, Secret] | None) -> tuple[SecretRef, ...]:
    if secrets is None:
        return ()
    if not isinstance(secrets, Mapping) or not all(isinstance(x, Secret) for x in secrets.values()):
        raise InvalidArgumentError("secrets must map variable names to moat.Secret")
    return tuple(
        SecretRef(name, s.hosts, s.header, s.template) for name, s in sorted(secrets.items())
    )


def secrets_of(config: SandboxConfig, values: Mapping[str, str]) -> dict[str, Secret]:
    """The brokered secrets of ``config``: each reference joined with its value (checked)."""
    if set(values) != {r.name for r in config.secrets}:
        raise InvalidArgumentError("secret values must match the config's secrets one to one")
    return {r.name: Secret(values[r.name], r.hosts, r.header, r.template) for r in config.secrets}


def sensitive_values(value: Any) -> dict[str, str]:
    """``sensitive=``: a list of values, or a dict of value -> label."""
    if value is None:
        return {}
    if isinstance(value, dict):
        items = value
    elif isinstance(value, (list, tuple)):
        items = {x: "SENSITIVE" for x in value}
    else:
        raise InvalidArgumentError("sensitive must be a list of str or a dict of value to label")
    if not all(isinstance(k, str) and isinstance(x, str) for k, x in items.items()):
        raise InvalidArgumentError("sensitive must be a list of str or a dict of value to label")
    return dict(items)


def validate_config(config: Any) -> SandboxConfig:
    """A config from elsewhere (a wire, a store), checked in depth: policies parse here."""
    if isinstance(config, Mapping):
        config = SandboxConfig.from_dict(config)
    if not isinstance(config, SandboxConfig):
        raise InvalidArgumentError("config must be a SandboxConfig")
    _no_secret_over_raw_tcp(config, network_policy(config.network))
    guard_policy(config.guard)
    return config


def _no_secret_over_raw_tcp(config: SandboxConfig, policy: NetworkPolicy) -> None:
    """Refuse a secret bound to a host the sandbox reaches only over raw TCP (issue 15): an
    opaque stream carries no brokered credential, so the binding could never be honoured."""
    for ref in config.secrets:
        for raw in ref.hosts:
            bound = HostPattern.parse(raw)
            probe = bound.host if not bound.wildcard else "x." + bound.host
            http = policy.internet_access or any(p.matches_host(probe) for p in policy.allow_out)
            if not http and any(p.matches_host(probe) for p in policy.allow_tcp):
                raise PolicyError(
                    f"secret {ref.name!r} is bound to {raw[:80]!r}, which this sandbox reaches "
                    "only over raw TCP (allow_tcp): brokered secrets travel over HTTP(S) only"
                )
