"""moat's model floor: pure data shared by every face (caller, engine, server, store, tools).

Trust domain: none of its own. Stdlib only, no I/O, and it imports nothing privileged
(``python -c "import moat.model"`` loads no runtime, egress, guard or engine module; a test
checks). Results, the sandbox configuration, tiers and trust levels, the sandbox contract
constants and the events a call streams live here; everything serialises to and from JSON
with validation (``to_dict``/``from_dict``).
"""

from moat.model import codec, validate
from moat.model.config import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    GuardConfig,
    Limits,
    Mount,
    NetworkConfig,
    SandboxConfig,
    SecretRef,
)
from moat.model.events import (
    FILESYSTEM_EVENT_TYPES,
    End,
    ErrorEvent,
    Event,
    FilesystemEvent,
    FilesystemEventType,
    Output,
    PtyOutput,
    PtySize,
    ResultEvent,
    Started,
)
from moat.model.results import (
    FORMATS,
    RESULT_KEYS,
    CommandResult,
    Context,
    EntryInfo,
    Execution,
    ExecutionError,
    Logs,
    ProcessInfo,
    Result,
    SandboxInfo,
    SandboxMetrics,
    SnapshotInfo,
)
from moat.model.tiers import (
    DEFAULT_TRUST,
    GUARD_MODES,
    LANGUAGES,
    TIERS,
    TRUST_LEVELS,
    TRUST_TO_TIER,
    choose_tier,
)
from moat.protocol.contract import (
    AGENT_DIR,
    CA_BUNDLE_PATH,
    HOME,
    PROXY_PORT,
    SANDBOX_GID,
    SANDBOX_UID,
    USERS,
)

__all__ = [
    "AGENT_DIR",
    "CA_BUNDLE_PATH",
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TRUST",
    "FILESYSTEM_EVENT_TYPES",
    "FORMATS",
    "GUARD_MODES",
    "HOME",
    "LANGUAGES",
    "PROXY_PORT",
    "RESULT_KEYS",
    "SANDBOX_GID",
    "SANDBOX_UID",
    "TIERS",
    "TRUST_LEVELS",
    "TRUST_TO_TIER",
    "USERS",
    "CommandResult",
    "Context",
    "End",
    "EntryInfo",
    "ErrorEvent",
    "Event",
    "Execution",
    "ExecutionError",
    "FilesystemEvent",
    "FilesystemEventType",
    "GuardConfig",
    "Limits",
    "Logs",
    "Mount",
    "NetworkConfig",
    "Output",
    "ProcessInfo",
    "PtyOutput",
    "PtySize",
    "Result",
    "ResultEvent",
    "SandboxConfig",
    "SandboxInfo",
    "SandboxMetrics",
    "SecretRef",
    "SnapshotInfo",
    "Started",
    "choose_tier",
    "codec",
    "validate",
]
