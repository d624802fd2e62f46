"""Find and kill the host processes of one runsc state root.

Trust domain: host engine. Every runsc process of a sandbox (``runsc run``, ``runsc-gofer``,
``runsc-sandbox``) carries the per-sandbox ``--root`` directory on its command line; that
directory is unique to the sandbox, so matching it exactly never hits anything else. Reading
``/proc`` is the belt to the cgroup's braces: a process that escaped the cgroup (it cannot, but
we do not rely on it) is still found (invariant 5).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

__all__ = ["kill_processes_of_root", "processes_of_root"]


def processes_of_root(root: str, proc: Path = Path("/proc")) -> list[int]:
    """PIDs whose argv holds ``--root=ROOT`` or ``--root ROOT`` exactly."""
    want_eq = f"--root={root}".encode()
    want = root.encode()
    found: list[int] = []
    try:
        entries = list(proc.iterdir())
    except OSError:
        return found
    me = os.getpid()
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for i, arg in enumerate(argv):
            if arg == want_eq or (arg == b"--root" and i + 1 < len(argv) and argv[i + 1] == want):
                found.append(int(entry.name))
                break
    return found


def kill_processes_of_root(root: str) -> int:
    """SIGKILL every process of ``root``; return how many were signalled."""
    n = 0
    for pid in processes_of_root(root):
        try:
            os.kill(pid, signal.SIGKILL)
            n += 1
        except ProcessLookupError:
            pass
    return n
