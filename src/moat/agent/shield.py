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
  init): the agent starts as :data:`AGENT_UID` with CAP_SETUID, keeps it as real and saved uid,
  acts as :data:`USER_UID`, and drops the capability before anything else (:func:`_split_uid`).

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
#: uids of the agent and of user code where a tier can give them apart (gVisor starts the
#: agent as AGENT_UID with CAP_SETUID only: see :func:`_split_uid`).
AGENT_UID = 999
USER_UID = 1000
_CAP_VERSION_3 = 0x20080522
#: Processes (threads included) the agent keeps for itself out of its RLIMIT_NPROC.
RESERVE_MAX = 32
RESERVE_MIN = 4

#: Held while the agent starts a child and records it (see :func:`own`): the reaper never
#: reaps a child an owner will wait for.
spawn_lock = threading.Lock()
_owned: set[int] = set()
_user_nproc: int | None = None


def harden() -> None:
    """The agent's first call: its own uid (gVisor), non-dumpable, SIGINT, the user's limit.

    Before any thread or child exists (the default kernel is forked right after).
    """
    global _user_nproc
    import ctypes  # lazily: only this call needs it

    libc = ctypes.CDLL(None, use_errno=True)
    if os.getuid() == AGENT_UID:
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
    """Keep AGENT_UID as real and saved uid, act as USER_UID, and drop every capability.

    User code then runs as USER_UID throughout (:func:`user_limits` sets all three ids): it
    may not signal the agent (the kernel compares its uids with the agent's real and saved
    uid), and /proc/<agent> files belong to another user (what gVisor's /proc checks, where
    non-dumpable is not honoured). The agent's own file work happens as USER_UID (its
    effective and file-system uid), so files keep their owner. Started with CAP_SETUID only,
    for this one call; no capability remains afterwards (invariant 9).
    """
    import ctypes

    os.setresuid(AGENT_UID, USER_UID, AGENT_UID)
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2: all empty
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _ignore(_signum: int, _frame: object) -> None:
    return None


def child_setup() -> None:
    """In a forked (not exec'd) child that will run user code: default SIGINT, user limits."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    user_limits()


def user_limits() -> None:
    """The user's uid and process limit; os-level calls only (also a ``preexec_fn``)."""
    euid = os.geteuid()
    if os.getuid() != euid:
        os.setresuid(euid, euid, euid)
    if _user_nproc is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (_user_nproc, _user_nproc))


def own(pid: int) -> None:
    """Record a child its owner will wait for (call with :data:`spawn_lock` held)."""
    _owned.add(pid)


def disown(pid: int) -> None:
    """The owner has waited for ``pid``."""
    with spawn_lock:
        _owned.discard(pid)


def start_reaper() -> None:
    """As a pid namespace's init: reap orphans, never a child an owner waits for.

    Unreaped, orphans' zombies would count against the process limit until nothing, not even
    the agent, could start a thread.
    """
    threading.Thread(target=_reap, daemon=True, name="reaper").start()


def _reap() -> None:
    flags = os.WEXITED | os.WNOWAIT
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, flags)
        except ChildProcessError:
            time.sleep(0.1)
            continue
        except InterruptedError:
            continue
        if info is None:
            continue
        with spawn_lock:
            mine = info.si_pid in _owned
        if mine:
            time.sleep(0.05)  # its owner reaps it (and removes it from the set)
            continue
        try:
            os.waitpid(info.si_pid, os.WNOHANG)
        except ChildProcessError:
            pass
