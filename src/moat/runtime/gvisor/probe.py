"""Can the gvisor tier run on this host? A cached, bounded check.

Trust domain: host engine. The answer is None (yes) or a reason safe to show anyone (no host
paths: invariant 8). Besides static checks (runsc installed, root, cgroup controllers for the
limits) it really starts a sandbox on the chosen platform with ``runsc do true`` under a hard
timeout, because a platform can look available and still hang: runsc's kvm platform does on
these PVM-based machines.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import tempfile
from typing import Final

from moat.paths import state_dir
from moat.runtime.gvisor.hostcg import missing_controllers
from moat.runtime.gvisor.hostproc import kill_processes_of_root

__all__ = ["PLATFORMS", "PROBE_TIMEOUT", "probe", "runsc_path"]

#: Platforms of runsc moat accepts (``systrap`` arrived after the Debian 12 release).
PLATFORMS: Final = frozenset({"ptrace", "kvm", "systrap"})
#: Seconds a trial sandbox may take before the platform counts as unusable.
PROBE_TIMEOUT: Final = 20.0
#: The environment runsc runs with: nothing of the caller's (invariant 1).
RUNSC_ENV: Final = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def runsc_path(runsc: str = "runsc") -> str | None:
    """The runsc binary ``runsc`` names (a name on PATH or an absolute path), if any."""
    return (
        shutil.which(runsc, path=RUNSC_ENV["PATH"])
        if "/" not in runsc
        else (runsc if os.access(runsc, os.X_OK) else None)
    )


def probe(platform: str = "ptrace", runsc: str = "runsc") -> str | None:
    """None if gVisor sandboxes can run here on ``platform``, else why not. Cached."""
    if platform not in PLATFORMS:
        return f"gvisor: unknown runsc platform (choose one of {', '.join(sorted(PLATFORMS))})"
    return _probe(platform, runsc)


@functools.cache
def _probe(platform: str, runsc: str) -> str | None:
    exe = runsc_path(runsc)
    if exe is None:
        return "gvisor: runsc is not installed (Debian: apt-get install runsc)"
    if os.geteuid() != 0:
        return "gvisor: runsc needs root on this host (rootless runsc cannot enforce limits)"
    missing = missing_controllers()
    if missing:
        return f"gvisor: cgroup controllers unavailable for limits: {', '.join(missing)}"
    return _trial(exe, platform)


def _trial(exe: str, platform: str) -> str | None:
    base = state_dir() / "gvisor"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The owner's pid in the name: another engine's sweep leaves a live probe alone.
    root = tempfile.mkdtemp(dir=base, prefix=f".probe-{os.getpid()}-")
    argv = [exe, "--root", root, "--network=none", f"--platform={platform}", "do", "true"]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=RUNSC_ENV,
        cwd=root,
        start_new_session=True,
    )
    try:
        code = proc.wait(timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        # A hung platform leaves a sandbox process in its own session: find it by its root.
        kill_processes_of_root(root)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(root, ignore_errors=True)
    if code is None:
        return f"gvisor: a trial sandbox on the {platform} platform did not finish in time"
    if code != 0:
        return f"gvisor: a trial sandbox on the {platform} platform failed (exit {code})"
    return None
