"""Lifecycle, tier selection, bad input, the async API and a hostile agent."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from tests.conftest import require_tier
from tests.killcheck import cgroup_dirs

import moat
from moat import (
    AsyncSandbox,
    InvalidArgumentError,
    IsolationUnavailableError,
    Limits,
    Mount,
    NotFoundError,
    PolicyError,
    Sandbox,
    SandboxDiedError,
    TimeoutError,
)
from moat.engine.client import AgentClient
from moat.engine.tiers import choose_tier, runtime_for
from moat.protocol import Frame, MsgType, encode


def test_public_names() -> None:
    assert set(moat.__all__) >= {
        "Sandbox", "AsyncSandbox", "Execution", "Result", "Logs", "ExecutionError",
        "CommandResult", "Limits", "Mount", "SandboxError", "TimeoutError", "NotFoundError",
        "IsolationUnavailableError", "PolicyError", "InvalidArgumentError", "CommandExitError",
        "SandboxDiedError",
    }  # fmt: skip
    for name in moat.__all__:
        assert getattr(moat, name) is not None


def test_trust_maps_to_tier() -> None:
    assert choose_tier(None, "trusted") == "container"
    assert choose_tier(None, "semi-trusted") == "gvisor"
    assert choose_tier(None, "untrusted") == "microvm"
    assert choose_tier("container", "untrusted") == "container"  # explicit override
    with pytest.raises(InvalidArgumentError):
        choose_tier("docker", "trusted")


def test_default_is_the_deepest_tier_or_an_error_never_a_downgrade() -> None:
    reason = runtime_for("microvm").probe()
    if reason is None:  # here: the default really is a microVM
        with Sandbox.create(timeout=60) as s:
            assert s.get_info().tier == "microvm"
    else:
        with pytest.raises(IsolationUnavailableError, match="microvm"):
            Sandbox.create()  # default trust is "untrusted" -> microvm


def test_missing_tool_makes_tier_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    from moat.engine import tiers
    from moat.runtime.container import ContainerRuntime

    monkeypatch.setenv("PATH", "/nonexistent")
    reason = ContainerRuntime().probe()
    assert reason is not None and "bubblewrap" in reason
    monkeypatch.setattr(tiers, "runtime_for", lambda tier: ContainerRuntime())
    with pytest.raises(IsolationUnavailableError, match="container"):
        tiers.require("container")


def test_bad_policies_are_refused_before_start() -> None:
    for bad in (
        {"allow_out": ["*"]},
        {"allow_out": ["*.com"]},
        {"allow": ["x.org"]},
        {"allow_out": "pypi.org"},
    ):
        with pytest.raises((PolicyError, InvalidArgumentError)):
            Sandbox.create(isolation="container", network=bad)
    with pytest.raises(InvalidArgumentError):
        Sandbox.create(isolation="container", secrets={"K": "plain string"})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": "10"},
        {"timeout": -1},
        {"isolation": "docker"},
        {"trust": "maybe"},
        {"template": "nope"},
        {"envs": {"BAD NAME": "x"}},
        {"envs": {"A": 1}},
        {"envs": ["A=1"]},
        {"limits": {"memory_mb": 1}},
        {"limits": {"cpus": "all"}},
        {"limits": {"what": 1}},
        {"mounts": ["/etc:/etc"]},
        {"metadata": {"k": 1}},
    ],
)
def test_bad_create_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        Sandbox.create(**kwargs)  # type: ignore[arg-type]


def test_mount_validation() -> None:
    for bad in (
        ("rel", "/x"),
        ("/x", "rel"),
        ("/x", "/usr/lib"),
        ("/x", "/"),
        ("/x/../y", "/z"),
        ("/x", "/opt/moat/moat"),
    ):
        with pytest.raises(InvalidArgumentError):
            Mount(*bad)
    assert Mount("/srv", "/data").read_only is True


@pytest.mark.container
def test_bad_call_arguments_leave_sandbox_healthy(shared_sbx: Sandbox) -> None:
    with pytest.raises(InvalidArgumentError):
        shared_sbx.run_code("x" * (100 * 1024 * 1024))
    with pytest.raises(InvalidArgumentError):
        shared_sbx.run_code(123)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        shared_sbx.run_code("1", language="cobol")
    with pytest.raises(InvalidArgumentError):
        shared_sbx.run_code("1", timeout=0)
    with pytest.raises(InvalidArgumentError):
        shared_sbx.run_code("1", context="../../etc")
    with pytest.raises(InvalidArgumentError):
        shared_sbx.run_code("1", on_stdout="print")
    with pytest.raises(NotFoundError):
        shared_sbx.run_code("1", context="doesnotexist")
    with pytest.raises(InvalidArgumentError):
        shared_sbx.commands.run(["ls"])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        shared_sbx.commands.run("ls", envs={"A B": "x"})
    with pytest.raises(InvalidArgumentError):
        shared_sbx.files.write("x" * 5000, "data")
    assert shared_sbx.run_code("'healthy'").text == "healthy"


@pytest.mark.container
def test_info_timeout_and_calls_after_kill() -> None:
    require_tier("container")
    s = Sandbox.create(
        isolation="container", timeout=30, metadata={"user": "alice"}, limits=Limits(memory_mb=256)
    )
    info = s.get_info()
    assert info.tier == "container" and info.sandbox_id == s.sandbox_id
    assert info.metadata == {"user": "alice"} and info.limits.memory_mb == 256
    assert 25 < (info.end_at - info.started_at).total_seconds() <= 30.5
    created = [r for r in s.audit() if r.get("kind") == "sandbox"]
    assert created and created[0]["tier"] == "container" and created[0]["result"] == "created"
    s.set_timeout(120)
    assert (s.get_info().end_at - info.end_at).total_seconds() > 60
    assert s.is_running()
    s.kill()
    s.kill()  # idempotent
    ended = [r for r in s.audit() if r.get("kind") == "sandbox" and r["result"] == "ended"]
    assert len(ended) == 1 and ended[0]["tier"] == "container"
    assert not s.is_running()
    with pytest.raises(NotFoundError):
        s.run_code("1")
    with pytest.raises(NotFoundError):
        s.files.read("x")
    with pytest.raises(NotFoundError):
        s.commands.run("true")


@pytest.mark.container
def test_lifetime_timeout_kills_the_sandbox() -> None:
    require_tier("container")
    s = Sandbox.create(isolation="container", timeout=2)
    assert s.run_code("1").text == "1"
    time.sleep(3)
    assert not s.is_running()
    with pytest.raises(TimeoutError):
        s.run_code("1")


@pytest.mark.container
def test_async_api() -> None:
    require_tier("container")

    async def main() -> None:
        chunks: list[str] = []

        async def on_out(text: str) -> None:
            chunks.append(text)

        async with await AsyncSandbox.create(isolation="container", timeout=60) as a:
            ex = await a.run_code("print('hi')\n6 * 7", on_stdout=on_out)
            assert ex.text == "42" and chunks == ["hi\n"]
            r = await a.commands.run("echo async")
            assert r.stdout == "async\n"
            await a.files.write("f.txt", b"bytes")
            assert await a.files.read("f.txt", format="bytes") == b"bytes"
            # concurrent calls on one sandbox: a command while code runs
            slow = asyncio.create_task(a.run_code("import time; time.sleep(1); 'slow'"))
            fast = await a.commands.run("echo fast")
            assert fast.stdout == "fast\n" and not slow.done()
            assert (await slow).text == "slow"
        assert not await a.is_running()

    asyncio.run(main())


# -- a hostile agent, speaking over real pipes to the real host-side client ----------------


class _PipeProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None and proc.stdin is not None
        self.proc, self.reader, self.writer = proc, proc.stdout, proc.stdin

    async def kill(self) -> None:
        self.proc.kill()
        await self.proc.wait()

    def alive(self) -> bool:
        return self.proc.returncode is None

    def stats(self) -> dict[str, int]:
        return {}


async def _hostile(script: str) -> tuple[AgentClient, _PipeProcess, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    deaths: list[str] = []
    pp = _PipeProcess(proc)
    return AgentClient(pp, deaths.append), pp, deaths


READY = encode(Frame(MsgType.READY, 0, {"version": 1}))


def _agent_script(first: bytes, answer: bytes | None = None) -> str:
    """A fake agent: writes ``first``, then (after one byte of request) ``answer``, then idles."""
    lines = ["import sys, time", f"sys.stdout.buffer.write({first!r}); sys.stdout.flush()"]
    if answer is not None:
        lines.append("sys.stdin.buffer.read(1)")
        lines.append(f"sys.stdout.buffer.write({answer!r}); sys.stdout.flush()")
    lines.append("time.sleep(30)")
    return "\n".join(lines)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff",  # absurd length
        b"\x00\x00\x00\x08\x00\x00\x00\x04nope",  # not JSON
        encode(Frame(MsgType.EXEC, 1, {"context": "x", "language": "python", "code": ""})),
    ],
)
def test_malformed_agent_frame_ends_the_sandbox(garbage: bytes) -> None:
    async def main() -> None:
        script = _agent_script(READY, garbage)
        client, pp, deaths = await _hostile(script)
        await client.wait_ready(5)
        with pytest.raises(SandboxDiedError):
            await client.request(MsgType.PING, {}, timeout=5)
        assert deaths and "protocol" in deaths[0]
        await client.close()
        await pp.kill()

    asyncio.run(main())


def test_silent_agent_ends_the_sandbox() -> None:
    async def main() -> None:
        script = _agent_script(READY)
        client, pp, deaths = await _hostile(script)
        await client.wait_ready(5)
        with pytest.raises(SandboxDiedError, match="stopped answering"):
            await client.request(MsgType.PING, {}, timeout=0.5)
        assert deaths
        await client.close()
        await pp.kill()

    asyncio.run(main())


def test_agent_that_never_starts() -> None:
    async def main() -> None:
        client, pp, _ = await _hostile("import time; time.sleep(30)")
        with pytest.raises(SandboxDiedError, match="did not start"):
            await client.wait_ready(0.5)
        await client.close()
        await pp.kill()

    asyncio.run(main())


def test_positive_control_well_behaved_agent() -> None:
    async def main() -> None:
        done = encode(Frame(MsgType.DONE, 1, {}))
        script = _agent_script(READY, done)
        client, pp, deaths = await _hostile(script)
        await client.wait_ready(5)
        assert await client.request(MsgType.PING, {}, timeout=5) == {}
        assert not deaths
        await client.close()
        await pp.kill()

    asyncio.run(main())


_EXIT_PROGRAMS = {
    "async": """
import asyncio, os, sys
from moat import AsyncSandbox
async def main():
    for _ in range(int(sys.argv[1])):
        s = await AsyncSandbox.create(isolation="container", timeout=120)
        assert (await s.run_code("1+1")).text == "2"
        if sys.argv[2] == "kill":
            await s.kill()
asyncio.run(main())
print(os.getpid())
""",
    "sync": """
import os, sys
from moat import Sandbox
for _ in range(int(sys.argv[1])):
    s = Sandbox.create(isolation="container", timeout=120)
    assert s.run_code("1+1").text == "2"
    if sys.argv[2] == "kill":
        s.kill()
print(os.getpid())
""",
    # Two engines on one loop (a program with two front doors): each one's loop watcher
    # waited for the other's until its 10 s deadline at the loop's end.
    "two-engines": """
import asyncio, os, sys, time
from moat.engine.api import FrontDoor
from moat.engine.engine import Engine
from moat.sdk.async_ import AsyncSandbox
from moat.testing import local_transport
ended = []
async def main():
    for _ in range(int(sys.argv[1])):
        door = FrontDoor(Engine(pool={}))
        s = await AsyncSandbox.create(
            isolation="container", timeout=120, transport=local_transport(door)
        )
        assert (await s.run_code("1+1")).text == "2"
        if sys.argv[2] == "kill":
            await s.kill()
    ended.append(time.monotonic())
asyncio.run(main())
print("shutdown", time.monotonic() - ended[0], file=sys.stderr)
print(os.getpid())
""",
}


def _leftovers(pid: int, state_dir: Path) -> list[str]:
    """What a program with ``pid`` left on the host: cgroups named with its pid, processes in
    them, and files in its state dir other than the shared ones (audit, agent, template)."""
    tag = f".{pid}."
    found = [
        str(p)
        for p in cgroup_dirs(lambda n: n.startswith("sbx-") and tag in n)
        if p.parent.name == "moat"
    ]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if tag in (proc / "cgroup").read_text():
                    found.append(f"process {proc.name}")
            except OSError:
                pass
    for f in state_dir.rglob("*"):
        rel = f.relative_to(state_dir).parts
        if (
            rel[0] not in ("agent", "template")
            and not rel[0].startswith("audit.db")
            and (f.is_file() or f.is_symlink())
        ):
            found.append(f"file {f}")
    found += [line for line in Path("/proc/mounts").read_text().splitlines() if "sbx-" in line]
    return found


@pytest.mark.container
@pytest.mark.parametrize(
    ("sdk", "n", "how"),
    [
        ("async", 50, "kill"),
        ("async", 10, "exit"),
        ("sync", 20, "kill"),
        ("sync", 10, "exit"),
        ("two-engines", 2, "exit"),
    ],
)
def test_a_program_that_ends_leaves_nothing(sdk: str, n: int, how: str) -> None:
    """Invariant 5 at a program's end, the warm pool's sandbox included: no message, and
    nothing of the program's (cgroup, process, mount, state file), checked from outside."""
    require_tier("container")
    # Its own state dir, readable by the sandbox uids (pytest's tmp_path is 0700).
    state = Path(tempfile.mkdtemp(prefix="moat-exit-"))
    state.chmod(0o755)
    env = {
        **os.environ,
        "MOAT_STATE_DIR": str(state),
        "MOAT_WARM_POOL": "container=1",
        "PYTHONWARNINGS": "default",  # ResourceWarning and friends would show
    }
    env.pop("MOAT_AUDIT_DB", None)
    out = subprocess.run(
        [sys.executable, "-c", _EXIT_PROGRAMS[sdk], str(n), how],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    try:
        assert out.returncode == 0, out.stderr
        # No "Task was destroyed but it is pending", no warning; a start-up sweep of what
        # another (crashed) process left may speak, and is not this program's doing.
        said = [x for x in out.stderr.splitlines() if not re.match(r"swept \d+ leftover", x)]
        if sdk == "two-engines":  # the loop's end: two container kills, not a deadline
            took = float(said.pop(-1).removeprefix("shutdown "))
            assert took < 5.0, took
        assert said == []
        assert _leftovers(int(out.stdout.split()[-1]), state) == []
    finally:
        shutil.rmtree(state, ignore_errors=True)
