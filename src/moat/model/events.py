"""The typed events a call streams through the front door, in order, each already guarded.

``run_code`` streams Output / ResultEvent / ErrorEvent and ends with End; a command streams
Started (its pid), Output, and End (with its exit code); a PTY streams PtyOutput (bytes)
instead of Output.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from moat.errors import InvalidArgumentError
from moat.model.results import EntryInfo, ExecutionError, Result, _Wire


@dataclass(frozen=True)
class Started(_Wire):
    """A command started: its pid inside the sandbox."""

    pid: int


@dataclass(frozen=True)
class Output(_Wire):
    """A chunk of stdout or stderr, as released by the guard."""

    stream: Literal["stdout", "stderr"]
    text: str


@dataclass(frozen=True)
class PtySize(_Wire):
    """A terminal's size in character cells."""

    cols: int
    rows: int


@dataclass(frozen=True)
class PtyOutput(_Wire):
    """A chunk of a terminal's output, as released by the guard: raw bytes (escape sequences,
    UTF-8 split anywhere), base64 in JSON."""

    data: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"data": base64.b64encode(self.data).decode("ascii")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PtyOutput:
        if not isinstance(data, Mapping) or set(data) != {"data"}:
            raise InvalidArgumentError("PtyOutput must be an object with data only")
        try:
            raw = base64.b64decode(data["data"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise InvalidArgumentError("PtyOutput.data must be base64") from None
        return cls(raw)


@dataclass(frozen=True)
class ResultEvent(_Wire):
    """A displayed value."""

    result: Result


@dataclass(frozen=True)
class ErrorEvent(_Wire):
    """The user code's exception."""

    error: ExecutionError


@dataclass(frozen=True)
class End(_Wire):
    """The call ended. ``exit_code`` for commands; ``execution_count`` for code."""

    truncated: bool = False
    execution_count: int | None = None
    exit_code: int | None = None
    context_restarted: bool = False


Event = Started | Output | PtyOutput | ResultEvent | ErrorEvent | End

#: What happened to an entry of a watched directory (E2B's types), or ``overflow``: events
#: were lost here (the consumer fell behind, or the kernel's queue overflowed).
FilesystemEventType = Literal["create", "write", "remove", "rename", "chmod", "overflow"]
FILESYSTEM_EVENT_TYPES: tuple[FilesystemEventType, ...] = (
    "create", "write", "remove", "rename", "chmod", "overflow",
)  # fmt: skip


@dataclass(frozen=True)
class FilesystemEvent(_Wire):
    """An event of a directory watch. ``name`` is the path relative to the watched
    directory (guarded), ``""`` for the directory itself and for ``overflow``; ``entry`` is
    the entry's info when asked for and the entry still exists."""

    name: str
    type: FilesystemEventType
    entry: EntryInfo | None = None
