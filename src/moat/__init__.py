"""moat: self-hosted sandboxes in which AI agents run the code they write.

Public names are loaded lazily (PEP 562) so that the in-sandbox agent, which imports
``moat.agent`` and ``moat.protocol`` under a bare system Python, never pulls host-side code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the type checker sees the real names; runtime loads them lazily
    from moat.egress import (
        GatewayConfig,
        NetworkPolicy,
        Secret,
    )
    from moat.errors import (
        AuditUnavailableError,
        CommandExitError,
        InvalidArgumentError,
        IsolationUnavailableError,
        LeakBlockedError,
        NotFoundError,
        PolicyError,
        QuotaExceededError,
        SandboxDiedError,
        SandboxError,
        TimeoutError,
    )
    from moat.guard import (
        GuardPolicy,
    )
    from moat.model import (
        CommandResult,
        Context,
        EntryInfo,
        Execution,
        ExecutionError,
        Limits,
        Logs,
        Mount,
        ProcessInfo,
        Result,
        SandboxConfig,
        SandboxInfo,
    )
    from moat.sdk.async_ import (
        AsyncCommandHandle,
        AsyncSandbox,
    )
    from moat.sdk.sync import (
        CommandHandle,
        Sandbox,
    )

__version__ = "0.1.0"

_EXPORTS = {
    "Sandbox": "moat.sdk.sync",
    "AsyncSandbox": "moat.sdk.async_",
    "Execution": "moat.model",
    "Result": "moat.model",
    "Logs": "moat.model",
    "ExecutionError": "moat.model",
    "CommandResult": "moat.model",
    "CommandHandle": "moat.sdk.sync",
    "AsyncCommandHandle": "moat.sdk.async_",
    "EntryInfo": "moat.model",
    "SandboxInfo": "moat.model",
    "Context": "moat.model",
    "ProcessInfo": "moat.model",
    "Limits": "moat.model",
    "Mount": "moat.model",
    "SandboxConfig": "moat.model",
    "NetworkPolicy": "moat.egress",
    "Secret": "moat.egress",
    "GatewayConfig": "moat.egress",
    "GuardPolicy": "moat.guard",
    "SandboxError": "moat.errors",
    "TimeoutError": "moat.errors",
    "NotFoundError": "moat.errors",
    "IsolationUnavailableError": "moat.errors",
    "PolicyError": "moat.errors",
    "QuotaExceededError": "moat.errors",
    "InvalidArgumentError": "moat.errors",
    "CommandExitError": "moat.errors",
    "SandboxDiedError": "moat.errors",
    "LeakBlockedError": "moat.errors",
    "AuditUnavailableError": "moat.errors",
}

__all__ = [  # the same names as _EXPORTS (tests/test_layering.py checks it)
    "AsyncCommandHandle",
    "AsyncSandbox",
    "AuditUnavailableError",
    "CommandExitError",
    "CommandHandle",
    "CommandResult",
    "Context",
    "EntryInfo",
    "Execution",
    "ExecutionError",
    "GatewayConfig",
    "GuardPolicy",
    "InvalidArgumentError",
    "IsolationUnavailableError",
    "LeakBlockedError",
    "Limits",
    "Logs",
    "Mount",
    "NetworkPolicy",
    "NotFoundError",
    "PolicyError",
    "ProcessInfo",
    "QuotaExceededError",
    "Result",
    "Sandbox",
    "SandboxConfig",
    "SandboxDiedError",
    "SandboxError",
    "SandboxInfo",
    "Secret",
    "TimeoutError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moat' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
