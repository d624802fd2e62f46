"""``moat mcp`` over stdio, driven by the official MCP SDK's client: real container sandboxes.

Each test spawns ``moat mcp`` the way an agent host does (the SDK's stdio client) and checks
what a model would see: the tools and their schemas, results, images, errors as tool errors,
the guard's redaction, and that a session's sandboxes die when the host closes stdin.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import signal
import subprocess
from pathlib import Path

import pytest
from mcp import Client
from tests.conftest import require_tier
from tests.killcheck import cannot_run, descendants, eventually
from tests.mcp_support import failed, images, new_sandbox, ok, stdio_params, text
from tests.server_support import MOAT

from moat.engine.api import FrontDoor
from moat.mcp import Settings

pytestmark = [pytest.mark.asyncio, pytest.mark.container]

CONTAINER = stdio_params("--isolation", "container")
TOOLS = {
    "run_code", "run_command", "read_file", "write_file", "list_files", "create_sandbox",
    "kill_sandbox", "list_sandboxes",
}  # fmt: skip
#: A secret-shaped value the guard's rules know (an AWS access key id), built inside the
#: sandbox so the code sent holds it only in pieces.
AWS_KEY = "AKIA" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))


@pytest.fixture(autouse=True)
def _container() -> None:
    require_tier("container")


async def test_tools_have_precise_schemas() -> None:
    async with Client(CONTAINER) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        schema = tool.input_schema
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        assert tool.description and len(tool.description) > 40
        for name, prop in schema.get("properties", {}).items():
            assert prop.get("description"), (tool.name, name)
            assert "type" in prop and "anyOf" not in prop, (tool.name, name)
    run = tools["run_code"].input_schema
    assert run["required"] == ["code"]
    assert run["properties"]["language"]["enum"] == ["python", "bash"]
    assert run["properties"]["timeout"]["maximum"] == 3600
    assert tools["read_file"].input_schema["required"] == ["sandbox", "path"]
    assert tools["create_sandbox"].input_schema["properties"]["name"]["pattern"]
    assert tools["read_file"].annotations and tools["read_file"].annotations.read_only_hint


async def test_run_code_files_and_commands_in_a_session_sandbox() -> None:
    async with Client(CONTAINER) as client:
        # one-shot: a fresh sandbox, its result text
        shown = await ok(client, "run_code", code="print('hello')\n6 * 7")
        assert shown == "stdout:\nhello\nresult:\n42"
        assert "x = 1" not in await ok(client, "run_code", code="'x = 1'[:0]")
        shown = await ok(client, "run_code", code="echo from-bash", language="bash")
        assert "from-bash" in shown

        sid = await new_sandbox(client)
        await ok(client, "write_file", sandbox=sid, path="notes/a.txt", content="line one\n")
        assert await ok(client, "read_file", sandbox=sid, path="notes/a.txt") == "line one\n"
        raw = bytes(range(256))
        await ok(client, "write_file", sandbox=sid, path="/tmp/raw.bin",
                 content=base64.b64encode(raw).decode(), encoding="base64")  # fmt: skip
        code = "import hashlib\nhashlib.sha256(open('/tmp/raw.bin', 'rb').read()).hexdigest()"
        shown = await ok(client, "run_code", sandbox=sid, code=code)
        assert hashlib.sha256(raw).hexdigest() in shown
        shown = await ok(client, "read_file", sandbox=sid, path="/tmp/raw.bin")
        assert shown.startswith("/tmp/raw.bin is a binary file of 256 bytes")
        # state persists between calls in the session's sandbox
        await ok(client, "run_code", sandbox=sid, code="counter = 41")
        assert "42" in await ok(client, "run_code", sandbox=sid, code="counter + 1")
        listing = await ok(client, "list_files", sandbox=sid, path="/home/user", depth=2)
        assert "/home/user/notes/a.txt" in listing and "dir" in listing
        shown = await ok(client, "run_command", sandbox=sid, command="cat notes/a.txt; pwd")
        assert "line one" in shown and "/home/user" in shown and "exit code: 0" in shown
        assert sid in await ok(client, "list_sandboxes")
        await ok(client, "kill_sandbox", sandbox=sid)
        assert sid not in await ok(client, "list_sandboxes")
        gone = await failed(client, "read_file", {"sandbox": sid, "path": "notes/a.txt"})
        assert "NotFoundError" in gone


async def test_errors_in_user_code_are_tool_errors() -> None:
    async with Client(CONTAINER) as client:
        result = await client.call_tool("run_code", {"code": "print('before')\n1 / 0"})
        assert result.is_error
        shown = text(result)
        assert "stdout:\nbefore" in shown and "ZeroDivisionError: division by zero" in shown
        assert "Traceback" in shown or "<cell>" in shown
        assert "/work/" not in shown and "site-packages" not in shown  # no host paths
        result = await client.call_tool("run_command", {"command": "echo oops >&2; exit 3"})
        assert result.is_error and "oops" in text(result) and "exit code: 3" in text(result)
        result = await client.call_tool("run_command", {"command": "sleep 30", "timeout": 1})
        assert result.is_error and "killed after 1 s" in text(result)
        code = "import time\nprint('started', flush=True)\ntime.sleep(30)"
        result = await client.call_tool("run_code", {"code": code, "timeout": 2})
        assert result.is_error and "TimeoutError" in text(result)
        assert text(result).startswith("stdout:\nstarted")  # what came before the timeout


async def test_guard_redacts_secret_shaped_output() -> None:
    head, tail = AWS_KEY[:10], AWS_KEY[10:]
    async with Client(CONTAINER) as client:
        sid = await new_sandbox(client)
        code = (
            f"key = {head!r} + {tail!r}\nopen('creds.txt', 'w').write('aws_key=' + key)\n"
            "print(key)\nprint(key[::-1])\nkey"
        )
        result = await client.call_tool("run_code", {"sandbox": sid, "code": code})
        shown = text(result)
        assert AWS_KEY not in shown and "[REDACTED:aws]" in shown
        # positive control: the output does flow; only the secret's shape was cut
        assert AWS_KEY[::-1] in shown
        read = await ok(client, "read_file", sandbox=sid, path="creds.txt")
        assert AWS_KEY not in read and "[REDACTED:aws]" in read
        ran = await client.call_tool("run_command", {"sandbox": sid, "command": "cat creds.txt"})
        assert AWS_KEY not in text(ran) and "[REDACTED:aws]" in text(ran)


async def test_matplotlib_figure_is_image_content() -> None:
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')\nplt.show()"
    async with Client(CONTAINER) as client:
        result = await client.call_tool("run_code", {"code": code})
        assert not result.is_error, text(result)
        (image,) = images(result)
        assert image.mime_type == "image/png"
        assert base64.b64decode(image.data)[:8] == b"\x89PNG\r\n\x1a\n"
        sid = await new_sandbox(client)
        await ok(
            client, "run_code", sandbox=sid, code=code.replace("plt.show()", "plt.savefig('p.png')")
        )
        read = await client.call_tool("read_file", {"sandbox": sid, "path": "p.png"})
        (image,) = images(read)
        assert base64.b64decode(image.data)[:8] == b"\x89PNG\r\n\x1a\n"


async def test_bad_arguments_are_clear_tool_errors() -> None:
    async with Client(CONTAINER) as client:
        cases = [
            ("run_code", {}, "code: required"),
            ("run_code", {"code": 5}, "code: Input should be a valid string"),
            ("run_code", {"code": "1", "language": "ruby"}, "language"),
            ("run_code", {"code": "1", "timeout": -1}, "timeout"),
            ("run_code", {"code": "1", "colour": "red"}, "colour: not an argument"),
            ("create_sandbox", {"name": "../etc"}, "name"),
            ("read_file", {"sandbox": "nope", "path": "x"}, "no running sandbox named"),
            ("write_file", {"sandbox": "nope", "path": "x", "content": "1"}, "NotFoundError"),
            ("list_files", {"sandbox": "x", "depth": 99}, "depth"),
            ("no_such_tool", {}, "unknown tool"),
        ]
        for tool, args, expected in cases:
            shown = await failed(client, tool, args)
            assert expected in shown, (tool, args, shown)
            assert "/work/" not in shown and "moat/" not in shown
        sid = await new_sandbox(client)
        bad = {"sandbox": sid, "path": "a", "content": "@@", "encoding": "base64"}
        shown = await failed(client, "write_file", bad)
        assert "not valid base64" in shown
        shown = await failed(client, "read_file", {"sandbox": sid, "path": "/no/such/file"})
        assert "NotFoundError" in shown
        # the server is still there and answers
        assert "2" in await ok(client, "run_code", code="1 + 1")


def _sleepers(marker: str) -> set[int]:
    """Host pids of sandboxed processes whose command line holds ``marker``."""
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    found.add(int(proc.name))
            except OSError:
                pass
    return found


async def test_session_end_kills_its_sandboxes() -> None:
    marker = str(600 + secrets.randbelow(10_000))
    async with Client(CONTAINER) as client:
        sid = await new_sandbox(client)
        named = await new_sandbox(client, "keeper")
        for s in (sid, named):
            await ok(client, "run_command", sandbox=s,
                     command=f"nohup sleep {marker} >/dev/null 2>&1 &")  # fmt: skip
        await asyncio.sleep(0.3)
        pids = _sleepers(f"sleep\0{marker}")
        assert len(pids) == 2  # positive control: both sandboxes' sleepers seen from outside
    # stdin closed: the session ended, and with the process every sandbox it made
    # (invariant 5: a named one cannot outlive the process that holds it either)
    assert await asyncio.to_thread(eventually, lambda: all(cannot_run(p) for p in pids), 20)


async def test_sigterm_kills_its_sandboxes() -> None:
    marker = str(600 + secrets.randbelow(10_000))
    async with Client(CONTAINER) as client:
        sid = await new_sandbox(client, "kept")
        await ok(client, "run_command", sandbox=sid,
                 command=f"nohup sleep {marker} >/dev/null 2>&1 &")  # fmt: skip
        await asyncio.sleep(0.3)
        pids = _sleepers(f"sleep\0{marker}")
        (server,) = [p for p in descendants() if b"moat.cli\0mcp" in _cmdline(p)]
        assert len(pids) == 1  # positive control: the sleeper, seen from outside
        os.kill(server, signal.SIGTERM)
        assert await asyncio.to_thread(eventually, lambda: all(cannot_run(p) for p in pids), 20)
        assert await asyncio.to_thread(eventually, lambda: cannot_run(server), 20)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


async def test_default_tier_is_by_trust_untrusted() -> None:
    """Without a setting, the tier is the resolver's default: untrusted -> microvm."""
    front = FrontDoor(engine=object())  # type: ignore[arg-type]  # resolving starts nothing
    assert Settings().config(front, "t", None, {}).tier == "microvm"
    assert Settings(trust="semi-trusted").config(front, "t", None, {}).tier == "gvisor"
    assert Settings(isolation="container").config(front, "t", 30, {}).tier == "container"


@pytest.mark.gvisor
async def test_runs_on_gvisor() -> None:
    require_tier("gvisor")
    async with Client(stdio_params("--trust", "semi-trusted")) as client:
        sid = await new_sandbox(client)
        assert "gvisor" in await ok(client, "list_sandboxes")
        assert "42" in await ok(client, "run_code", sandbox=sid, code="6 * 7")


async def test_bad_settings_stop_the_start() -> None:
    """A setting the resolver refuses stops ``moat mcp`` before it serves (invariant 7)."""
    for args, expected in (
        (["--profile", "no-such-profile"], "NotFoundError"),
        (["--tenant", "bad tenant!"], "--tenant must be"),
        (["--trust", "reckless"], "Invalid value for '--trust'"),
    ):
        proc = await asyncio.to_thread(
            subprocess.run, [*MOAT, "mcp", *args], input="", capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert proc.returncode == 2 and expected in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.microvm
async def test_default_is_untrusted_on_microvm() -> None:
    """No setting at all: the sandboxes are the resolver's default, untrusted -> microvm."""
    require_tier("microvm")
    async with Client(stdio_params()) as client:
        sid = await new_sandbox(client)
        assert f"{sid}  name=-  tier=microvm" in await ok(client, "list_sandboxes")
        assert "42" in await ok(client, "run_code", sandbox=sid, code="6 * 7")
