"""The front door's logic on the fake runtime: fast (seconds), no isolation layer needed.

The fake runtime runs the real agent as a plain subprocess, so everything above the driver is
the real thing: validation, tenants, the guard's wiring, output caps, timeouts, reply checks.
Containment itself is tested on the real tiers (test_containment.py and friends).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

from moat.egress import Secret
from moat.engine.api import FrontDoor
from moat.errors import (
    InvalidArgumentError,
    NotFoundError,
    PolicyError,
    TimeoutError,
)
from moat.model import TIERS, TRUST_LEVELS, SandboxConfig, choose_tier
from moat.sdk.async_ import AsyncSandbox
from moat.testing import fake_front_door, local_transport
from moat.testing.fake import FakeRuntime

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def door() -> AsyncIterator[FrontDoor]:
    d = fake_front_door()
    yield d
    for s in list(d.engine.sessions.values()):
        await s.kill()


async def _sbx(door: FrontDoor, tenant: str = "default", **kw: Any) -> AsyncSandbox:
    return await AsyncSandbox.create(transport=local_transport(door, tenant), **kw)


# ------------------------------------------------------------------ the fake runtime itself


async def test_fake_runtime_is_refused_unless_asked_for_by_its_unsafe_name() -> None:
    with pytest.raises(PolicyError, match="unsafe_no_isolation"):
        FakeRuntime()
    with pytest.raises(PolicyError):
        FakeRuntime(unsafe_no_isolation=1)  # type: ignore[arg-type]


async def test_no_trust_level_or_isolation_reaches_the_fake_runtime() -> None:
    assert {choose_tier(None, t) for t in TRUST_LEVELS} <= set(TIERS)
    assert "fake" not in TIERS
    with pytest.raises(InvalidArgumentError):
        SandboxConfig(tier="fake")
    with pytest.raises(InvalidArgumentError):
        FrontDoor.resolve(isolation="fake")


async def test_fake_sandbox_runs_code_commands_and_files(door: FrontDoor) -> None:
    sbx = await _sbx(door)
    assert (await sbx.get_info()).tier == "fake"
    ex = await sbx.run_code("print('hi')\n6 * 7")
    assert ex.text == "42" and ex.logs.stdout == ["hi\n"] and ex.execution_count == 1
    res = await sbx.commands.run("echo out; echo err >&2")
    assert (res.exit_code, res.stdout, res.stderr) == (0, "out\n", "err\n")
    await sbx.files.write("a/b.txt", "content")
    assert await sbx.files.read("a/b.txt") == "content"
    names = [e.name for e in await sbx.files.list("a")]
    assert names == ["b.txt"]
    moved = await sbx.files.rename("a/b.txt", "c/d.txt")
    assert moved.name == "d.txt" and moved.type == "file"
    assert await sbx.files.read("c/d.txt") == "content"
    assert not await sbx.files.exists("a/b.txt")
    await sbx.kill()
    assert not await sbx.is_running()
    assert not door.engine.sessions


# ------------------------------------------------------------------------------ tenants


async def test_another_tenants_sandbox_is_not_found_like_an_unknown_id(door: FrontDoor) -> None:
    mine = await _sbx(door, "alice", metadata={"k": "v"})
    sid = mine.sandbox_id
    unknown = "sbx-" + "0" * 16

    async def message(tenant: str, sandbox_id: str) -> str:
        with pytest.raises(NotFoundError) as err:
            await door.info(tenant, sandbox_id)
        return str(err.value).replace(sandbox_id, "<id>")

    assert await message("bob", sid) == await message("bob", unknown)

    async def run_code() -> None:
        async for _ in door.run_code("bob", sid, "1"):
            pass

    for call in (
        run_code,
        lambda: door.read_file("bob", sid, "/etc/hostname"),
        lambda: door.list_dir("bob", sid, "."),
        lambda: door.start_command("bob", sid, "true"),
        lambda: door.set_timeout("bob", sid, 60),
        lambda: door.update_network("bob", sid, None),
        lambda: door.audit("bob", sid),
    ):
        with pytest.raises(NotFoundError):
            await call()
    with pytest.raises(NotFoundError):
        door.guard("bob", sid)
    assert await door.kill("bob", sid) is False  # and it still runs
    assert await door.is_running("alice", sid)
    assert [i.sandbox_id for i in await door.list_sandboxes("alice")] == [sid]
    assert await door.list_sandboxes("bob") == []
    assert await door.list_sandboxes("alice", metadata={"k": "other"}) == []
    assert await door.kill("alice", sid) is True
    assert [i.state for i in await door.list_sandboxes("alice", state="ended")] == ["ended"]
    assert await door.list_sandboxes("bob", state=None) == []


async def test_bad_tenant_and_bad_ids(door: FrontDoor) -> None:
    for tenant in ("", None, 3, "x" * 129):
        with pytest.raises(InvalidArgumentError):
            await door.info(tenant, "sbx-" + "0" * 16)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            await door.kill(tenant, "sbx-" + "0" * 16)  # type: ignore[arg-type]
    for sid in ("../etc", "", None, "SBX-UPPER", "x" * 100):
        with pytest.raises(NotFoundError):
            await door.info("t", sid)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- bad input


async def test_bad_input_is_invalid_argument_and_leaves_the_sandbox_usable(
    door: FrontDoor,
) -> None:
    sbx = await _sbx(door)
    sid = sbx.sandbox_id
    bad: list[Callable[[], Awaitable[object]]] = [
        lambda: sbx.run_code(123),  # type: ignore[arg-type]
        lambda: sbx.run_code("1", language="cobol"),
        lambda: sbx.run_code("1", timeout=-1),
        lambda: sbx.run_code("1", envs={"1BAD": "x"}),
        lambda: sbx.run_code("1", context="../x"),
        lambda: sbx.run_code("x" * (600 * 1024)),
        lambda: sbx.commands.run("true", cwd="a\0b"),
        lambda: sbx.files.read("a\0b"),
        lambda: sbx.files.read("x", format="yaml"),  # type: ignore[arg-type]
        lambda: sbx.files.list(".", depth=0),
        lambda: sbx.files.write("x", 3),  # type: ignore[arg-type]
        lambda: sbx.set_timeout(-1),  # (0 is valid: the timeout's action now)
        lambda: sbx.commands.kill("1"),  # type: ignore[arg-type]
        lambda: door.signal("default", sid, 1, "SIGFOO"),
        lambda: door.list_sandboxes("default", state="zombie"),
    ]
    for make in bad:
        with pytest.raises(InvalidArgumentError):
            await make()
    assert (await sbx.run_code("1 + 1")).text == "2"


async def test_bad_create_input(door: FrontDoor) -> None:
    bad: list[dict[str, Any]] = [
        {"trust": "paranoid"},
        {"isolation": "docker"},
        {"timeout": 0},
        {"envs": {"A": 1}},
        {"limits": {"memory_mb": 1}},
        {"limits": {"nope": 1}},
        {"metadata": {"k": 1}},
        {"template": "other"},
        {"max_output_bytes": 10},
        {"secrets": {"K": "not a Secret"}},
        {"sensitive": 42},
        {"guard": {"mode": "loud"}},
    ]
    for kw in bad:
        with pytest.raises(InvalidArgumentError):
            await _sbx(door, **kw)
    with pytest.raises(PolicyError):
        await _sbx(door, network={"allow_out": ["*"]})
    assert not door.engine.sessions


async def test_config_round_trips_through_json_with_secrets_by_reference() -> None:
    value = "tok-" + secrets.token_hex(12)
    cfg = FrontDoor.resolve(
        isolation="container",
        secrets={"API_KEY": Secret(value, hosts=["api.example.com"])},
        network={"allow_out": ["pypi.org"]},
        envs={"A": "1"},
        metadata={"m": "n"},
    )
    wire = cfg.to_dict()
    assert value not in repr(wire)
    assert SandboxConfig.from_dict(wire) == cfg
    with pytest.raises(InvalidArgumentError):
        SandboxConfig.from_dict({**wire, "extra": 1})
    with pytest.raises(InvalidArgumentError):
        SandboxConfig.from_dict({**wire, "timeout": "long"})
    with pytest.raises(InvalidArgumentError):
        SandboxConfig.from_dict({k: x for k, x in wire.items() if k != "tier"})


# ----------------------------------------------------------------- timeouts and output caps


async def test_timeout_interrupts_and_the_context_survives(door: FrontDoor) -> None:
    sbx = await _sbx(door)
    await sbx.run_code("x = 5")
    with pytest.raises(TimeoutError):
        await sbx.run_code("import time\ntime.sleep(30)", timeout=0.5)
    assert (await sbx.run_code("x")).text == "5"
    with pytest.raises(TimeoutError):
        await sbx.commands.run("sleep 30", timeout=0.5)
    assert await sbx.commands.list() == []


async def test_output_cap_counts_and_reports_truncation(door: FrontDoor) -> None:
    sbx = await _sbx(door, max_output_bytes=4096)
    seen: list[str] = []
    ex = await sbx.run_code("print('x' * 100_000)", on_stdout=seen.append)
    assert ex.truncated
    kept = sum(len(c) for c in ex.logs.stdout)
    assert 0 < kept <= 4096
    assert "truncated" in "".join(ex.logs.stderr)
    assert "".join(seen) == "".join(ex.logs.stdout)  # callbacks saw exactly what was kept
    res = await sbx.commands.run("head -c 100000 /dev/zero | tr '\\0' y")
    assert res.truncated and len(res.stdout) <= 4096


async def test_sandbox_lifetime_ends_it(door: FrontDoor) -> None:
    sbx = await _sbx(door, timeout=1)
    await asyncio.sleep(1.5)
    with pytest.raises(TimeoutError, match="lifetime"):
        await sbx.run_code("1")
    assert (await sbx.get_info()).state == "ended"
    assert not door.engine.sessions


async def test_set_timeout_zero_ends_the_sandbox_now(door: FrontDoor) -> None:
    """E2B's ``set_timeout(0)``: the timeout's action at once (its suite forces a timeout
    this way)."""
    sbx = await _sbx(door, timeout=600)
    other = await _sbx(door, timeout=600)  # positive control: untouched, still running
    await sbx.set_timeout(0)
    for _ in range(100):
        if (await sbx.get_info()).state == "ended":
            break
        await asyncio.sleep(0.05)
    assert (await sbx.get_info()).state == "ended"
    assert not await sbx.is_running()
    assert await other.is_running() and (await other.run_code("1 + 1")).text == "2"


# ---------------------------------------------------------------------------- guard wiring


async def test_every_reply_path_passes_the_guard(door: FrontDoor) -> None:
    value = "sensitive-" + secrets.token_hex(8)
    sbx = await _sbx(door, sensitive=[value])
    outs: list[str] = []
    ex = await sbx.run_code(
        f"v = {value!r}\nprint(v)\nimport sys\nprint(v, file=sys.stderr)\nv",
        on_stdout=outs.append,
    )
    assert value not in repr(ex) and value not in "".join(outs)
    assert "REDACTED" in "".join(ex.logs.stdout)
    err = await sbx.run_code("raise ValueError(v)")
    assert err.error is not None and value not in err.error.value + err.error.traceback
    res = await sbx.commands.run(f"echo {value}; echo {value} >&2")
    assert value not in res.stdout + res.stderr
    handle = await sbx.commands.run(f"sleep 0.2; echo {value}", background=True)
    assert value not in (await handle.wait()).stdout
    await sbx.files.write("f.txt", value)
    assert value not in await sbx.files.read("f.txt")
    assert value.encode() not in await sbx.files.read("f.txt", format="bytes")
    await sbx.files.write(f"{value}.txt", "x")
    listed = await sbx.files.list(".")
    assert value not in repr(listed)
    ctx = await sbx.create_code_context(cwd=".")
    assert value not in repr(await sbx.list_code_contexts()) + repr(ctx)
    procs = await sbx.commands.run(f"sleep 5 # {value}", background=True)
    assert value not in repr(await sbx.commands.list())
    await procs.kill()


async def test_block_mode_raises_and_releases_nothing(door: FrontDoor) -> None:
    from moat.errors import LeakBlockedError

    value = "blocked-" + secrets.token_hex(8)
    sbx = await _sbx(door, sensitive=[value], guard={"mode": "block"})
    seen: list[str] = []
    with pytest.raises(LeakBlockedError):
        await sbx.run_code(f"print({value!r})", on_stdout=seen.append)
    assert value not in "".join(seen)
    assert (await sbx.run_code("1")).text == "1"


# ------------------------------------------------------------------------- capabilities


async def test_missing_capabilities_raise_policy_error_naming_them(door: FrontDoor) -> None:
    sbx = await _sbx(door)
    sid = sbx.sandbox_id
    # The fake runtime is not Checkpointable: pause names the capability its tier lacks;
    # so do snapshot and fork. Resuming a running sandbox just answers its info.
    calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("sandboxes.pause", lambda: door.pause("default", sid)),
        ("sandboxes.snapshot", lambda: door.create_snapshot("default", sid)),
        ("sandboxes.snapshot", lambda: door.fork("default", sid, 2)),
    ]
    for name, call in calls:
        with pytest.raises(PolicyError, match=name.replace(".", r"\.")):
            await call()
    assert (await door.resume("default", sid)).state == "running"
    with pytest.raises(NotFoundError):  # another tenant learns nothing, not even that
        await door.pause("other", sid)


async def test_command_stdin_signal_and_close(door: FrontDoor) -> None:
    sbx = await _sbx(door)
    h = await sbx.commands.run("cat", background=True, stdin=True)
    await h.send_stdin("hello ")
    await door.close_stdin("default", sbx.sandbox_id, h.pid)
    assert (await h.wait(5)).stdout == "hello "
    h2 = await sbx.commands.run("sleep 30", background=True)
    assert await door.signal("default", sbx.sandbox_id, h2.pid, "SIGTERM")
    from moat.errors import CommandExitError

    with pytest.raises(CommandExitError) as exc:
        await h2.wait(5)
    assert exc.value.exit_code == 128 + 15


async def test_agent_error_messages_pass_the_guard(door: FrontDoor) -> None:
    # A FAIL's message is text chosen inside the sandbox (here: the agent repeats a path);
    # every request's FAIL passes the guard, not only those of run_code and commands.
    from moat.errors import SandboxError

    value = "sensitive-" + secrets.token_hex(8)
    sbx = await _sbx(door, sensitive=[value])
    with pytest.raises(SandboxError) as err:
        await sbx.create_code_context(cwd=f"/nonexistent/{value}")
    assert "nonexistent" in str(err.value)  # the message itself comes through
    assert value not in str(err.value)


async def test_reply_schemas_refuse_what_the_host_would_pass_on() -> None:
    # Invariant 6: each field of a reply has a type and a range, an enum or a pattern.
    from moat.protocol import MsgType, ProtocolError
    from moat.protocol.replies import check_reply, check_result_data

    entry = {
        "name": "a", "path": "/home/user/a", "type": "file", "size": 1, "mode": 0o644,
        "permissions": "-rw-r--r--", "mtime": 1.0, "uid": 1000, "gid": 1000,
    }  # fmt: skip
    assert check_reply(MsgType.FILE_STAT, entry) == entry
    for bad in (
        {**entry, "type": "secret-token-here"},
        {**entry, "permissions": "AKIA0123456789"},
        {**entry, "size": -1},
        {**entry, "mode": True},
        {**entry, "extra": "x"},
        {k: x for k, x in entry.items() if k != "path"},
    ):
        with pytest.raises(ProtocolError):
            check_reply(MsgType.FILE_STAT, bad)
    ctx = {"id": "abc123", "language": "python", "cwd": "/home/user"}
    assert check_reply(MsgType.CTX_CREATE, ctx) == ctx
    for wrong in ({**ctx, "language": "token"}, {**ctx, "id": "../x"}, {**ctx, "cwd": 3}):
        with pytest.raises(ProtocolError):
            check_reply(MsgType.CTX_CREATE, wrong)
    with pytest.raises(ProtocolError):
        check_reply(MsgType.CMD_START, {"exit_code": "0"})
    with pytest.raises(ProtocolError):
        check_reply(MsgType.CMD_LIST, {"processes": [{"pid": 1, "cmd": 5}]})
    with pytest.raises(ProtocolError):
        check_result_data({"exe": "x"})
    with pytest.raises(ProtocolError):
        check_result_data({"png": 5})


async def test_connect_reattaches_to_a_running_command(door: FrontDoor) -> None:
    sbx = await _sbx(door)
    first = await sbx.commands.run(
        "echo one; read line; echo two $line; exit 3", background=True, stdin=True
    )
    for _ in range(100):
        if "one" in first.stdout:
            break
        await asyncio.sleep(0.02)
    seen: list[str] = []
    again = await sbx.commands.connect(first.pid, on_stdout=seen.append)
    assert again.pid == first.pid
    await first.send_stdin("x\n")
    from moat.errors import CommandExitError

    for handle in (again, first):
        with pytest.raises(CommandExitError) as exc:
            await handle.wait(5)
        assert exc.value.exit_code == 3
    assert again.stdout == "two x\n" == "".join(seen)  # from the moment it connected
    assert first.stdout == "one\ntwo x\n"
    with pytest.raises(NotFoundError):
        await sbx.commands.connect(first.pid)  # it ended
    with pytest.raises(NotFoundError):
        await door.connect_command("other-tenant", sbx.sandbox_id, first.pid)


async def test_a_scan_past_its_budget_withholds_like_a_block(
    door: FrontDoor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 17 §3: GuardBudgetError is handled like a block: nothing released, a TimeoutError
    # raised, audited; the sandbox stays usable.
    from moat.guard import GuardBudgetError
    from moat.guard import budget as budget_mod

    sbx = await _sbx(door)
    costly = "('eyJa.b xoxb-1-2-a ' * 1000)"
    assert (await sbx.run_code(costly)).text  # positive control: within budget
    real = budget_mod._cpu
    now = [0.0]

    def cpu() -> float:  # every reading 10 s after the last: any budget runs out
        now[0] += 10.0
        return now[0]

    monkeypatch.setattr(budget_mod, "_cpu", cpu)
    seen: list[str] = []
    with pytest.raises(GuardBudgetError):
        await sbx.run_code(f"print({costly}, flush=True)", on_stdout=seen.append)
    with pytest.raises(TimeoutError):
        await sbx.run_code(costly)
    assert "xoxb" not in "".join(seen)
    monkeypatch.setattr(budget_mod, "_cpu", real)
    assert (await sbx.run_code("1")).text == "1"
    rows = await door.audit("default", sbx.sandbox_id)
    assert any(r.get("label") == "guard:budget" for r in rows)
