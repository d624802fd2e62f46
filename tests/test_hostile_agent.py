"""The host against a taken-over agent (invariant 6, issue 17 §2): fast, on a scripted agent.

``HostileRuntime`` runs tests/hostile_agent.py in place of the agent: it answers each request
with the frames a test scripts, as user code that took the agent over could. Every check is
made from outside: what reached the caller, and whether the sandbox was ended.
"""

from __future__ import annotations

import asyncio
import json
import resource
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from moat.engine.api import FrontDoor
from moat.engine.engine import Engine
from moat.errors import SandboxDiedError, SandboxError
from moat.runtime.spec import SandboxSpec
from moat.sdk.async_ import AsyncSandbox
from moat.testing import local_transport
from moat.testing.fake import FakeProcess, FakeRuntime

pytestmark = pytest.mark.asyncio

_HERE = Path(__file__).resolve().parent
_SRC = str(_HERE.parent / "src")


class HostileRuntime(FakeRuntime):
    """The fake runtime, with tests/hostile_agent.py as its agent, following ``script``."""

    def __init__(self, script: dict[str, Any]) -> None:
        super().__init__(unsafe_no_isolation=True)
        self.script = script

    async def start(self, spec: SandboxSpec) -> FakeProcess:
        home = await asyncio.to_thread(lambda: __import__("tempfile").mkdtemp(prefix="moat-h-"))
        env = {"PYTHONPATH": _SRC, "MOAT_HOSTILE": json.dumps(self.script), "PATH": "/usr/bin"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(_HERE / "hostile_agent.py"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
            cwd=home,
            start_new_session=True,
        )
        return FakeProcess(proc, home)


async def _hostile(script: dict[str, Any], **kw: Any) -> tuple[FrontDoor, AsyncSandbox]:
    door = FrontDoor(Engine(pool={}, runtime=HostileRuntime(script)))
    sbx = await AsyncSandbox.create(transport=local_transport(door), **kw)
    return door, sbx


async def _end(door: FrontDoor) -> None:
    for s in list(door.engine.sessions.values()):
        await s.kill()


async def _ended(sbx: AsyncSandbox) -> bool:
    """Whether the sandbox ends within a second (its kill runs as a task)."""
    for _ in range(50):
        if (await sbx.get_info()).state == "ended":
            return True
        await asyncio.sleep(0.02)
    return False


def _fail(value: str) -> list[list[Any]]:
    return [["fail", {"kind": "not_found", "message": f"no such thing: {value}"}]]


async def test_every_fail_message_passes_the_guard() -> None:
    v = "sensitive-" + secrets.token_hex(8)
    verbs = ["file_remove", "file_mkdir", "file_stat", "file_list", "ctx_list", "ctx_create"]
    verbs += ["ctx_remove", "ctx_restart", "cmd_kill", "cmd_list", "file_move", "file_read"]
    door, sbx = await _hostile({k: _fail(v) for k in verbs}, sensitive=[v])
    try:
        calls: list[Any] = [
            lambda: sbx.files.remove("a"),
            lambda: sbx.files.make_dir("a"),
            lambda: sbx.files.get_info("a"),
            lambda: sbx.files.list("a"),
            lambda: sbx.files.rename("a", "b"),
            lambda: sbx.files.read("a"),
            lambda: sbx.list_code_contexts(),
            lambda: sbx.create_code_context(),
            lambda: sbx.commands.list(),
        ]
        for call in calls:
            with pytest.raises(SandboxError) as err:
                await call()
            assert "no such thing" in str(err.value)  # positive control: the message came
            assert v not in str(err.value) and v not in repr(err.value.args)
        assert not await sbx.commands.kill(5)  # not_found: False, nothing of the message
    finally:
        await _end(door)
    door, sbx = await _hostile(
        {"cmd_kill": [["fail", {"kind": "io", "message": v}]]}, sensitive=[v]
    )
    try:
        with pytest.raises(SandboxError) as err:
            await sbx.commands.kill(5)
        assert v not in str(err.value) and "REDACTED" in str(err.value)
        assert (await sbx.get_info()).state == "running"
    finally:
        await _end(door)


_ENTRY = {
    "name": "a", "path": "/home/user/a", "type": "file", "size": 1, "mode": 0o644,
    "permissions": "-rw-r--r--", "mtime": 1.0,
}  # fmt: skip


async def test_names_paths_cwds_and_commands_pass_the_guard() -> None:
    v = "sensitive-" + secrets.token_hex(8)
    entry = {**_ENTRY, "name": v, "path": f"/home/user/{v}", "symlink_target": f"/x/{v}"}
    ctx = {"id": "c1", "language": "python", "cwd": f"/home/{v}"}
    script = {
        "file_stat": [["done", entry]],
        "file_list": [["done", {"entries": [entry, entry]}]],
        "ctx_list": [["done", {"contexts": [ctx]}]],
        "ctx_create": [["done", ctx]],
        "cmd_list": [["done", {"processes": [{"pid": 7, "cmd": f"sleep 1 {v}"}]}]],
    }
    door, sbx = await _hostile(script, sensitive=[v])
    try:
        got = [
            await sbx.files.get_info("a"),
            await sbx.files.list("."),
            await sbx.list_code_contexts(),
            await sbx.create_code_context(),
            await sbx.commands.list(),
        ]
        assert v not in repr(got)
        assert "REDACTED" in repr(got)  # positive control: the fields came through
    finally:
        await _end(door)


_BAD: list[tuple[str, dict[str, Any], Any]] = [
    ("file_stat", {**_ENTRY, "type": "TOKEN"}, lambda s: s.files.get_info("a")),
    ("file_stat", {**_ENTRY, "permissions": "TOKEN"}, lambda s: s.files.get_info("a")),
    ("file_list", {"entries": [{**_ENTRY, "type": "x"}]}, lambda s: s.files.list(".")),
    ("ctx_create", {"id": "c1", "language": "TOKEN", "cwd": "/"},
     lambda s: s.create_code_context()),
    ("ctx_list", {"contexts": [{"id": "c1", "language": "python", "cwd": 3}]},
     lambda s: s.list_code_contexts()),
    ("cmd_list", {"processes": [{"pid": 7, "cmd": "x", "envs": {"A": "TOKEN"}}]},
     lambda s: s.commands.list()),
    ("cmd_list", {"processes": [{"pid": 7, "cmd": "x", "cwd": "TOKEN", "args": ["TOKEN"]}]},
     lambda s: s.commands.list()),
    ("file_mkdir", {"created": "TOKEN"}, lambda s: s.files.make_dir("a")),
]  # fmt: skip


@pytest.mark.parametrize("verb,reply,call", _BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(_BAD)])
async def test_a_malformed_reply_ends_the_sandbox(verb: str, reply: Any, call: Any) -> None:
    door, sbx = await _hostile({verb: [["done", reply]]})
    try:
        with pytest.raises(SandboxDiedError, match="protocol") as err:
            await call(sbx)
        assert "TOKEN" not in str(err.value)
        assert await _ended(sbx)
    finally:
        await _end(door)


# ------------------------------------------------------------- output cap (issue 17 §2)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def test_a_result_flood_is_capped_and_reported() -> None:
    # 300 RESULT frames of 1 MB each: without the cap on results the host kept them all.
    big = {"data": {"text": {"$repeat": ["r", 1_000_000]}}, "is_main": False}
    script = {"exec": [["result", big, "", 300], ["stdout", {}, "done\n"], ["done", {}]]}
    door, sbx = await _hostile(script, max_output_bytes=4 << 20)
    before = _peak_rss()
    try:
        seen: list[str] = []
        ex = await sbx.run_code("1", timeout=120, on_stderr=seen.append)
        retained = sum(len(r.text or "") for r in ex.results)
        assert 0 < retained <= 4 << 20  # positive control: the first results came through
        assert ex.truncated and "truncated" in "".join(seen)
        grown = _peak_rss() - before
        assert grown < 150 << 20, f"host memory grew by {grown >> 20} MiB"
        assert (await sbx.run_code("1", timeout=120)).truncated  # the next call: capped too
    finally:
        await _end(door)


async def test_errors_count_against_the_cap() -> None:
    err = {"name": "E", "value": {"$repeat": ["e", 60_000]}, "traceback": ""}
    script = {"exec": [["error", err, "", 100], ["done", {}]]}
    door, sbx = await _hostile(script, max_output_bytes=1 << 20)
    try:
        ex = await sbx.run_code("1")
        assert ex.truncated and ex.error is not None
    finally:
        await _end(door)


# ------------------------------------------------------- a silent agent (issue 17 §2)


async def test_a_silent_agent_ends_the_sandbox_instead_of_blocking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moat.engine import client

    monkeypatch.setattr(client, "SEND_TIMEOUT", 1.0)
    door, sbx = await _hostile({"silent": True})
    try:
        t0 = time.monotonic()
        with pytest.raises(SandboxDiedError, match="stopped reading"):
            await sbx.files.write("big", b"\0" * (64 << 20))
        assert time.monotonic() - t0 < 1.0 + 3
        assert await _ended(sbx)
    finally:
        await _end(door)
    door, sbx = await _hostile({"silent": True})
    try:
        t0 = time.monotonic()
        with pytest.raises(SandboxDiedError, match="stopped reading"):
            await sbx.run_code("#" + "x" * 500_000, timeout=1)
        assert time.monotonic() - t0 < 1.0 + 3
        assert await _ended(sbx)
    finally:
        await _end(door)


# ------------------------------------------------------- results of every format (§2)


async def test_every_result_format_passes_the_guard() -> None:
    import base64

    v = "sensitive-" + secrets.token_hex(8)
    text = {k: f"<{k}> {v}" for k in ("text", "html", "markdown", "svg", "latex", "javascript")}
    pdf = base64.b64encode(b"%PDF-1.4\n(" + v.encode() + b")\n%%EOF\n").decode()
    jpeg = base64.b64encode(b"\xff\xd8\xff\xfe\x00\x20" + v.encode() + b"\xff\xd9").decode()
    data = {**text, "json": {"k": [v]}, "data": {"x": v}, "pdf": pdf, "jpeg": jpeg}
    script = {"exec": [["result", {"data": data, "is_main": True}], ["done", {}]]}
    door, sbx = await _hostile(script, sensitive=[v])
    try:
        ex = await sbx.run_code("1")
        r = ex.results[0]
        assert v not in repr(r)
        for k in text:
            assert "REDACTED" in getattr(r, k)  # positive control: each format came through
        assert r.pdf is None and r.jpeg is None  # a value (or a malformed file): dropped
    finally:
        await _end(door)
    bad = {"data": {"png": "not base64 !"}, "is_main": True}
    door, sbx = await _hostile({"exec": [["result", bad], ["done", {}]]})
    try:
        with pytest.raises(SandboxDiedError, match="protocol"):
            await sbx.run_code("1")
        assert await _ended(sbx)
    finally:
        await _end(door)
