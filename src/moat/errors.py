"""The one exception tree of moat.

::

    SandboxError                      base of everything moat raises
    ├── TimeoutError                  a call or the sandbox's lifetime ran out
    ├── NotFoundError                 no such sandbox, context, process or file
    ├── IsolationUnavailableError     the asked-for tier can't run on this host (never downgraded)
    ├── PolicyError                   a policy can't be enforced or isn't supported
    ├── QuotaExceededError            the tenant is at a quota (carries retry_after seconds)
    ├── InvalidArgumentError          bad input at an SDK / API boundary
    ├── DiskFullError                 the sandbox's disk (or its inodes) ran out during a write
    ├── CommandExitError              a command exited non-zero (carries exit_code, stdout, stderr)
    ├── SandboxDiedError              the sandbox or its agent died or broke the protocol
    │   └── SandboxLostError          its cluster node was lost (never re-created elsewhere)
    ├── LeakBlockedError              the guard blocked output in "block" mode (carries no content)
    ├── AuditUnavailableError         the audit store can't record: no new sandbox starts
    ├── PortNotOpenError              ingress: nothing listens on that port in the sandbox
    ├── CapacityError                 a cluster had no room for the sandbox within the wait
    ├── AuthenticationError           a server refused the API key (missing, unknown, revoked)
    └── TemplateBuildError            a template build step failed (carries step, exit code, tail)

    InvalidArgumentError
    ├── TemplateDefinitionError       a template definition is invalid (carries field and line)
    └── TemplateNotBuiltError         a default template is not built here (carries the command)

Messages are safe to show a model (DESIGN invariant 8): no host paths, host user names or
host tracebacks. Foreign exceptions are translated where they are caught with
``raise Ours(...) from exc``; the cause stays available to the caller's own logs but the
message never repeats it.
"""

from __future__ import annotations

import builtins

__all__ = [
    "AuditUnavailableError",
    "AuthenticationError",
    "CapacityError",
    "CommandExitError",
    "DiskFullError",
    "InvalidArgumentError",
    "IsolationUnavailableError",
    "LeakBlockedError",
    "NotFoundError",
    "PolicyError",
    "PortNotOpenError",
    "QuotaExceededError",
    "SandboxDiedError",
    "SandboxError",
    "SandboxLostError",
    "TemplateBuildError",
    "TemplateDefinitionError",
    "TemplateNotBuiltError",
    "TimeoutError",
]


class SandboxError(Exception):
    """Base class of every error moat raises."""


class TimeoutError(SandboxError, builtins.TimeoutError):
    """A call or the sandbox's lifetime ran out.

    ``context_restarted`` is True when a timed-out ``run_code`` could not be interrupted and
    its code context was restarted (its state is gone).
    """

    def __init__(self, message: str, *, context_restarted: bool = False) -> None:
        super().__init__(message)
        self.context_restarted = context_restarted


class NotFoundError(SandboxError):
    """No such sandbox, code context, process or file."""


class IsolationUnavailableError(SandboxError):
    """The requested isolation tier cannot run on this host; moat never downgrades silently."""


class PolicyError(SandboxError):
    """A policy (network, secrets, limits, mounts) is invalid, unsupported or unenforceable."""


class QuotaExceededError(SandboxError):
    """The tenant is at one of its quotas (running sandboxes, memory, CPUs, creates per
    minute; invariant 11). ``retry_after``: seconds after which the same request may pass
    (None when nothing but the tenant's own action frees room)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidArgumentError(SandboxError, ValueError):
    """Bad input at a boundary: wrong type, out of range, too large."""


class DiskFullError(SandboxError):
    """A write ran out of space in the sandbox (its disk limit, or its inodes)."""


class CommandExitError(SandboxError):
    """A command exited with a non-zero status."""

    def __init__(self, exit_code: int, stdout: str, stderr: str, error: str | None = None) -> None:
        super().__init__(f"command exited with code {exit_code}")
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.error = error


class SandboxDiedError(SandboxError):
    """The sandbox ended unexpectedly, or its agent broke the protocol or went silent."""


class SandboxLostError(SandboxDiedError):
    """The cluster node hosting the sandbox was lost: the sandbox is gone with it and is never
    re-created elsewhere. The message carries "was not found", which E2B's SDKs key on (a
    502 over the wire: ``SandboxNotRunningException``)."""


class LeakBlockedError(SandboxError):
    """The guard found sensitive data in output and its policy is "block".

    Carries the labels of the findings and the channel, never the content.
    """

    def __init__(self, labels: list[str], channel: str) -> None:
        super().__init__(
            f"output blocked by the guard on {channel}: {', '.join(sorted(set(labels)))}"
        )
        self.labels = labels
        self.channel = channel


class AuditUnavailableError(SandboxError):
    """The audit store can't record (corrupt, or its files were replaced or removed while in
    use): moat refuses to start sandboxes rather than run them unaudited (invariant 7). The
    operator's fix is in the host log and docs/audit.md; the message names no host path."""


class PortNotOpenError(SandboxError):
    """Ingress to a port inside the sandbox that nothing listens on. The message carries
    "port is not open", which E2B's SDKs key on (``SandboxUnreachableException``)."""

    def __init__(self, port: int) -> None:
        super().__init__(f"The sandbox is running but port is not open (port {port})")
        self.port = port


class CapacityError(SandboxError):
    """No node of the cluster had room for the sandbox within the bounded wait (HTTP 503,
    with a Retry-After). ``retry_after``: seconds after which trying again is reasonable."""

    def __init__(self, message: str, *, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AuthenticationError(SandboxError):
    """A ``moat serve`` refused the caller's API key (missing, unknown or revoked): HTTP 401."""


class TemplateDefinitionError(InvalidArgumentError):
    """A template definition (TOML, Dockerfile, builder) is invalid. ``field`` names the
    setting, ``line`` the line of the file when known; both are in the message too."""

    def __init__(self, message: str, *, field: str | None = None, line: int | None = None) -> None:
        where = " ".join(p for p in (f"line {line}" if line else "", field or "") if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.field = field
        self.line = line


class TemplateNotBuiltError(InvalidArgumentError):
    """A default template (``base``, ``code-interpreter``, or the configured default) is not
    built on this host. ``template`` names it, ``command`` is what builds it; moat never runs
    such a sandbox on the host's ``/usr`` instead (DESIGN invariants 1 and 7)."""

    def __init__(self, template: str, command: str) -> None:
        super().__init__(f"template {template!r} is not built on this host: run `{command}` first")
        self.template = template
        self.command = command


class TemplateBuildError(SandboxError):
    """A template build step failed. ``step`` describes it (``"3/5 apt: jq"``), ``exit_code``
    is its status (None when it did not exit: a size cap, a timeout), ``output`` the tail of
    what it printed (it ran in a sandbox: its output is the build's own, shown to the caller
    who asked for the build)."""

    def __init__(self, step: str, message: str, exit_code: int | None = None, output: str = ""):
        super().__init__(f"template build step {step} failed: {message}")
        self.step = step
        self.exit_code = exit_code
        self.output = output
