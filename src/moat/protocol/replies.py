"""Schemas of the agent's replies: every field of every DONE the host reads (invariant 6).

The agent may be the attacker's (user code can take it over), so its replies are checked
like requests: a closed set of fields per request type, each with a type and a range, an
enum or a pattern. ``check_reply`` raises ProtocolError; the host then ends the sandbox.
Pure, stdlib only (shared with the agent, whose replies it describes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from moat.protocol import metadata as _metadata
from moat.protocol.charts import check_chart
from moat.protocol.frames import MAX_FRAME, MsgType, ProtocolError

__all__ = ["ENTRY_TYPES", "RESULT_KEYS", "check_reply", "check_result_data"]

#: Kinds of file a directory entry may report.
ENTRY_TYPES = ("file", "dir", "symlink", "other")
#: Keys a RESULT frame's data may have (display formats, free-form ``data``, a figure's
#: ``chart``).
RESULT_KEYS = frozenset(
    {
        *("text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "json"),
        *("javascript", "data", "chart"),
    }
)
#: ``stat.filemode`` output: a type letter and nine permission letters.
_PERMISSIONS = re.compile(r"[-dlcbps?][-r][-w][-xsS][-r][-w][-xsS][-r][-w][-xtT]")
_CONTEXT_ID = re.compile(r"[A-Za-z0-9]{1,64}")

Check = Callable[[Any], bool]


def _int(lo: int, hi: int) -> Check:
    return lambda x: isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _float(lo: float, hi: float) -> Check:
    def check(x: Any) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return False
        return not math.isnan(x) and lo <= x <= hi

    return check


def _str(max_len: int, pattern: re.Pattern[str] | None = None) -> Check:
    def check(x: Any) -> bool:
        if not isinstance(x, str) or len(x) > max_len:
            return False
        return pattern is None or pattern.fullmatch(x) is not None

    return check


def _enum(*values: str) -> Check:
    return lambda x: x in values


def _bool(x: Any) -> bool:
    return isinstance(x, bool)


def _list(item: Check, most: int) -> Check:
    return lambda x: isinstance(x, list) and len(x) <= most and all(item(i) for i in x)


def _obj(required: Mapping[str, Check], optional: Mapping[str, Check] | None = None) -> Check:
    """A closed object: every required field, optional ones, nothing else."""
    opt = dict(optional or {})

    def check(x: Any) -> bool:
        if not isinstance(x, dict):
            return False
        if any(k not in required and k not in opt for k in x):
            return False
        if any(k not in x or not c(x[k]) for k, c in required.items()):
            return False
        return all(c(x[k]) for k, c in opt.items() if k in x)

    return check


_PATH = _str(4096)
_BIG = 1 << 62
CONTEXT = _obj(
    {"id": _str(64, _CONTEXT_ID), "language": _enum("python", "bash", "js", "ts"), "cwd": _PATH}
)
ENTRY = _obj(
    {
        "name": _str(4096),
        "path": _PATH,
        "type": _enum(*ENTRY_TYPES),
        "size": _int(0, _BIG),
        "mode": _int(0, 0o7777),
        "permissions": _str(10, _PERMISSIONS),
        "mtime": _float(-_BIG, _BIG),
    },
    {
        "uid": _int(0, 1 << 32),
        "gid": _int(0, 1 << 32),
        "symlink_target": _PATH,
        # user.e2b.* attributes: printable ASCII, key <= 246 B, <= 4 KiB in all
        "metadata": lambda x: _metadata.problem(x) is None,
    },
)
PROCESS = _obj({"pid": _int(1, 1 << 22), "cmd": _str(MAX_FRAME)}, {"started": _float(0, _BIG)})
_EMPTY = _obj({})

#: The DONE of each request type. Commands (CMD_START) end with their exit status.
REPLIES: dict[MsgType, Check] = {
    MsgType.PING: _EMPTY,
    MsgType.RESEED: _EMPTY,
    MsgType.NET_SETUP: _EMPTY,
    MsgType.EXEC: _obj({}, {"restarted": _bool, "exit_code": _int(0, 1 << 16)}),  # bash: a command
    MsgType.INTERRUPT: _obj({}, {"interrupted": _bool}),
    MsgType.CTX_CREATE: CONTEXT,
    MsgType.CTX_LIST: _obj({"contexts": _list(CONTEXT, 4096)}),
    MsgType.CTX_RESTART: _EMPTY,
    MsgType.CTX_REMOVE: _EMPTY,
    MsgType.CMD_START: _obj({"exit_code": _int(0, 1 << 16)}, {"restarted": _bool}),
    MsgType.CMD_CONNECT: _obj({"exit_code": _int(0, 1 << 16)}, {"restarted": _bool}),
    MsgType.CMD_STDIN: _EMPTY,
    MsgType.CMD_KILL: _EMPTY,
    MsgType.CMD_RESIZE: _EMPTY,
    MsgType.CMD_LIST: _obj({"processes": _list(PROCESS, 1 << 16)}),
    MsgType.FILE_READ: _obj({}, {"size": _int(0, _BIG)}),
    MsgType.FILE_WRITE: _obj({}, {"size": _int(0, _BIG), "path": _PATH}),
    MsgType.FILE_LIST: _obj({"entries": _list(ENTRY, 1 << 20)}),
    MsgType.FILE_STAT: ENTRY,
    MsgType.FILE_REMOVE: _EMPTY,
    MsgType.FILE_MKDIR: _obj({"created": _bool}),
    MsgType.FILE_MOVE: ENTRY,
    MsgType.WATCH_START: _EMPTY,  # the watch ended
    MsgType.WATCH_STOP: _EMPTY,
    MsgType.WATCH_FLUSH: _EMPTY,
}


def check_reply(request: MsgType, fields: Any) -> dict[str, Any]:
    """The DONE fields of a ``request``, if they match its schema; ProtocolError if not."""
    check = REPLIES.get(request)
    if check is None or not check(fields):
        raise ProtocolError(f"bad reply to {request.value}")
    out: dict[str, Any] = fields
    return out


def check_result_data(data: Any) -> dict[str, Any]:
    """A RESULT frame's data: known keys; every format but json/data/chart is a string; a
    chart has one of E2B's chart shapes, bounded (``moat.protocol.charts``)."""
    if not isinstance(data, dict) or set(data) - RESULT_KEYS:
        raise ProtocolError("unknown result format")
    for key, value in data.items():
        if key == "chart":
            if not check_chart(value):
                raise ProtocolError("malformed chart")
        elif key not in ("json", "data") and not isinstance(value, str):
            raise ProtocolError("result format is not text")
    return data
