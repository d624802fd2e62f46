"""Kernel-enforced resource limits and reliable killing for sandboxes (invariants 5, 7, 10).

Trust domain: host engine (privileged). Everything here runs on the host; the sandbox never
sees cgroupfs. Values read back from a sandbox's cgroup (pids, memory figures) are produced by
the kernel, but *which* processes are in the group is up to the sandbox, so callers treat pids
only as things to kill.

Layout. Each sandbox gets one group per hierarchy, named ``sbx-<name>.<owner pid namespace>.
<owner pid>.<owner start time>`` inside a ``moat`` parent group:

* **cgroup v1** (this development host): one group in each of the ``memory``, ``pids``, ``cpu``
  and ``freezer`` hierarchies (co-mounted controllers share a group). The ``moat`` parent sits
  *beneath the cgroup the host process is in* in each hierarchy (read from /proc/self/cgroup).
  That keeps sandboxes inside whatever limits and accounting the host process itself was given
  (delegation-friendly: a supervisor that put moat in a group with 8 GiB keeps all sandboxes
  under those 8 GiB), and v1 has no rule against groups with both processes and children.
* **cgroup v2** (production hosts): one group in the unified hierarchy. v2 forbids enabling
  controllers for children of a group that itself holds processes (the "no internal processes"
  rule; the root group is exempt). So the ``moat`` parent goes beneath the host process's
  cgroup when controllers can be enabled there (a systemd unit with ``Delegate=yes`` whose
  processes sit in a leaf), else at the hierarchy root when that is writable (root on a plain
  host). Anything else is an :class:`IsolationUnavailableError`, never a sandbox without limits.

The owner pid and start time in the name let :meth:`CgroupManager.sweep` remove groups a crashed
host process left behind without touching those of another live moat process.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from moat.errors import InvalidArgumentError, IsolationUnavailableError, SandboxError
from moat.runtime.spec import Limits

__all__ = ["CgroupManager", "SandboxCgroup", "detect"]

log = logging.getLogger(__name__)

PARENT: Final = "moat"
_PREFIX: Final = "sbx-"
_NAME_RE: Final = re.compile(r"[a-z0-9-]{1,64}")
_GROUP_RE: Final = re.compile(r"sbx-([a-z0-9-]{1,64})\.([0-9]{1,20})\.([0-9]{1,10})\.([0-9]{1,20})")
_V1_REQUIRED: Final = ("memory", "pids", "cpu", "freezer")
_V2_REQUIRED: Final = ("memory", "pids", "cpu")
_CFS_PERIOD_US: Final = 100_000
_MIB: Final = 1 << 20
#: How long kill() and destroy() may take before they give up with an error.
KILL_TIMEOUT_S: Final = 5.0


# --------------------------------------------------------------------------------------------
# small file helpers: cgroupfs files are tiny; every write is one write(2) as the kernel wants


def _read(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace")


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode("ascii"))
    finally:
        os.close(fd)


def _write_checked(path: Path, value: str, expect: str | None = None) -> None:
    """Write a limit and read it back: a limit the kernel did not take is an error (inv. 7)."""
    _write(path, value)
    got = _read(path).split()
    want = (expect if expect is not None else value).split()
    if got != want:
        raise OSError(errno.EINVAL, "limit not applied")


def _read_procs(group: Path) -> set[int]:
    """Pids in ``group`` and any sub-groups (the sandbox cannot make any, but be thorough)."""
    pids: set[int] = set()
    for dirpath, _dirs, _files in os.walk(group):
        try:
            text = _read(Path(dirpath) / "cgroup.procs")
        except FileNotFoundError:
            continue
        pids.update(int(line) for line in text.split() if line.isdigit())
    return pids


def _keyed(text: str, key: str) -> int:
    """The value of ``key`` in a flat-keyed cgroup file ("key value" lines)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return 0


_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def proc_cpu_ns(pids: list[int]) -> int:
    """CPU time (ns) of ``pids`` and of the children they reaped, from ``/proc/<pid>/stat``.

    Where the cgroup keeps no CPU counter of its own (v1 with ``cpuacct`` mounted apart from
    ``cpu``). A sandbox's init (the agent) reaps every orphan, so the exited processes' time
    is in a live process's ``cutime``/``cstime``; nothing is counted twice.
    """
    total = 0
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()
        try:  # utime, stime, cutime, cstime: fields 14-17 of proc(5), 11-14 after the name
            total += sum(int(x) for x in fields[11:15])
        except ValueError:
            continue
    return total * 1_000_000_000 // _CLK_TCK


def _proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), None if no such process
    or it is a zombie (dead, not yet reaped: it owns nothing any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    fields = stat.rsplit(")", 1)[-1].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19]) if len(fields) > 19 else None


def _pid_ns() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def _owner_tag() -> str:
    """``<pid namespace inode>.<pid>.<start time>`` of this process: who owns a group."""
    pid = os.getpid()
    return f"{_pid_ns()}.{pid}.{_proc_start_time(pid)}"


def _owner_dead(ns: int, pid: int, start: int) -> bool:
    """Whether the owner named in a group's name is certainly gone.

    A group made from another pid namespace is never judged dead: we cannot see its owner,
    and killing another live engine's sandboxes is worse than leaving a leftover (whose
    container's own cgroup teardown removes it).
    """
    return ns == _pid_ns() and _proc_start_time(pid) != start


def _swap_active() -> bool:
    try:
        meminfo = Path("/proc/meminfo").read_text(encoding="ascii")
    except OSError:
        return True  # unknown: assume the worst
    for line in meminfo.splitlines():
        if line.startswith("SwapTotal:"):
            return line.split()[1] != "0"
    return True


def _rmdir_tree(group: Path, deadline: float) -> None:
    """Remove a group and any sub-groups, bottom-up, retrying while exiting tasks drain."""
    while True:
        try:
            for dirpath, _dirs, _files in os.walk(group, topdown=False):
                os.rmdir(dirpath)
            return
        except FileNotFoundError:
            if not group.exists():
                return
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


# --------------------------------------------------------------------------------------------


@dataclass
class SandboxCgroup:
    """The cgroup(s) of one sandbox. Created by :meth:`CgroupManager.create`."""

    name: str
    version: int
    #: controller -> group directory (co-mounted v1 controllers share one; v2: all the same)
    dirs: dict[str, Path]
    _destroyed: bool = False

    @property
    def groups(self) -> list[Path]:
        """The distinct group directories, one per hierarchy."""
        return sorted(set(self.dirs.values()))

    @property
    def procs_files(self) -> list[str]:
        """Files a freshly forked child writes ``0`` into (see :meth:`enter`)."""
        return [str(g / "cgroup.procs") for g in self.groups]

    def enter(self) -> None:
        """Move the calling process into the sandbox's groups.

        Meant for ``subprocess.Popen(preexec_fn=cg.enter)``: it runs in the forked child, as
        root, before exec and before privileges are dropped, so the whole tree the sandbox
        starts is born inside its limits (no window in which it runs unlimited). Only
        os.open/os.write, nothing that could deadlock after fork. Raises (and the child never
        execs) if any write fails.
        """
        for path in self.procs_files:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    def add_pid(self, pid: int) -> None:
        """Move process ``pid`` (the whole thread group) into the sandbox's groups."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise InvalidArgumentError("pid must be a positive integer")
        try:
            for group in self.groups:
                _write(group / "cgroup.procs", str(pid))
        except ProcessLookupError as exc:
            raise SandboxError("no such process") from exc
        except OSError as exc:
            raise SandboxError("could not move the process into the sandbox's cgroup") from exc

    def pids(self) -> list[int]:
        """Every process in the sandbox's groups, in any hierarchy."""
        pids: set[int] = set()
        for group in self.groups:
            pids |= _read_procs(group)
        return sorted(pids)

    def _mem(self, v1: str, v2: str) -> str:
        return _read(self.dirs["memory"] / (v1 if self.version == 1 else v2))

    def memory_bytes(self) -> int:
        """Memory charged to the sandbox now (bytes)."""
        return int(self._mem("memory.usage_in_bytes", "memory.current").strip())

    def memory_peak(self) -> int | None:
        """Highest memory charged so far (bytes), None where the kernel does not say."""
        try:
            return int(self._mem("memory.max_usage_in_bytes", "memory.peak").strip())
        except (FileNotFoundError, ValueError):
            return None

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer has killed in this sandbox."""
        return _keyed(self._mem("memory.oom_control", "memory.events"), "oom_kill")

    def pids_limit_hits(self) -> int:
        """How many forks the pids limit refused (``max`` in pids.events, v1 and v2)."""
        try:
            return _keyed(_read(self.dirs["pids"] / "pids.events"), "max")
        except (OSError, KeyError, ValueError):
            return 0

    def cpu_ns(self) -> int:
        """CPU time (ns) the sandbox's processes have used so far."""
        if self.version == 2:
            return _keyed(_read(self.dirs["cpu"] / "cpu.stat"), "usage_usec") * 1000
        acct = self.dirs["cpu"] / "cpuacct.usage"  # present where cpu and cpuacct share a mount
        try:
            return int(_read(acct).strip())
        except FileNotFoundError:
            pass
        # The cpu group's processes alone: each of the sandbox's is in every one of its groups
        # (it cannot move itself), so the other hierarchies' lists name the same ones. A CPU
        # figure, not a kill list: kills and stats still read every group (pids()).
        return proc_cpu_ns(sorted(_read_procs(self.dirs["cpu"])))

    def stats(self) -> dict[str, int]:
        """Figures for ``SandboxProcess.stats()``; empty once destroyed."""
        if self._destroyed:
            return {}
        try:
            out = {
                "memory_bytes": self.memory_bytes(),
                "oom_kills": self.oom_kills(),
                "pids": len(self.pids()),
                "pids_limit_hits": self.pids_limit_hits(),
                "cpu_ns": self.cpu_ns(),
                "memory_cache_bytes": _keyed(
                    self._mem("memory.stat", "memory.stat"),
                    "cache" if self.version == 1 else "file",
                ),
            }
            peak = self.memory_peak()
            if peak is not None:
                out["memory_peak_bytes"] = peak
            return out
        except OSError:
            return {}

    # -- killing ---------------------------------------------------------------------------

    def kill(self, timeout: float = KILL_TIMEOUT_S) -> None:
        """SIGKILL every process in the sandbox's groups and wait until they are gone.

        Catches setsid'd and double-forked processes alike: membership is inherited and only
        the kernel can move a process out. v2 uses ``cgroup.kill``; v1 freezes the group first
        so nothing can fork (or exit and have its pid reused) between listing and killing.
        Raises SandboxError if processes remain after ``timeout`` seconds.
        """
        try:
            self._kill(time.monotonic() + timeout)
        except OSError as exc:
            log.warning("killing sandbox cgroup %s failed: %s", self.name, exc)
            raise SandboxError("sandbox processes could not be killed") from exc

    def _kill(self, deadline: float) -> None:
        """kill() without the error translation."""
        # v2 has one group; sweep() may rebuild a partial v1 one, so never assume a controller
        kill_file = self.groups[0] / "cgroup.kill" if self.groups else None
        if self.version == 2 and kill_file is not None and kill_file.exists():
            try:
                _write(kill_file, "1")
            except FileNotFoundError:
                return  # already destroyed
            self._wait_empty(deadline)
            return
        while self.pids():
            if time.monotonic() > deadline:
                raise SandboxError("sandbox processes could not be killed")
            frozen = self._freeze(True, deadline)
            try:
                for group in self.groups:
                    for pid in _read_procs(group):
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
            finally:
                if frozen:
                    self._freeze(False, deadline)
            # dying tasks leave the group within milliseconds; a short bounded wait saves
            # another freeze round
            self._wait_empty(min(deadline, time.monotonic() + 0.5), raise_=False)

    def stop_now(
        self, spare: int | None = None, timeout: float = 0.5, *, freeze: bool = True
    ) -> bool:
        """Freeze the sandbox and SIGKILL its processes (but ``spare``), without waiting for
        them to exit; returns whether the group is frozen.

        The fast half of a kill: once it returns nothing of the sandbox runs user code again
        (frozen, and dying the moment it is thawed). :meth:`thaw` then :meth:`destroy` finish.
        ``spare`` is a process the caller reaps itself (bwrap's outer half, which must outlive
        the namespace's init to reap it). Freezing waits at most ``timeout``; a task stuck in
        the kernel has its SIGKILL pending either way. ``freeze=False`` skips the freeze, for a
        group whose one process cannot fork and is already SIGKILLed (a VM): freezing a dying
        task only waits for it.
        """
        frozen = False
        try:
            if freeze:
                frozen = self._freeze(True, time.monotonic() + timeout)
            for group in self.groups:
                for pid in _read_procs(group):
                    if pid == spare:
                        continue
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        except OSError as exc:  # already removed, or cgroupfs refused: destroy() will retry
            log.warning("stopping sandbox cgroup %s failed: %s", self.name, exc)
        return frozen

    def thaw(self) -> None:
        """Undo the freeze of :meth:`stop_now` (the SIGKILLed tasks then exit)."""
        try:
            self._freeze(False, time.monotonic() + KILL_TIMEOUT_S)
        except OSError as exc:
            log.warning("thawing sandbox cgroup %s failed: %s", self.name, exc)

    def _freeze(self, frozen: bool, deadline: float) -> bool:
        """Freeze or thaw; returns whether the group has a freezer at all."""
        if self.version == 1:
            path = self.dirs.get("freezer")
            if path is None or not (path / "freezer.state").exists():
                return False
            _write(path / "freezer.state", "FROZEN" if frozen else "THAWED")
            if frozen:
                # FREEZING -> FROZEN once every task stopped; SIGKILL works either way, so
                # stop waiting at a short bound rather than hang on a stuck task
                wait_until = min(deadline, time.monotonic() + 1.0)
                while _read(path / "freezer.state").strip() != "FROZEN":
                    if time.monotonic() > wait_until:
                        break
                    time.sleep(0.001)
            return True
        path = self.groups[0] / "cgroup.freeze"
        if not path.exists():
            return False
        _write(path, "1" if frozen else "0")
        if frozen:  # same bounded wait as v1: cgroup.events says "frozen 1" once all stopped
            wait_until = min(deadline, time.monotonic() + 1.0)
            while "frozen 1" not in _read(self.groups[0] / "cgroup.events"):
                if time.monotonic() > wait_until:
                    break
                time.sleep(0.001)
        return True

    def _wait_empty(self, deadline: float, *, raise_: bool = True) -> None:
        while self.pids():
            if time.monotonic() > deadline:
                if raise_:
                    raise SandboxError("sandbox processes could not be killed")
                return
            time.sleep(0.002)

    def destroy(self, timeout: float = KILL_TIMEOUT_S) -> None:
        """Kill every process and remove the groups in every hierarchy. Idempotent.

        Also removes the ``moat`` parent when this was its last sandbox (invariant 5: nothing
        remains). Raises SandboxError if something could not be removed in ``timeout``.
        """
        if self._destroyed:
            return
        deadline = time.monotonic() + timeout
        try:
            if any(g.exists() for g in self.groups):
                self.kill(timeout)
            for group in self.groups:
                _rmdir_tree(group, deadline)
        except OSError as exc:
            log.warning("removing sandbox cgroup %s failed: %s", self.name, exc)
            raise SandboxError("the sandbox's cgroup could not be removed") from exc
        self._destroyed = True
        for group in self.groups:
            try:
                os.rmdir(group.parent)  # fails while other sandboxes use it: that's fine
            except OSError:
                pass


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupManager:
    """Creates and sweeps sandbox cgroups on this host. Get one from :func:`detect`."""

    version: int
    #: controller -> the ``moat`` parent directory in that controller's hierarchy
    parents: dict[str, Path]

    def create(self, name: str, limits: Limits) -> SandboxCgroup:
        """Create the sandbox's groups with ``limits`` applied; fail closed.

        ``name`` is the sandbox id (``[a-z0-9-]{1,64}``). Memory is capped including swap
        (v1 ``memory.memsw.limit_in_bytes``, v2 ``memory.swap.max = 0``) so swap cannot dodge
        the limit. Raises IsolationUnavailableError if any limit cannot be applied (and leaves
        nothing behind), InvalidArgumentError for a bad name or limits.
        """
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise InvalidArgumentError("cgroup name must match [a-z0-9-]{1,64}")
        if not isinstance(limits, Limits):
            raise InvalidArgumentError("limits must be a Limits")
        dirname = f"{_PREFIX}{name}.{_owner_tag()}"
        cg = SandboxCgroup(name, self.version, {c: p / dirname for c, p in self.parents.items()})
        made: list[Path] = []
        try:
            for group in cg.groups:
                self._mkdir(group)
                made.append(group)
            self._apply(cg, limits)
        except FileExistsError as exc:
            self._undo(made)
            raise InvalidArgumentError("a sandbox cgroup with this name already exists") from exc
        except OSError as exc:
            log.warning("creating sandbox cgroup %s failed: %s", name, exc)
            self._undo(made)
            raise IsolationUnavailableError(
                "the sandbox's resource limits could not be applied"
            ) from exc
        return cg

    def _mkdir(self, group: Path) -> None:
        # A concurrent destroy() may remove an empty parent between our makedirs and mkdir:
        # recreate it and retry a few times.
        for _ in range(5):
            self._ensure_parent(group.parent)
            try:
                os.mkdir(group, 0o755)
                return
            except FileNotFoundError:
                continue
        raise OSError(errno.ENOENT, "parent cgroup keeps vanishing")

    def _ensure_parent(self, parent: Path) -> None:
        try:
            os.mkdir(parent, 0o755)
        except FileExistsError:
            pass
        if self.version == 2:
            # children of the moat parent get the controllers (the parent has no processes)
            _enable_v2(parent)

    @staticmethod
    def _undo(made: list[Path]) -> None:
        for group in made:
            try:
                os.rmdir(group)
            except OSError:
                pass

    def _apply(self, cg: SandboxCgroup, limits: Limits) -> None:
        mem = str(limits.memory_mb * _MIB)
        quota = max(1000, round(limits.cpus * _CFS_PERIOD_US))
        if self.version == 1:
            m, p, c = cg.dirs["memory"], cg.dirs["pids"], cg.dirs["cpu"]
            _write_checked(m / "memory.limit_in_bytes", mem)
            memsw = m / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # absent without swap accounting; detect() refused if swap is on
                _write_checked(memsw, mem)
            _write_checked(p / "pids.max", str(limits.pids))
            _write_checked(c / "cpu.cfs_period_us", str(_CFS_PERIOD_US))
            _write_checked(c / "cpu.cfs_quota_us", str(quota))
        else:
            g = cg.dirs["memory"]
            _write_checked(g / "memory.max", mem)
            swap = g / "memory.swap.max"
            if swap.exists():
                _write_checked(swap, "0")
            _write_checked(g / "pids.max", str(limits.pids))
            _write_checked(g / "cpu.max", f"{quota} {_CFS_PERIOD_US}")

    def sweep(self) -> int:
        """Remove sandbox groups whose owning host process is gone; return how many.

        Kills their processes first. Only ``sbx-*`` groups under moat's parent are touched,
        and never one whose owner (pid + start time in its name) is still running.
        """
        found: dict[str, dict[str, Path]] = {}
        for controller, parent in self.parents.items():
            try:
                entries = os.listdir(parent)
            except FileNotFoundError:
                continue
            for entry in entries:
                m = _GROUP_RE.fullmatch(entry)
                if m is None or not _owner_dead(int(m[2]), int(m[3]), int(m[4])):
                    continue
                found.setdefault(entry, {})[controller] = parent / entry
        swept = 0
        for entry, dirs in sorted(found.items()):
            cg = SandboxCgroup(entry[len(_PREFIX) :].split(".", 1)[0], self.version, dirs)
            try:
                cg.destroy()
            except SandboxError:
                continue  # logged by destroy; one stuck group must not keep the rest
            swept += 1
        for parent in set(self.parents.values()):
            try:
                os.rmdir(parent)
            except OSError:
                pass
        return swept


def _enable_v2(group: Path) -> None:
    """Enable the required controllers for ``group``'s children (no-op if already on)."""
    have = set(_read(group / "cgroup.subtree_control").split())
    missing = [c for c in _V2_REQUIRED if c not in have]
    if missing:
        _write(group / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


# --------------------------------------------------------------------------------------------
# detection


@dataclass(frozen=True)
class _Mount:
    point: Path
    root: str  # the path within the hierarchy that is mounted at ``point``
    fstype: str
    controllers: frozenset[str]


def _mounts() -> list[_Mount]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        point = fields[4].replace("\\040", " ")
        opts = frozenset(tail[2].split(","))
        mounts.append(_Mount(Path(point), fields[3], tail[0], opts))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """controller -> our cgroup path (v1), plus "" -> our v2 path."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text(encoding="utf-8").splitlines():
        _hid, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


def _join(mount: _Mount, cgpath: str) -> Path | None:
    """The directory of ``cgpath`` under ``mount``, or None if it lies outside the mount."""
    root = mount.root.rstrip("/")
    if cgpath != root and not cgpath.startswith(root + "/"):
        return None
    rel = cgpath[len(root) :].lstrip("/")
    return mount.point / rel if rel else mount.point


def _enabled_controllers() -> set[str]:
    enabled = set()
    for line in Path("/proc/cgroups").read_text(encoding="ascii").splitlines()[1:]:
        parts = line.split()
        if len(parts) == 4 and parts[3] == "1":
            enabled.add(parts[0])
    return enabled


def detect() -> CgroupManager:
    """Find how this host can limit sandboxes; raise IsolationUnavailableError if it can't.

    cgroup v1 controllers take precedence when mounted (a hybrid host binds each controller
    to one hierarchy only); otherwise the unified v2 hierarchy must offer memory, pids and cpu.
    """
    try:
        mounts = _mounts()
        own = _own_cgroups()
        v1 = {c: m for m in mounts if m.fstype == "cgroup" for c in m.controllers}
        if any(c in v1 for c in _V2_REQUIRED):
            return _detect_v1(v1, own)
        v2 = [m for m in mounts if m.fstype == "cgroup2"]
        if v2:
            return _detect_v2(v2[0], own.get("", "/"))
    except OSError as exc:
        log.warning("cgroup detection failed: %s", exc)
        raise IsolationUnavailableError("cgroups are not usable on this host") from exc
    raise IsolationUnavailableError("no cgroup hierarchy is mounted on this host")


def _detect_v1(v1: dict[str, _Mount], own: dict[str, str]) -> CgroupManager:
    enabled = _enabled_controllers()
    parents: dict[str, Path] = {}
    for c in _V1_REQUIRED:
        if c not in v1 or c not in enabled:
            raise IsolationUnavailableError(f"the cgroup v1 '{c}' controller is not available")
        base = _join(v1[c], own.get(c, "/"))
        if base is None or not base.is_dir():
            raise IsolationUnavailableError(f"moat's own '{c}' cgroup is not visible")
        if not os.access(base, os.W_OK | os.X_OK):
            raise IsolationUnavailableError(f"the cgroup v1 '{c}' hierarchy is not writable")
        parents[c] = base / PARENT
    # Without swap accounting memsw files are missing: fine only if there is no swap to dodge
    # the memory limit through.
    if _swap_active() and not _has_memsw(v1["memory"]):
        raise IsolationUnavailableError(
            "swap is on but the kernel cannot limit it per cgroup (boot with swapaccount=1)"
        )
    return CgroupManager(1, parents)


def _has_memsw(memory: _Mount) -> bool:
    # every group, the root included, has the memsw files when swap accounting is on
    return (memory.point / "memory.memsw.usage_in_bytes").exists()


def _detect_v2(mount: _Mount, own: str) -> CgroupManager:
    available = set(_read(mount.point / "cgroup.controllers").split())
    missing = [c for c in _V2_REQUIRED if c not in available]
    if missing:
        raise IsolationUnavailableError(
            f"cgroup v2 controllers missing on this host: {', '.join(missing)}"
        )
    candidates: list[Path] = []
    base = _join(mount, own)
    if base is not None and base != mount.point:
        candidates.append(base)
    candidates.append(mount.point)
    for cand in candidates:
        try:
            if not set(_V2_REQUIRED) <= set(_read(cand / "cgroup.controllers").split()):
                continue
            _enable_v2(cand)  # EBUSY if cand holds processes (and is not the root)
        except OSError as exc:
            log.info("cgroup v2: cannot delegate from this cgroup (%s), trying the next", exc)
            continue
        return CgroupManager(2, {c: cand / PARENT for c in _V2_REQUIRED})
    raise IsolationUnavailableError(
        "cgroup v2: cannot enable memory, pids and cpu for moat's sandboxes; run moat as root "
        "or in a delegated cgroup (systemd Delegate=yes)"
    )
