"""moat: self-hosted sandboxes in which AI agents run the code they write.

Public names are loaded lazily (PEP 562) so that the in-sandbox agent, which imports
``moat.agent`` and ``moat.protocol`` under a bare system Python, never pulls host-side code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Sandbox": "moat.sdk.sync",
    "AsyncSandbox": "moat.sdk.async_",
    "Execution": "moat.sdk.models",
    "Result": "moat.sdk.models",
    "Logs": "moat.sdk.models",
    "ExecutionError": "moat.sdk.models",
    "CommandResult": "moat.sdk.models",
    "CommandHandle": "moat.sdk.sync",
    "AsyncCommandHandle": "moat.sdk.async_",
    "EntryInfo": "moat.sdk.models",
    "SandboxInfo": "moat.sdk.models",
    "Context": "moat.sdk.models",
    "ProcessInfo": "moat.sdk.models",
    "Limits": "moat.runtime.spec",
    "Mount": "moat.runtime.spec",
    "SandboxError": "moat.errors",
    "TimeoutError": "moat.errors",
    "NotFoundError": "moat.errors",
    "IsolationUnavailableError": "moat.errors",
    "PolicyError": "moat.errors",
    "InvalidArgumentError": "moat.errors",
    "CommandExitError": "moat.errors",
    "SandboxDiedError": "moat.errors",
    "LeakBlockedError": "moat.errors",
    "AuditUnavailableError": "moat.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moat' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
