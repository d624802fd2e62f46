"""Directory watches: the event vocabulary, the caps both sides keep, and the check of an
``FS_EVENTS`` frame's fields.

Flow: the host sends ``WATCH_START {path, recursive}``; the agent answers ``WATCHING`` once
its inotify watches are in place (or FAIL: ``not_found``, ``invalid`` for a non-directory,
``busy`` past a cap), then ``FS_EVENTS`` frames, and ends the request with DONE when the
watch stops (``WATCH_STOP {target}``, or the watched directory went away).

The agent may be the attacker's (invariant 6): ``check_events`` holds every field to a type,
a length and an enum; the host ends the sandbox on anything else. Pure, stdlib only (the
agent imports it too).
"""

from __future__ import annotations

from moat.protocol.frames import ProtocolError

# The agent starts in every sandbox: typing is only imported for the type checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: E2B's event types (envd's fsnotify mapping), in the wire's order.
EVENT_TYPES = ("create", "write", "remove", "rename", "chmod")
#: Watches (watchers) open at once in one sandbox; the host and the agent both refuse more.
MAX_WATCHERS = 16
#: inotify watch descriptors (directories) per sandbox, over all its watchers: a recursive
#: watch of a larger tree is refused at start, and directories made later past it are
#: reported as lost events.
MAX_WATCH_DIRS = 8192
#: Events in one FS_EVENTS frame (the agent splits larger batches; frames stay < MAX_FRAME).
MAX_EVENTS_PER_FRAME = 256
#: Longest event name: a path relative to the watched directory (PATH_MAX).
MAX_NAME = 4096
#: Events the host keeps queued, unread, per watcher: past it they are dropped and the
#: reader is told (an ``overflow`` event), never unbounded memory (invariant 6).
MAX_QUEUED_EVENTS = 4096

__all__ = [
    "EVENT_TYPES",
    "MAX_EVENTS_PER_FRAME",
    "MAX_NAME",
    "MAX_QUEUED_EVENTS",
    "MAX_WATCHERS",
    "MAX_WATCH_DIRS",
    "check_events",
]


def check_events(fields: dict[str, Any]) -> tuple[list[tuple[str, str]], bool]:
    """An FS_EVENTS frame's ``(name, type)`` pairs and whether the agent lost events
    (``lost``: the kernel's queue overflowed, or a new directory could not be watched).
    ProtocolError for any field off its schema."""
    if set(fields) - {"events", "lost"}:
        raise ProtocolError("fs_events: unknown field")
    events = fields.get("events", [])
    lost = fields.get("lost", False)
    if not isinstance(lost, bool) or not isinstance(events, list):
        raise ProtocolError("fs_events: bad field type")
    if len(events) > MAX_EVENTS_PER_FRAME:
        raise ProtocolError("fs_events: too many events")
    out: list[tuple[str, str]] = []
    for event in events:
        if not isinstance(event, list) or len(event) != 2:
            raise ProtocolError("fs_events: bad event")
        name, kind = event
        if not isinstance(name, str) or len(name) > MAX_NAME or "\0" in name:
            raise ProtocolError("fs_events: bad name")
        if kind not in EVENT_TYPES:
            raise ProtocolError("fs_events: unknown event type")
        out.append((name, kind))
    return out, lost
