"""Checks of caller input shared by every face: wrong input gets InvalidArgumentError, early.

Limits, environments, metadata and timeouts are checked here and nowhere else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from moat.errors import InvalidArgumentError
from moat.protocol import metadata as _file_meta

#: Largest code string or command accepted (the protocol frame limit, less headroom).
MAX_CODE = 512 * 1024
MAX_PATH = 4096
MAX_ENVS = 256
MAX_TIMEOUT = 86400.0

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: A template's name or id (moat.templates.ref holds the same rules, above the model)
_TEMPLATE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}|[0-9a-f]{64}")
_SANDBOX_ID = re.compile(r"[a-z0-9-]{4,64}")


def number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidArgumentError(f"{name} must be a number")
    if not lo <= value <= hi:
        raise InvalidArgumentError(f"{name} must be between {lo:g} and {hi:g}")
    return float(value)


def integer(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an integer")
    if not lo <= value <= hi:
        raise InvalidArgumentError(f"{name} must be between {lo} and {hi}")
    return value


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


def check_env(key: object, value: object) -> None:
    """Validate one environment variable given by a caller."""
    if not isinstance(key, str) or not _ENV_NAME.match(key):
        raise InvalidArgumentError("environment variable names must match [A-Za-z_][A-Za-z0-9_]*")
    if not isinstance(value, str):
        raise InvalidArgumentError(f"environment variable {key} must be a string")
    if "\0" in value or len(value) > 128 * 1024:
        raise InvalidArgumentError(f"environment variable {key} is too long or contains NUL")


def template_name(value: Any) -> str:
    """A template name or id (``default``, ``host`` or a built template's)."""
    if not isinstance(value, str) or not _TEMPLATE.fullmatch(value):
        raise InvalidArgumentError("bad template name")
    return value


def envs(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgumentError("envs must be a dict of str to str")
    if len(value) > MAX_ENVS:
        raise InvalidArgumentError(f"too many environment variables (max {MAX_ENVS})")
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


def file_metadata(value: Any) -> dict[str, str]:
    """A file's user metadata (``user.e2b.<key>`` attributes): printable ASCII, keys of at
    most 246 bytes, 4 KiB in all (``moat.protocol.metadata``, the agent's own rule)."""
    if isinstance(value, Mapping):
        value = dict(value)
    problem = _file_meta.problem(value)
    if problem is not None:
        raise InvalidArgumentError(f"invalid file metadata: {problem}")
    return dict(value)


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(allowed)}")
    return str(value)


def callback(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise InvalidArgumentError(f"{name} must be callable")
    return value


def timeout(name: str, value: Any, lo: float = 0.001) -> float:
    return number(name, value, lo, MAX_TIMEOUT)


def sandbox_id(value: Any) -> str | None:
    """The id if it has the shape of one, else None (the caller answers NotFoundError)."""
    if isinstance(value, str) and _SANDBOX_ID.fullmatch(value):
        return value
    return None


def context_id(value: Any) -> str:
    if isinstance(value, str) and 0 < len(value) <= 64 and value.isalnum():
        return value
    raise InvalidArgumentError("context must be a Context, a context id or None")


def pid(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError("pid must be an int")
    return value
