"""Argument checks at the SDK boundary: wrong input gets InvalidArgumentError, early."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from moat.errors import InvalidArgumentError
from moat.runtime.spec import Limits, Mount, check_env

#: Largest code string or command accepted (the protocol frame limit, less headroom).
MAX_CODE = 512 * 1024
MAX_PATH = 4096


def number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidArgumentError(f"{name} must be a number")
    if not lo <= value <= hi:
        raise InvalidArgumentError(f"{name} must be between {lo:g} and {hi:g}")
    return float(value)


def text(name: str, value: Any, max_len: int = MAX_CODE) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name} must be a str")
    if len(value) > max_len or len(value.encode("utf-8", "surrogatepass")) > max_len:
        raise InvalidArgumentError(f"{name} is too large (max {max_len} bytes)")
    if "\0" in value:
        raise InvalidArgumentError(f"{name} may not contain NUL characters")
    return value


def path(value: Any) -> str:
    p = text("path", value, MAX_PATH)
    if not p:
        raise InvalidArgumentError("path may not be empty")
    return p


def envs(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgumentError("envs must be a dict of str to str")
    if len(value) > 256:
        raise InvalidArgumentError("too many environment variables (max 256)")
    for k, v in value.items():
        check_env(k, v)
    return dict(value)


def metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and len(k) < 256 and len(v) < 4096
        for k, v in value.items()
    ):
        raise InvalidArgumentError("metadata must be a dict of short str to str")
    return dict(value)


def mounts(value: Any) -> tuple[Mount, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, Mount) for m in value):
        raise InvalidArgumentError("mounts must be a list of moat.Mount")
    targets = [m.sandbox_path for m in value]
    if len(set(targets)) != len(targets):
        raise InvalidArgumentError("two mounts share a sandbox path")
    return tuple(value)


def limits(value: Any) -> Limits:
    if value is None:
        return Limits()
    if isinstance(value, Limits):
        return value
    if isinstance(value, Mapping):
        try:
            return Limits(**value)
        except TypeError as exc:
            raise InvalidArgumentError("limits has an unknown field") from exc
    raise InvalidArgumentError("limits must be a moat.Limits or a dict")


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(allowed)}")
    return str(value)


def callback(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise InvalidArgumentError(f"{name} must be callable")
    return value
