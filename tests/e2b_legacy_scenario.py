"""A scenario run under the older E2B Python SDK (e2b 2.45.1, e2b-code-interpreter 2.9.1) in a
virtualenv of its own; tests/test_server_e2b_legacy.py runs it against a real ``moat serve``.

It imports neither moat nor the tests (that virtualenv has only the SDKs) and prints one JSON
summary line. argv: a tag unique to the run; env: E2B_API_URL/E2B_SANDBOX_URL, MOAT_KEY_A and
MOAT_KEY_B. The sandbox named ``kept`` is left running for the outside checks.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from e2b import Sandbox as BaseSandbox
from e2b import SandboxQuery
from e2b.sandbox.commands.command_handle import CommandExitException
from e2b_code_interpreter import AsyncSandbox, Sandbox


def caught(fn: Callable[[], object]) -> str | None:
    """None when ``fn`` returns, else its exception's class name."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the scenario reports whatever the SDK raised
        return type(exc).__name__
    return None


def main() -> dict[str, Any]:
    tag = sys.argv[1]
    key_a, key_b = os.environ["MOAT_KEY_A"], os.environ["MOAT_KEY_B"]
    out: dict[str, Any] = {"versions": [version("e2b"), version("e2b-code-interpreter")]}

    # Create: code-interpreter-v1 (the default) and base; the control plane's old paths.
    sbx = Sandbox.create(api_key=key_a, timeout=120, metadata={"run": tag})
    base = BaseSandbox.create("base", api_key=key_a, timeout=60, metadata={"run": tag + "x"})
    out["kept"] = sbx.sandbox_id
    out["templates"] = [sbx.get_info().template_id, base.get_info().template_id]

    # Code interpreter.
    ex = sbx.run_code("import sys\nprint('out')\nprint('err', file=sys.stderr)\nx = 6\nx * 7")
    out["code"] = {"text": ex.text, "stdout": ex.logs.stdout, "stderr": ex.logs.stderr}
    err = sbx.run_code("raise ValueError('bad value')").error
    out["error"] = err and [err.name, err.value, "ValueError" in err.traceback]
    html = sbx.run_code("class H:\n    def _repr_html_(self): return '<b>hi</b>'\nH()")
    out["html"] = html.results[0].html if html.results else None
    ctx = sbx.create_code_context(cwd="/tmp")
    sbx.run_code("y = 5", context=ctx)
    out["context"] = [sbx.run_code("y", context=ctx).text, sbx.run_code("'y' in globals()").text]

    # Commands: foreground, exit code, background + kill, stdin, re-attach.
    fg = base.commands.run("echo hello; echo oops >&2")
    out["fg"] = [fg.exit_code, fg.stdout, fg.stderr]
    try:
        base.commands.run("echo partial; exit 3")
        out["exit"] = None
    except CommandExitException as exc:
        out["exit"] = [exc.exit_code, exc.stdout]
    bg = base.commands.run("sleep 600", background=True)
    out["bg"] = [
        any(p.pid == bg.pid for p in base.commands.list()),
        bg.kill(),
        any(p.pid == bg.pid for p in base.commands.list()),
        base.commands.kill(bg.pid),
    ]
    cat = base.commands.run("cat", background=True, stdin=True)
    base.commands.send_stdin(cat.pid, "line one\n")
    cat.send_stdin("line two\n")
    base.commands.close_stdin(cat.pid)
    out["stdin"] = cat.wait().stdout
    ticker = base.commands.run(
        "for i in 1 2 3 4; do echo tick $i; sleep 0.3; done; exit 4", background=True
    )
    ticker.disconnect()
    again = base.commands.connect(ticker.pid)
    try:
        again.wait()
        out["reattach"] = None
    except CommandExitException as exc:
        out["reattach"] = [exc.exit_code, "tick 4" in exc.stdout]

    # Files.
    fs = sbx.files
    fs.write("legacy/a.txt", "from 2.45")
    fs.write("/home/user/legacy/b.bin", bytes(range(256)) * 10)
    out["files"] = {
        "read": fs.read("legacy/a.txt"),
        "bytes": bytes(fs.read("legacy/b.bin", format="bytes")) == bytes(range(256)) * 10,
        "list": sorted(e.name for e in fs.list("legacy")),
        "info": [fs.get_info("legacy/a.txt").size, fs.get_info("legacy").type.value],
        "exists": [fs.exists("legacy/a.txt"), fs.exists("legacy/none")],
        "rename": fs.rename("legacy/a.txt", "legacy/renamed.txt").path,
        "makeDir": [fs.make_dir("legacy/d"), fs.make_dir("legacy/d")],
        "missing": caught(lambda: fs.read("legacy/none")),
    }
    fs.remove("legacy/b.bin")
    out["files"]["removed"] = fs.exists("legacy/b.bin")

    # List with a metadata filter, connect, timeout, kill.
    listed = Sandbox.list(api_key=key_a, query=SandboxQuery(metadata={"run": tag}))
    out["listed"] = [s.sandbox_id for s in listed.next_items()]
    before = sbx.get_info().end_at
    sbx.set_timeout(300)
    out["timeoutMovedS"] = (sbx.get_info().end_at - before).total_seconds()
    connected = Sandbox.connect(sbx.sandbox_id, api_key=key_a)
    out["connected"] = connected.run_code("40 + 2").text
    sleeper = base.commands.run("sleep 60", background=True)
    out["kill"] = [base.kill(), BaseSandbox.kill(base.sandbox_id, api_key=key_a)]
    # 2.45 probes /health only when the stream drops at the transport level (a reset): then
    # it says the sandbox is gone; a body merely cut short reads as a "likely timeout"
    try:
        sleeper.wait()
        out["killedDuringRun"] = None
    except Exception as exc:  # noqa: BLE001 - the scenario reports whatever the SDK raised
        out["killedDuringRun"] = [
            type(exc).__name__,
            "killed or reached its end of life" in str(exc),
        ]
    out["afterKill"] = caught(lambda: BaseSandbox.get_info(base.sandbox_id, api_key=key_a))

    # Auth failure and tenant B.
    bad = "e2b_" + "0" * 40  # 2.45 checks the key's format client-side: this one passes it
    out["badKey"] = caught(lambda: Sandbox.create(api_key=bad))
    out["tenantB"] = {
        "info": caught(lambda: Sandbox.get_info(sbx.sandbox_id, api_key=key_b)),
        "connect": caught(lambda: Sandbox.connect(sbx.sandbox_id, api_key=key_b)),
        "kill": Sandbox.kill(sbx.sandbox_id, api_key=key_b),
        "listed": sbx.sandbox_id
        in [s.sandbox_id for s in Sandbox.list(api_key=key_b).next_items()],
    }
    out["async"] = asyncio.run(async_part(key_a))
    return out


async def async_part(key: str) -> list[Any]:
    """The same SDK's async classes: create, code, commands with stdin, files, list, connect."""
    sbx = await AsyncSandbox.create(api_key=key, timeout=60)
    try:
        cat = await sbx.commands.run("cat", background=True, stdin=True)
        await sbx.commands.send_stdin(cat.pid, "async in\n")
        await sbx.commands.close_stdin(cat.pid)
        await sbx.files.write("async.txt", "async file")
        listed = await AsyncSandbox.list(api_key=key).next_items()
        again = await AsyncSandbox.connect(sbx.sandbox_id, api_key=key)
        return [
            (await sbx.run_code("2 + 2")).text,
            (await sbx.commands.run("echo async")).stdout,
            (await cat.wait()).stdout,
            await sbx.files.read("async.txt"),
            sbx.sandbox_id in [s.sandbox_id for s in listed],
            (await again.run_code("3 + 3")).text,
        ]
    finally:
        await sbx.kill()


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
    # Leave without the interpreter's finalization: the old SDK's client threads were seen to
    # abort it ("PyGILState_Release ... finalizing", SIGABRT) after every check had passed;
    # the summary above is the whole result (as the JS scenarios end with process.exit()).
    os._exit(0)
