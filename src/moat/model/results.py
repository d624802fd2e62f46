"""Result types, in the shapes E2B users know (Execution, Result, Logs, ExecutionError...).

Pure data; ``to_dict``/``from_dict`` (``moat.model.codec``) carry them over a wire.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from moat.model import codec
from moat.model.config import Limits

#: Result formats in the order they are reported by ``Result.formats()``.
FORMATS = ("text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "json", "javascript")
#: Every key a result's data may have (the formats, free-form ``data``, a figure's ``chart``).
RESULT_KEYS = frozenset((*FORMATS, "data", "chart"))

_T = TypeVar("_T", bound="_Wire")


class _Wire:
    """JSON round trip for a model dataclass."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = codec.to_dict(self)
        return out

    @classmethod
    def from_dict(cls: type[_T], data: Mapping[str, Any]) -> _T:
        return codec.from_dict(cls, data)


@dataclass
class Result(_Wire):
    """One displayed value: the trailing expression of a cell, or a figure shown."""

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None  # base64
    jpeg: str | None = None  # base64
    pdf: str | None = None  # base64
    latex: str | None = None
    json: Any = None
    javascript: str | None = None
    data: dict[str, Any] | None = None
    #: a matplotlib figure's data in E2B's chart shape (``type``: line, scatter, bar, pie,
    #: box_and_whisker, superchart or unknown; title, axes, ``elements``): plain JSON
    chart: dict[str, Any] | None = None
    is_main_result: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def formats(self) -> list[str]:
        """Names of the formats this result has (besides ``text``, which is always first)."""
        out = [f for f in FORMATS if getattr(self, f) is not None]
        if self.data is not None:
            out.append("data")
        if self.chart is not None:
            out.append("chart")
        out.extend(self.extra)
        return out

    def __str__(self) -> str:
        return self.text or ""


@dataclass
class Logs(_Wire):
    """Output of a call, chunk by chunk as it was printed."""

    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class ExecutionError(_Wire):
    """An exception raised by user code (reported, not raised, by ``run_code``)."""

    name: str
    value: str
    traceback: str


@dataclass
class Execution(_Wire):
    """Everything one ``run_code`` produced."""

    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None
    #: True if output exceeded the per-call cap and was cut (the cut is also noted in stderr)
    truncated: bool = False

    @property
    def text(self) -> str | None:
        """The main result's text, if the cell ended in an expression."""
        for r in self.results:
            if r.is_main_result:
                return r.text
        return None


@dataclass
class CommandResult(_Wire):
    """A finished command."""

    exit_code: int
    stdout: str
    stderr: str
    error: str | None = None
    truncated: bool = False


@dataclass
class EntryInfo(_Wire):
    """A file or directory inside the sandbox."""

    name: str
    path: str
    type: str  # "file" | "dir" | "symlink" | "other"
    size: int
    mode: int
    permissions: str
    modified_time: _dt.datetime
    symlink_target: str | None = None
    #: User metadata (``user.e2b.*`` extended attributes, prefix stripped); None when none.
    metadata: dict[str, str] | None = None


@dataclass
class Context(_Wire):
    """A code context: its own interpreter state."""

    id: str
    language: str
    cwd: str


@dataclass
class ProcessInfo(_Wire):
    """A running command."""

    pid: int
    cmd: str


@dataclass
class SandboxInfo(_Wire):
    """What ``get_info()`` returns."""

    sandbox_id: str
    tier: str
    template: str
    limits: Limits
    started_at: _dt.datetime
    end_at: _dt.datetime
    metadata: dict[str, str]
    #: "running", "paused" (kept on disk: ``connect`` resumes it) or "ended"
    state: str = "running"


@dataclass
class SandboxMetrics(_Wire):
    """One sample of a sandbox's resource use, read from the host's kernel (E2B's
    ``SandboxMetrics``): never the sandbox's own word."""

    timestamp: _dt.datetime
    #: CPUs the sandbox may use (its limit, rounded up)
    cpu_count: int
    #: CPU time used since the previous sample, as a share of ``cpu_count`` CPUs (0-100)
    cpu_used_pct: float
    #: bytes charged to the sandbox's memory cgroup (a microVM: its QEMU process)
    mem_used: int
    #: the sandbox's memory limit in bytes
    mem_total: int
    #: the part of ``mem_used`` that is page cache (files read or written)
    mem_cache: int
    #: bytes used on the sandbox's writable filesystems; None where they live inside the
    #: sandbox's own memory (gVisor's sentry, the microVM's guest) and the host can't see them
    disk_used: int | None
    #: the sandbox's disk limit in bytes
    disk_total: int


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot of a sandbox (issue 11): ``Sandbox.create(template=snapshot_id)`` starts a
    new sandbox from it."""

    snapshot_id: str
    sandbox_id: str  # the sandbox it was taken of
    name: str | None
    tier: str
    memory: bool  # whether processes and memory were kept
    size: int  # bytes on disk
    created: _dt.datetime
