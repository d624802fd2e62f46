"""The host cgroup runsc creates around one gVisor sandbox: verify, read, kill, remove.

Trust domain: host engine. runsc creates the cgroup from ``linux.resources`` (cgroup v1 on the
development machines, v2 on production hosts); this module checks from outside that the limits
really are in place before the sandbox is handed over (invariant 7: fail closed), reads usage
for ``stats()``, and removes what runsc leaves behind (invariant 5).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["CGROUP_ROOT", "HostCgroup", "layout", "missing_controllers"]

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
_V1_CONTROLLERS: Final = ("memory", "pids", "cpu")


def layout(root: Path = CGROUP_ROOT) -> str | None:
    """``"v2"`` for a pure cgroup2 mount, ``"v1"`` when the v1 controllers we need are
    mounted, else None."""
    if (root / "cgroup.controllers").is_file():
        return "v2"
    if all((root / c).is_dir() for c in _V1_CONTROLLERS):
        return "v1"
    return None


def missing_controllers(root: Path = CGROUP_ROOT) -> list[str]:
    """Controllers (memory, pids, cpu) this host cannot give a sandbox."""
    kind = layout(root)
    if kind == "v1":
        return []
    if kind == "v2":
        try:
            have = (root / "cgroup.controllers").read_text().split()
        except OSError:
            have = []
        return [c for c in _V1_CONTROLLERS if c not in have]
    return list(_V1_CONTROLLERS)


@dataclass(frozen=True)
class HostCgroup:
    """One sandbox's cgroup, named ``name`` under every controller's root."""

    name: str
    root: Path = CGROUP_ROOT

    def _dirs(self) -> Iterator[Path]:
        if layout(self.root) == "v2":
            yield self.root / self.name
            return
        # runsc joins every v1 hierarchy it finds (cpuset, freezer, ...), not only ours
        try:
            hierarchies = sorted(p for p in self.root.iterdir() if p.is_dir())
        except OSError:
            return
        for h in hierarchies:
            yield h / self.name

    def _file(self, v1: tuple[str, str], v2: str) -> Path:
        if layout(self.root) == "v2":
            return self.root / self.name / v2
        return self.root / v1[0] / self.name / v1[1]

    def _read(self, v1: tuple[str, str], v2: str) -> str | None:
        try:
            return self._file(v1, v2).read_text().strip()
        except OSError:
            return None

    def enforced(self, memory_bytes: int, pids: int, cpu_quota: int) -> bool:
        """True when the cgroup holds a process and carries exactly the asked-for limits."""
        mem = self._read(("memory", "memory.limit_in_bytes"), "memory.max")
        pmax = self._read(("pids", "pids.max"), "pids.max")
        if layout(self.root) == "v2":
            cpu = (self._read(("cpu", ""), "cpu.max") or "").split(" ")[0]
        else:
            cpu = self._read(("cpu", "cpu.cfs_quota_us"), "") or ""
        return (
            mem == str(memory_bytes)
            and pmax == str(pids)
            and cpu == str(cpu_quota)
            and bool(self.pids())
        )

    def pids(self) -> list[int]:
        """Every process in the cgroup (the sentry, the gofer, the ptrace stubs)."""
        found: set[int] = set()
        for d in self._dirs():
            try:
                text = (d / "cgroup.procs").read_text()
            except OSError:
                continue
            found.update(int(x) for x in text.split())
        return sorted(found)

    def stats(self) -> dict[str, int]:
        """Memory in use (bytes) and host tasks of the sandbox, as far as readable."""
        out: dict[str, int] = {}
        mem = self._read(("memory", "memory.usage_in_bytes"), "memory.current")
        cur = self._read(("pids", "pids.current"), "pids.current")
        if mem and mem.isdigit():
            out["memory_bytes"] = int(mem)
        if cur and cur.isdigit():
            out["host_tasks"] = int(cur)
        stat = self._read(("memory", "memory.stat"), "memory.stat") or ""
        for line in stat.splitlines():  # the page cache: "cache" in v1, "file" in v2
            key, _, value = line.partition(" ")
            if key in ("cache", "file") and value.isdigit():
                out["memory_cache_bytes"] = int(value)
                break
        cpu = self.cpu_ns()
        if cpu is not None:
            out["cpu_ns"] = cpu
        return out

    def cpu_ns(self) -> int | None:
        """CPU time (ns) of the sentry, gofer and stubs so far; None where unreadable."""
        if layout(self.root) == "v2":
            stat = self._read(("", ""), "cpu.stat") or ""
            usec = [ln.split()[1] for ln in stat.splitlines() if ln.startswith("usage_usec ")]
            return int(usec[0]) * 1000 if usec and usec[0].isdigit() else None
        acct = self._read(("cpuacct", "cpuacct.usage"), "")
        if acct and acct.isdigit():  # runsc joins every v1 hierarchy, cpuacct included
            return int(acct)
        return None

    def kill(self) -> int:
        """SIGKILL every process in the cgroup; return how many were signalled."""
        n = 0
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
                n += 1
            except ProcessLookupError:
                pass
        return n

    def remove(self) -> bool:
        """rmdir the cgroup in every controller; True if nothing of it remains."""
        ok = True
        for d in self._dirs():
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
        return ok

    def exists(self) -> bool:
        return any(d.exists() for d in self._dirs())
