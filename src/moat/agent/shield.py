"""Keep user code from taking the agent over, and keep a reserve of processes for the agent.

In the container tier and the microVM guest user code runs with the agent's uid, so the uid
alone protects nothing. Three layers on every tier, and a fourth where the tier allows it
(per-tier table: docs/containment.md):

* **Non-dumpable agent** (``PR_SET_DUMPABLE 0``): ``/proc/<agent>/mem``, ``/proc/<agent>/fd/*``
  (reopening the host channel), ``/proc/<agent>/environ`` and ptrace need ``CAP_SYS_PTRACE`` once
  the target is not dumpable, and nothing in a sandbox holds a capability (invariant 9).
* **The agent is its pid namespace's init**: the kernel drops every signal sent to a
  namespace's init from inside the namespace unless the init handles it, SIGKILL and SIGSTOP
  included; so ``kill -STOP <agent>`` and ``kill -9 -1`` from user code cannot stop or kill it.
  The agent handles SIGINT with a no-op (Python's default would raise in the agent) and, as
  init, reaps orphans (:func:`start_reaper`).
* **A process reserve**: user processes get ``RLIMIT_NPROC`` lowered (soft and hard) below the
  agent's own, so a fork bomb is refused while the agent can still start threads to report,
  kill it and serve the next call (the kernel's pids cgroup or the VM's cgroup stays the
  outer cap: invariant 10).
* **A uid of its own** (gVisor, whose /proc ignores non-dumpable and whose sentry signals its
  init): the agent starts as :data:`AGENT_UID` with root's bounded capability set
  (``moat.protocol.contract.ROOT_CAPS``: the sentry's capabilities, never the host's), keeps
  AGENT_UID as real and saved uid, acts as :data:`USER_UID`, and keeps those capabilities
  only as *permitted*, none effective (:func:`_split_uid`). The container tier's
  root-capable sandbox starts it as uid 0 of the sandbox's own user namespace instead (real
  and saved uid stay 0; Linux honours non-dumpable and init's signal rule, which guard the
  agent there). A call with ``user="root"`` runs
  in a child that takes uid 0 (:func:`root_ids`): its effective capabilities are the
  permitted ones, still under ``no_new_privs``, the seccomp filter and the kernel's limits
  (docs/users.md).

Trust domain: sandbox (runs inside, stdlib only). Nothing here is a boundary for the host,
which never trusts the agent (invariant 6); it keeps the sandbox usable and its reports honest.
"""

from __future__ import annotations

import os
import resource
import signal
import threading
import time

# The agent starts in every sandbox: typing is only imported for the type checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_PR_SET_DUMPABLE = 4
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
#: uids of the agent and of user code where a tier can give them apart (gVisor starts the
#: agent as AGENT_UID with root's bounded capabilities: see :func:`_split_uid`).
AGENT_UID = 999
USER_UID = 1000
USER_GID = 1000
_CAP_VERSION_3 = 0x20080522
#: Processes (threads included) the agent keeps for itself out of its RLIMIT_NPROC.
RESERVE_MAX = 32
RESERVE_MIN = 4

#: Held while the agent starts a child and records it (see :func:`own`), and while the reaper
#: reaps: a child is always recorded before it can be reaped, so no exit status is lost.
spawn_lock = threading.Lock()
#: pid -> the handle its owner waits on (see :class:`Child`); guarded by spawn_lock.
_owned: dict[int, Child] = {}
#: Set once :func:`start_reaper` runs: from then on only the reaper calls waitpid.
_reaping = False
#: Set by :func:`own`: wakes a reaper that found no child at all.
_spawned = threading.Event()
_user_nproc: int | None = None
#: Set by :func:`_split_uid`: this agent can run a call as root (uid 0 of the sandbox).
_can_root = False
#: Set by :func:`_split_uid`: makes the permitted capabilities effective (root calls' child).
_raise_caps: Any = None
#: Set by :func:`_split_uid`: clears every capability (a user child's, see user_limits).
_drop_caps: Any = None
_CAP_KILL = 5


def harden(split_root: bool = False) -> None:
    """The agent's first call: its own uid (gVisor), non-dumpable, SIGINT, the user's limit.

    Before any thread or child exists (the default kernel is forked right after).
    """
    global _user_nproc
    import ctypes  # lazily: only this call needs it

    libc = ctypes.CDLL(None, use_errno=True)
    uid = os.getuid()
    if split_root:
        # Named by the driver (``--split-root 1``: the container tier's root-capable sandbox,
        # never a uid alone: a fake runtime's agent runs as the host's root). It starts the
        # agent as uid 0 of the sandbox's own user namespace with ROOT_CAPS (bwrap, run as
        # that root, made /home/user root's): the home goes to the user before anything of
        # the user's runs, then the bounding set and the split.
        from moat.protocol.contract import HOME

        if uid != 0:
            raise PermissionError("--split-root needs the agent to start as uid 0")
        os.chown(HOME, USER_UID, USER_GID)
        _bound_root(libc)
    if split_root or uid == AGENT_UID:
        _split_uid(libc)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")
    soft, _hard = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft != resource.RLIM_INFINITY:
        reserve = max(RESERVE_MIN, min(RESERVE_MAX, soft // 4))
        _user_nproc = max(1, soft - reserve)
    # As init, only handled signals arrive; Python's default SIGINT handler would raise
    # KeyboardInterrupt in the agent's main loop. A no-op handler (reset to the default on
    # exec, unlike SIG_IGN) keeps the agent alive and user programs interruptible.
    signal.signal(signal.SIGINT, _ignore)


def _split_uid(libc: Any) -> None:
    """Keep AGENT_UID as real and saved uid, act as USER_UID, keep root's capabilities
    permitted only (none effective, none inheritable).

    User code then runs as USER_UID throughout (:func:`user_limits` sets all three ids, which
    clears every capability): it may not signal the agent (the kernel compares its uids with
    the agent's real and saved uid), and /proc/<agent> files belong to another user (what
    gVisor's /proc checks, where non-dumpable is not honoured). The agent's own file work
    happens as USER_UID (its effective and file-system uid, with no effective capability),
    so files keep their owner. AGENT_UID is neither the user's nor root's: a root call's
    process (uid 0) shares no uid with the agent either. Root calls take uid 0 in a child
    (:func:`root_ids`); what that child may do is bounded by ROOT_CAPS (the tier's bounding
    set too), ``no_new_privs`` and the seccomp filter (invariant 9). The kernel keeps the
    permitted set across these changes: the agent's uids were never 0 (gVisor), or its real
    and saved uid stay 0 (container).
    """
    import ctypes

    from moat.protocol.contract import ROOT_CAPS

    global _can_root, _raise_caps, _drop_caps
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    wanted = 0
    for bit in ROOT_CAPS.values():
        wanted |= 1 << bit
    keep = data[1] & wanted  # never more than the tier gave (all caps are < 32)
    os.setgroups([USER_GID])
    os.setresgid(USER_GID, USER_GID, USER_GID)
    start = os.getuid()  # AGENT_UID (gVisor) or 0 (container: real and saved uid stay 0)
    os.setresuid(start, USER_UID, start)
    # CAP_KILL alone stays effective, in every thread to come: the agent must signal (stop,
    # interrupt, kill) the root calls it started, which run as uid 0.
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(keep & (1 << _CAP_KILL), keep, 0, 0, 0, 0)
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    _can_root = bool(keep)
    # Built now, so that a forked child only makes the call (see root_ids, user_limits).
    _raise_caps = _capset(libc, keep, keep)
    _drop_caps = _capset(libc, 0, 0)


def _bound_root(libc: Any) -> None:
    """Drop every capability but ROOT_CAPS from the bounding set (the container tier: bwrap
    leaves it whole when it runs in a user namespace it did not make, and gives the agent
    CAP_SETPCAP for this alone; :func:`_split_uid` then keeps ROOT_CAPS only). With
    ``no_new_privs`` no exec of root's could gain more anyway; this is the second layer."""
    import ctypes

    from moat.protocol.contract import ROOT_CAPS

    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63
    keep = set(ROOT_CAPS.values())
    for cap in range(last + 1):
        if cap in keep or libc.prctl(_PR_CAPBSET_READ, cap, 0, 0, 0) != 1:
            continue  # kept, or already out of the set (no CAP_SETPCAP needed then)
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _capset(libc: Any, effective: int, permitted: int) -> Any:
    """A function that sets the calling thread's capabilities (inheritable: none)."""
    import ctypes

    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(effective, permitted, 0, 0, 0, 0)

    def capset() -> None:
        if libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset")

    return capset


def can_root() -> bool:
    """Whether this sandbox can run a call as root (see :func:`_split_uid`)."""
    return _can_root


def root_ids() -> None:
    """In a child of the agent that runs a root call: uid and gid 0, no supplementary groups.

    The permitted capabilities (ROOT_CAPS at most) become effective, then uid 0 is taken as
    real, effective and saved uid (CAP_SETUID); only calls, no allocation worth the name
    (also part of a ``preexec_fn``).
    """
    if _raise_caps is None:
        raise PermissionError("this sandbox cannot run calls as root")
    _raise_caps()
    os.setresuid(0, 0, 0)
    os.setgroups([])
    os.setresgid(0, 0, 0)


def root_limits() -> None:
    """``preexec_fn`` of a root command: root's ids, then the user's process limit and OOM
    score (root holds no CAP_SYS_RESOURCE: it cannot raise them again)."""
    root_ids()
    _limits()


def _ignore(_signum: int, _frame: object) -> None:
    return None


def child_setup() -> None:
    """In a forked (not exec'd) child that will run user code: default SIGINT, user limits."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    user_limits()


def user_limits() -> None:
    """The user's uid and process limit, no capability, first in line for the OOM killer;
    os-level calls only (also a ``preexec_fn``)."""
    euid = os.geteuid()
    if os.getuid() != euid:
        os.setresuid(euid, euid, euid)
    if _drop_caps is not None:
        # On gVisor the agent's uids were never 0, so the kernel kept its permitted set
        # across the switch; a child that runs user code without an exec (a forked kernel)
        # must not keep it (an exec as a non-root uid would drop it anyway).
        _drop_caps()
    _limits()


def _limits() -> None:
    if _user_nproc is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (_user_nproc, _user_nproc))
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        try:
            os.write(fd, b"1000")
        finally:
            os.close(fd)
    except OSError:
        pass


#: Environment names that make bash (or the dynamic loader before it) run code or read
#: files before the first command of ``-c`` (startup files, imported functions, xtrace's
#: prompt, preloaded libraries, iconv modules).
_STARTUP_ENV = frozenset({"BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "GCONV_PATH"})
#: The shell makes itself the OOM killer's first choice before anything it forks inherits
#: its score (the agent's write to the new pid comes after Popen returns: too late for a
#: child the shell forked at once).
OOM_FIRST_SH = "{ echo 1000 >/proc/self/oom_score_adj; } 2>/dev/null"


def _runs_before_first_command(env: dict[str, str]) -> bool:
    return any(name in _STARTUP_ENV or name.startswith(("LD_", "BASH_FUNC_")) for name in env)


def user_shell(
    shell: str, cmd: str, env: dict[str, str], root: bool = False
) -> tuple[list[str], dict[str, Any]]:
    """The argv and extra ``Popen`` arguments that run ``cmd`` as user code, under its limits.

    A ``preexec_fn`` makes CPython fork the agent and run Python in the child (~1.5 ms per
    command); without one it uses vfork. So where it can, the shell itself lowers its
    ``RLIMIT_NPROC`` (soft and hard) and raises its OOM score in the first commands of its
    ``-c`` string, before any of ``cmd`` is even parsed: nothing of user code runs without
    the limit, and no fork of user code escapes it (the kernel checks the forking process's
    limit). That holds only when nothing runs before those first commands, so the fork path
    stays for a shell other than bash and for an environment naming what bash or the loader
    act on at start-up. The uid switch is :func:`user_ids`; a root command always takes the
    fork path (:func:`root_limits`).
    """
    if root:
        return [shell, "-c", f"{OOM_FIRST_SH}; {cmd}"], {"preexec_fn": root_limits}
    if os.path.basename(shell) != "bash" or _runs_before_first_command(env):
        # The fork path: the limit is set before exec. The OOM score can't be (the forked
        # child is not dumpable, so its /proc files are root's and the write fails; the
        # agent's write after Popen races with the end of execve), so the shell sets it
        # before the command, as on the fast path.
        return [shell, "-c", f"{OOM_FIRST_SH}; {cmd}"], {"preexec_fn": user_limits}
    limit = "" if _user_nproc is None else f"ulimit -HSu {_user_nproc} || exit 126; "
    return [shell, "-c", f"{limit}{OOM_FIRST_SH}; {cmd}"], user_ids()


def user_python_boot() -> str:
    """Python lines that put a fresh interpreter under the user's process limit and make it
    the OOM killer's first choice.

    The first lines of a kernel started with ``python -I -c`` (isolated: no environment, no
    user site), so no user code runs before them; the uid comes from :func:`user_ids` as for
    commands. The OOM score is set here, not only by the agent after the spawn: the agent's
    write can come while the child is still inside execve, not yet dumpable, when its /proc
    files belong to root and the write fails.
    """
    lines = ["import resource"]
    if _user_nproc is not None:
        n = _user_nproc
        lines.append(f"resource.setrlimit(resource.RLIMIT_NPROC, ({n}, {n}))")
    lines += [
        "try:",
        "    with open('/proc/self/oom_score_adj', 'w') as f: f.write('1000')",
        "except OSError:",
        "    pass",
    ]
    return "\n".join(lines) + "\n"


def user_ids() -> dict[str, Any]:
    """Extra ``Popen`` arguments that give a child the user's uid as real, effective, saved.

    Only where the agent's differ (gVisor, :func:`_split_uid`): CPython's ``user=`` calls
    setreuid in the child before exec (without it the sentry's exec leaves all three at the
    agent's real uid).
    """
    euid = os.geteuid()
    return {"user": euid} if os.getuid() != euid else {}


class Child:
    """A child the agent started and will wait for: its exit status arrives here.

    Once the reaper runs (the agent is init), it alone calls ``waitpid`` and hands an owned
    child's status to this handle, so the owner neither races it nor loses the status;
    before that (or when the agent is not init) the owner reaps its child itself.
    """

    __slots__ = ("_code", "_done", "pid")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._code: int | None = None
        self._done = threading.Event()

    def _exited(self, status: int) -> None:
        self._code = os.waitstatus_to_exitcode(status)
        self._done.set()

    def poll(self) -> int | None:
        """The exit code (``-signal`` if killed, as subprocess reports it), None while it runs."""
        return self.wait(0)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds (None: for ever); the exit code, or None if running."""
        if self._done.is_set():
            return self._code
        if _reaping:
            self._done.wait(timeout)  # the reaper has dropped it from the table
        else:
            self._reap_self(timeout)
        return self._code

    def _reap_self(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(self.pid, 0 if deadline is None else os.WNOHANG)
            except ChildProcessError:  # not ours to reap (cannot happen without a reaper)
                pid, status = self.pid, signal.SIGKILL  # reads as killed, never as success
            if pid == self.pid:
                with spawn_lock:
                    if _owned.get(self.pid) is self:
                        del _owned[self.pid]
                self._exited(status)
                return
            if deadline is None or time.monotonic() >= deadline:
                return
            time.sleep(0.01)


def own(pid: int) -> Child:
    """Record a child its owner will wait for (call with :data:`spawn_lock` held)."""
    child = Child(pid)
    _owned[pid] = child
    _spawned.set()
    return child


def start_reaper() -> None:
    """As a pid namespace's init: reap every exited child, handing owned ones' status over.

    Unreaped, orphans' zombies would count against the process limit until nothing, not even
    the agent, could start a thread.
    """
    global _reaping
    _reaping = True
    threading.Thread(target=_reap, daemon=True, name="reaper").start()


def _reap() -> None:
    """Block until some child has exited, then reap every exited child (no busy loop).

    ``waitid(WNOWAIT)`` only waits: the zombie stays until ``waitpid(-1, WNOHANG)`` takes it,
    under :data:`spawn_lock`, so a child spawned concurrently is recorded before it can be
    reaped. An owned child's status goes to its :class:`Child`; an orphan's is dropped. (The
    former reaper left an owned zombie for its owner and, since ``waitid`` kept returning that
    same zombie, never reached the orphans behind it while the owner was not waiting.)
    """
    while True:
        _spawned.clear()
        try:
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:  # no child at all: none can exit before the next spawn
            _spawned.wait()
            continue
        except InterruptedError:
            continue
        with spawn_lock:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                child = _owned.pop(pid, None)
                if child is not None:
                    child._exited(status)
