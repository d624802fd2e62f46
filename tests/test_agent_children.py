"""The agent as init: every exited child is reaped, owned children's statuses reach their owners.

The agent is its pid namespace's init on every tier, so orphans of user code become its
children. Its reaper used to leave a child the agent owns (a command, a code context's kernel)
for the owner to reap; while that child was a zombie nobody waited for (a kernel killed
between calls), ``waitid`` kept returning it and the orphans behind it were never reaped:
zombies piled up against the process limit. Now the reaper reaps every exited child and hands
owned ones' statuses over (``moat.agent.shield.Child``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.killcheck import descendants

from moat import CommandExitError, Sandbox, testing

#: Counts zombies in the sandbox's pid namespace (its /proc), and prints the parent of an
#: orphan (the control: orphans are the agent's children).
ZOMBIES = r"""
import os
n = 0
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            n += open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            pass
print(n)
"""


def _host_pids(s: Sandbox) -> list[int]:
    """The sandbox's processes as the host sees them (the container's and gVisor's)."""
    proc = testing.session_of(s).proc
    cgroup = getattr(proc, "cgroup", None) or proc._cgroup  # type: ignore[union-attr]
    pids: list[int] = cgroup.pids()
    return pids


def _host_state(pid: int) -> tuple[str, int]:
    """(state, utime + stime in clock ticks) of a host process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[11]) + int(fields[12])


def _host_cpu(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += _host_state(pid)[1]
        except OSError:
            pass
    return total


def test_orphans_reaped_and_statuses_exact_while_an_owned_child_is_a_zombie(tier: str) -> None:
    with Sandbox.create(isolation=tier, timeout=180) as s:
        s.files.write("/tmp/zombies.py", ZOMBIES)
        # control: an orphan of user code becomes the agent's (pid 1's) child
        ppid = s.commands.run(
            "(sleep 2 & echo $! > /tmp/orphan); sleep 0.3; ps -o ppid= -p $(cat /tmp/orphan) "
            "|| awk '{print $4}' /proc/$(cat /tmp/orphan)/stat"
        ).stdout.split()
        assert ppid == ["1"]
        # the default context's kernel is a child the agent owns; killed between calls, it is
        # a zombie no owner waits for until the next run_code
        kernel = s.run_code("import os; os.getpid()").text
        assert kernel is not None and kernel.isdigit()
        s.commands.run(f"kill -9 {kernel}")
        # orphans keep coming while commands run and report their exact statuses
        orphans = s.commands.run(
            "for i in $(seq 30); do (sleep 0.05 &); sleep 0.02; done", background=True
        )
        for code in (3, 0, 7, 42, 1):
            try:
                s.commands.run(f"(sleep 0.01 &); exit {code}")
                got = 0
            except CommandExitError as exc:
                got = exc.exit_code
            assert got == code
        orphans.wait()
        time.sleep(0.5)
        assert s.commands.run("python3 /tmp/zombies.py").stdout.split() == ["0"]
        if tier in ("container", "gvisor"):
            # from outside, while nothing runs: no zombie on the host (container), and the
            # agent does not spin (its reaper blocks in waitid)
            pids = _host_pids(s)
            if tier == "container":
                below = {p for root in pids for p in descendants(root)} | set(pids)
                states = {}
                for p in below:
                    try:
                        states[p] = _host_state(p)[0]
                    except OSError:
                        pass
                assert "Z" not in states.values(), states
            ticks = _host_cpu(pids)
            time.sleep(3)
            used = (_host_cpu(pids) - ticks) / os.sysconf("SC_CLK_TCK")
            assert used < 0.3, f"{used:.2f} s of CPU in 3 s idle"
        # the killed kernel's status reached its owner: the context restarts and serves
        execution = s.run_code("1 + 1")
        if execution.error is not None:  # the dead kernel is found and replaced first
            assert execution.error.name == "ContextDied"
            execution = s.run_code("1 + 1")
        assert execution.text == "2"


#: What a command's processes run under, printed by a grandchild the shell forks at once.
LIMITS = (
    "(python3 -c 'import os, resource; print(*resource.getrlimit(resource.RLIMIT_NPROC), "
    'os.getresuid()[0], os.getresuid()[2], open("/proc/self/oom_score_adj").read().strip())\'); '
    "true"
)


def _agent_nproc_from_outside(s: Sandbox) -> int:
    """The container agent's RLIMIT_NPROC read from the host: bwrap's child in its cgroup."""
    for pid in _host_pids(s):
        if Path(f"/proc/{pid}/comm").read_text().strip() == "python3":
            for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
                if line.startswith("Max processes"):
                    return int(line.split()[2])
    raise AssertionError("no agent among the sandbox's processes")


def test_user_code_runs_under_its_limits_from_the_start(tier: str) -> None:
    """Commands and new kernels start without a preexec_fn (moat.agent.shield.user_shell): the
    limits still hold for everything user code forks, on the fast path and on the fork path
    (an environment bash acts on at start-up), and the user's process limit stays below the
    agent's (its reserve)."""
    with Sandbox.create(isolation=tier, timeout=120) as s:
        fast = s.commands.run(LIMITS).stdout.split()
        slow = s.commands.run(LIMITS, envs={"BASH_ENV": "/dev/null"}).stdout.split()
        ctx = s.create_code_context()
        kernel = s.run_code(
            "import os, resource; print(*resource.getrlimit(resource.RLIMIT_NPROC), "
            "os.getresuid()[0], os.getresuid()[2], "
            'open("/proc/self/oom_score_adj").read().strip())',
            context=ctx,
        ).logs.stdout
        # the fast path is taken where nothing runs before the shell's first command
        assert "ulimit -HSu" in s.commands.run('echo "$BASH_EXECUTION_STRING"').stdout
        assert (
            "ulimit"
            not in s.commands.run(
                'echo "$BASH_EXECUTION_STRING"', envs={"BASH_ENV": "/dev/null"}
            ).stdout
        )
        soft, hard = int(fast[0]), int(fast[1])
        assert soft == hard and 0 < soft < 1024  # the user's limit, soft and hard
        assert fast == slow == kernel[0].split()
        assert fast[2:] == ["1000", "1000", "1000"]  # uid (real and saved), OOM first
        # a fork of user code is refused at that limit, not the agent's (the reserve)
        if tier == "container":
            assert _agent_nproc_from_outside(s) > hard
