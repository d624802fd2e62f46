"""User code cannot take the agent over, on every tier (issue 17 "Takeover").

User code runs with the agent's uid. It probes the agent (the first ``moat.agent.main``
among its ancestors) the ways a takeover would start: write ``/proc/<agent>/mem``, reopen the
agent's host channel through ``/proc/<agent>/fd/*``, read its environment, ptrace-attach it,
stop or kill it with signals, ``kill -9 -1``. Every probe runs the same way against a process
user code started itself: the positive control that shows the probe works. From outside,
the host then checks the agent still answers on the same channel (a reopened channel written
to by user code would end the sandbox with a protocol error).
"""

from __future__ import annotations

import json

import pytest

from moat import Sandbox

#: Probes a tier does not stop, documented where the tier is. gVisor's /proc ignores
#: non-dumpable and lists /proc/<agent> under the agent's effective uid (the user's): its
#: environment, which is exactly the user's own (spec.env(), invariant 1), stays readable.
KNOWN_GAPS: dict[str, frozenset[str]] = {"gvisor": frozenset({"environ"})}

PROBE = r"""
import ctypes, json, os, signal, subprocess, sys, time

def agent_pid():
    pid = os.getpid()
    while pid > 1:
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"moat.agent.main" in f.read():
                    return pid
        except OSError:
            pass
    return 1

def state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]

def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return f"errno {e.errno}"

libc = ctypes.CDLL(None, use_errno=True)

def ptrace(pid):
    if libc.ptrace(16, pid, 0, 0) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")
    time.sleep(0.1)
    libc.ptrace(17, pid, 0, 0)  # PTRACE_DETACH

def open_fds(pid):
    # the agent's host channel: fds 3 and 4 (main.py dups its stdin/stdout or opens the
    # port first) and its stderr; the control's stdin is a pipe
    names = ["0"] if pid != target else ["2", "3", "4"]
    opened = 0
    for name in names:
        try:
            os.close(os.open(f"/proc/{pid}/fd/{name}", os.O_RDWR | os.O_NONBLOCK))
            opened += 1
        except OSError:
            pass
    if not opened:
        raise PermissionError(13, "no fd reopened")

def mem(pid):
    with open(f"/proc/{pid}/mem", "rb", buffering=0):  # reading needs what writing needs
        pass

def environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        f.read()

def stop(pid):
    os.kill(pid, signal.SIGSTOP)
    time.sleep(0.3)
    st = state(pid)
    os.kill(pid, signal.SIGCONT)
    if st != "T":
        raise PermissionError(1, "not stopped")

def sigkill(pid):
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    try:
        if state(pid) != "Z":
            raise PermissionError(1, "still alive")
    except FileNotFoundError:
        pass

def probe(pid):
    out = {}
    for name, fn in (("mem", mem), ("fd", open_fds), ("environ", environ), ("ptrace", ptrace),
                     ("stop", stop), ("int", lambda p: os.kill(p, signal.SIGINT)),
                     ("term", lambda p: os.kill(p, signal.SIGTERM)), ("kill", sigkill)):
        out[name] = attempt(lambda: fn(pid))
    return out

target = agent_pid()
r, w = os.pipe()
ctl = subprocess.Popen(["sleep", "60"], stdin=r)
time.sleep(0.2)
print(json.dumps({"agent": target, "me": os.getpid(),
                  "control": probe(ctl.pid), "agent_probe": probe(target)}), flush=True)
"""


@pytest.mark.parametrize("how", ["command", "run_code"])
def test_user_code_cannot_take_the_agent_over(tier: str, how: str) -> None:
    with Sandbox.create(isolation=tier, timeout=120) as s:
        s.files.write("/tmp/probe.py", PROBE)
        if how == "command":
            out = s.commands.run("python3 /tmp/probe.py", timeout=60).stdout
        else:  # from the kernel: a fork of the agent that never exec'd
            ex = s.run_code("exec(open('/tmp/probe.py').read())", timeout=60)
            assert ex.error is None, ex.error
            out = "".join(ex.logs.stdout)
        report = json.loads(out.strip().splitlines()[-1])
        control, agent = report["control"], report["agent_probe"]
        # positive controls: each probe works against a process user code started itself
        # (ptrace is refused by the seccomp filter for every target)
        for name in ("mem", "fd", "environ", "stop", "kill"):
            assert control[name] == "ok", (name, report)
        gaps = KNOWN_GAPS.get(tier, frozenset())
        for name in ("mem", "fd", "environ", "ptrace"):
            if name not in gaps:
                assert agent[name].startswith("errno"), (name, report)
        for name in ("stop", "kill"):
            assert agent[name] != "ok", (name, report)
        # from outside: the same agent answers on its untouched channel
        assert s.commands.run("echo alive").stdout == "alive\n"
        assert s.run_code("6 * 7").text == "42"
        assert s.is_running()


def test_kill_all_from_user_code_leaves_the_agent(tier: str) -> None:
    with Sandbox.create(isolation=tier, timeout=120) as s:
        assert s.run_code("1 + 1").text == "2"
        # stop, then kill, everything user code may signal (the shell itself is spared)
        out = s.commands.run(
            "sleep 100 & s=$!; kill -STOP -1; kill -9 -1; r=$?; sleep 0.2; "
            "kill -0 $s 2>/dev/null && echo sleep=alive || echo sleep=gone; kill -9 $s; "
            "echo kill=$r",
            timeout=30,
        ).stdout
        if tier == "gvisor":  # -1 is refused outright there (runtime/gvisor/oci.py)
            assert out == "sleep=alive\nkill=1\n"
        else:  # positive control: the signals reached user processes
            assert out == "sleep=gone\nkill=0\n"
        assert s.commands.run("echo alive").stdout == "alive\n"
        assert s.is_running()
        # the default context's kernel died with everything else; the next cell restarts it
        ex = s.run_code("1 + 1")
        if ex.error is not None:
            assert ex.error.name == "ContextDied", ex.error
            ex = s.run_code("1 + 1")
        assert ex.text == "2"
