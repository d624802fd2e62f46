"""Invariant 5 when the HOST process dies: nothing keeps running, the next start sweeps.

A real child Python process creates a sandbox with a long-running command and is killed with
SIGKILL (no cleanup code runs); the check is made from outside.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.killcheck import cgroup_dirs
from tests.test_containment import sandbox_procs

SCRIPT = """
import sys
from moat import Sandbox
s = Sandbox.create(isolation=sys.argv[1], timeout=600)
s.commands.run("sleep 600", background=True)
print("ready", flush=True)
sys.stdin.read()
"""


NEXT_START = """
import sys
from moat import Sandbox
with Sandbox.create(isolation=sys.argv[1], timeout=60) as s:
    print(s.run_code("1 + 1").text)
"""


def _child_env(**extra: str) -> dict[str, str]:
    """The child engines write their own audit store: killing a process that shares this
    one is not what these tests are about (see the closing note of the session)."""
    audit = Path(tempfile.gettempdir()) / f"moat-test-audit-{os.getpid()}.db"
    return {**os.environ, "MOAT_AUDIT_DB": str(audit), **extra}


def _cgroups_of(pid: int) -> list[Path]:
    return [p for p in cgroup_dirs(lambda n: f".{pid}." in n) if p.parent.name == "moat"]


def test_host_crash_leaves_nothing_running(tier: str) -> None:
    before = sandbox_procs()
    child = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, tier],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
        env=_child_env(),
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        during = sandbox_procs() - before
        assert during  # positive control: the sandbox is running, seen from outside
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 10
        while sandbox_procs() & during and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not sandbox_procs() & during, "sandbox processes outlived their host process"
        # what a crash cannot clean up itself (cgroups) the next engine's start sweeps
        next_start = subprocess.run(
            [sys.executable, "-c", NEXT_START, tier],
            capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
            env=_child_env(),
        )  # fmt: skip
        assert next_start.stdout.strip() == "2", next_start.stderr[-2000:]
        assert not _cgroups_of(child.pid)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()


CLEAN_EXIT = """
import sys
from moat import Sandbox
s = Sandbox.create(isolation=sys.argv[1], timeout=600)  # never killed by the program
s.commands.run("sleep 600", background=True)
print(s.run_code("1 + 1").text, flush=True)
"""


def test_interpreter_exit_without_kill_leaves_nothing(tier: str) -> None:
    """A program that forgets kill(): its sandboxes (and a warm-pool start) die at exit."""
    before = sandbox_procs()
    with subprocess.Popen(
        [sys.executable, "-c", CLEAN_EXIT, tier],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).parent.parent, env=_child_env(MOAT_WARM_POOL="container=1"),
    ) as child:  # fmt: skip
        stdout, stderr = child.communicate(timeout=120)
    assert stdout.strip() == "2", stderr[-2000:]
    assert "Task was destroyed" not in stderr and "Traceback" not in stderr
    assert not _cgroups_of(child.pid)  # removed at exit, not left for a sweep
    deadline = time.monotonic() + 10
    while sandbox_procs() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sandbox_procs() - before
