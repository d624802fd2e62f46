"""Checks, made from the host's /proc and cgroupfs, that a killed sandbox can no longer run.

``kill()`` returns once the sandbox's processes are frozen or have a SIGKILL pending; reaping
and removal follow in the background (moat.runtime.reaper). These helpers tell the two
halves apart from outside.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

_SIGKILL_BIT = 1 << (9 - 1)
_PF_EXITING = 0x4


def _frozen(pid: int) -> bool:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            state = Path("/sys/fs/cgroup/freezer") / path.lstrip("/") / "freezer.state"
            try:
                return state.read_text().strip() == "FROZEN"
            except OSError:
                return False
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            events = Path("/sys/fs/cgroup") / path.lstrip("/") / "cgroup.events"
            try:
                return "frozen 1" in events.read_text()
            except OSError:
                return False
    return False


def cannot_run(pid: int) -> bool:
    """True when ``pid`` is gone, a zombie, exiting, has SIGKILL pending, or is frozen."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("State", "").strip()[:1] in ("Z", "X"):
        return True
    for key in ("SigPnd", "ShdPnd"):
        if int(fields.get(key, "0").strip(), 16) & _SIGKILL_BIT:
            return True
    flags = int(stat.rsplit(")", 1)[1].split()[6])
    return bool(flags & _PF_EXITING) or _frozen(pid)


def engine_child(pid: int) -> bool:
    """A process this test process spawned itself (bwrap's outer half, ``runsc run``): not
    sandboxed code, it exits once it has reaped what it started."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid()


def descendants(root: int | None = None) -> set[int]:
    """Every process below ``root`` (default: this test process), found through /proc.

    Sandboxes of other test runs on the same host are not below us: this keeps them out.
    """
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cgroup_dirs(match: Callable[[str], bool]) -> list[Path]:
    """Directories under /sys/fs/cgroup whose name ``match`` accepts.

    os.walk, never glob: the reaper removes groups (and an empty ``moat`` parent) while we
    list, and glob raises on a directory that vanishes under it; os.walk skips it.
    """
    found: list[Path] = []
    for dirpath, dirnames, _files in os.walk("/sys/fs/cgroup"):
        found += [Path(dirpath, d) for d in dirnames if match(d)]
    return found


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``check`` until it holds or ``timeout`` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return check()
        time.sleep(0.05)
    return True
