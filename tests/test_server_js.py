"""``moat serve`` driven by the unmodified E2B JS SDKs under Node (npm ``e2b`` and
``@e2b/code-interpreter``, pinned in ``tests/js/package-lock.json``; ``make install`` installs
them).

Each scenario is an ES module in ``tests/js`` that prints one JSON summary; the test asserts on
it and, where it can, checks the outcome from outside through the Python SDK (a file the JS
wrote, a process it killed, a sandbox it must not have touched).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2b import SandboxQuery
from e2b.exceptions import NotFoundException
from e2b_code_interpreter import Sandbox
from tests.conftest import require, require_tier
from tests.server_support import Server, new_key, serving, tenant_name

pytestmark = [pytest.mark.container, pytest.mark.slow]

JS = Path(__file__).parent / "js"
NODE_MIN = (20, 18, 1)  # the SDKs' engines field: ">=20.18.1 <21 || >=22"


def _node_missing() -> str | None:
    node = shutil.which("node")
    if node is None:
        return "no node on PATH (the SDKs need Node >= 20.18.1)"
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    m = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)\s*", out.stdout)
    if m is None or tuple(map(int, m.groups())) < NODE_MIN:
        return f"node {out.stdout.strip()} is older than 20.18.1"
    if not (JS / "node_modules" / "@e2b" / "code-interpreter").is_dir():
        return "tests/js/node_modules is not installed (run make install)"
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_tier("container")
    require(_node_missing(), "the E2B JS SDK under Node")
    with serving(tmp_path_factory.mktemp("serve") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def key_a(server: Server) -> str:
    return new_key(tenant_name("alice"))


@pytest.fixture(scope="module")
def key_b(server: Server) -> str:
    return new_key(tenant_name("bob"))


def node(script: str, *args: str, key_a: str, key_b: str = "") -> dict[str, Any]:
    """Runs ``tests/js/<script>`` against the server (``serving`` set ``E2B_*_URL``)."""
    env = {**os.environ, "MOAT_KEY_A": key_a, "MOAT_KEY_B": key_b}
    proc = subprocess.run(
        ["node", str(JS / script), *args],
        cwd=JS, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{script}: no output (rc {proc.returncode}): {proc.stderr[-3000:]}"
    out: dict[str, Any] = json.loads(lines[-1])
    assert "fatal" not in out and proc.returncode == 0, (out, proc.stderr[-3000:])
    return out


def _python_sandbox(key: str) -> Sandbox:
    return Sandbox.create(api_key=key, timeout=300)


# -- create, code interpreter, contexts --------------------------------------------------


def test_js_run_code_results_errors_and_contexts(server: Server, key_a: str) -> None:
    out = node("code.mjs", key_a=key_a)
    assert out["template"] == "code-interpreter-v1"
    assert out["text"] == "42" and out["executionCount"] == 1
    assert out["logs"] == {"stdout": ["to out\n"], "stderr": ["to err\n"]}
    assert out["onStdout"] == ["to out\n"] and out["kept"] == "6"
    assert out["multi"] == {
        "formats": ["html", "markdown"],
        "html": "<b>hi</b>",
        "markdown": "**hi**",
        "text": "M()",
        "isMain": True,
    }
    # A figure shown by matplotlib: a display result (not the cell's value) carrying a PNG.
    assert out["plot"]["count"] == 1 and "png" in out["plot"]["formats"]
    assert out["plot"]["pngHead"] == "iVBORw0KGgoA" and out["plot"]["isMain"] is False
    err = out["error"]
    assert err["name"] == "ValueError" and err["value"] == "bad value"
    assert "ValueError: bad value" in err["traceback"] and "/work" not in err["traceback"]
    assert out["envs"] == "bar"
    # The client's timeout interrupted the cell: the next ran at once, the cell never ended.
    assert out["interrupt"]["kind"] == "TimeoutError" and out["interrupt"]["next"] == "2"
    assert out["interrupt"]["elapsedMs"] < 15_000 and out["interrupt"]["marker"] == "False"
    assert out["ctx"] == {"py": "python", "pyCwd": "/tmp", "sh": "bash"}
    assert out["ctxCwd"] == "/tmp" and out["ctxKept"] == "only here"
    assert out["defaultHasY"] == "False" and out["bash"] == ["bash 5\n"]
    assert out["listed"] == 2 and out["afterRestart"] == "False"
    assert out["afterRemoveListed"] is False
    assert out["removedRun"]["kind"] == "NotFoundError"
    # From outside: the script's sandbox is gone.
    with pytest.raises(NotFoundException):
        Sandbox.get_info(out["sandboxId"], api_key=key_a)


# -- control plane -----------------------------------------------------------------------


def test_js_create_list_connect_timeout_kill(server: Server, key_a: str) -> None:
    tag = secrets.token_hex(4)
    out = node("control.mjs", tag, key_a=key_a)
    base, ci = out["ids"]["base"], out["ids"]["ci"]
    info = out["info"]
    assert info["templateId"] == "base" and info["ciTemplateId"] == "code-interpreter-v1"
    assert info["metadata"] == {"run": tag, "who": "a b&c=d"} and info["state"] == "running"
    assert 55 <= info["lifetimeS"] <= 65  # timeoutMs 60 000 reached the server as seconds
    assert out["baseEcho"] == "base\n" and out["ciCode"] == "42"
    assert out["byTag"] == [base] and out["byOddValue"] == [base] and out["byNothing"] == []
    assert out["runningHasBoth"] is True
    assert out["paged"] == {"both": True, "unique": True}
    assert out["timeout"]["movedS"] > 100 and 240 < out["timeout"]["ciLifetimeS"] <= 251
    assert out["connect"] == {"same": True, "endAtKept": True, "echo": "again\n", "code": "42"}
    assert out["kill"] == [True, True]
    assert out["killedDuringRun"]["kind"] == "TimeoutError"
    assert "killed or reached its end of life" in out["killedDuringRun"]["message"]
    after = out["afterKill"]
    assert after["isRunning"] is False and after["killAgain"] is False
    for call in ("getInfo", "connect", "setTimeout", "command"):
        assert after[call]["kind"] == "SandboxNotFoundError", (call, after[call])
    assert after["listed"] == []
    # From outside: neither sandbox is listed any more for the tenant.
    listed = Sandbox.list(api_key=key_a, query=SandboxQuery(metadata={"run": tag})).next_items()
    assert listed == []
    assert {base, ci}.isdisjoint(s.sandbox_id for s in Sandbox.list(api_key=key_a).next_items())


def test_js_network_all_traffic_allow_list(server: Server, key_a: str) -> None:
    """``denyOut: [ALL_TRAFFIC]`` + ``allowOut`` (E2B's documented allow-list) was refused as
    a malformed pattern; it now means moat's deny-all plus the list, on create and update."""
    out = node("network.mjs", key_a=key_a)
    assert out["allTraffic"] == "0.0.0.0/0"
    # Control: internet access alone lets both hosts past the policy (they then fail to
    # resolve here), so a not_allowed below is the deny-all's doing.
    assert out["open"]["verdicts"] == {
        "allowed.example.test": [403, "no_address"],
        "other.example.test": [403, "no_address"],
    }
    for case in ("created", "updated"):
        got = out[case]
        assert got["verdicts"] == {
            "allowed.example.test": [403, "no_address"],
            "other.example.test": [403, "not_allowed"],
        }, case
        assert got["network"] == {"allowOut": ["allowed.example.test"], "denyOut": ["0.0.0.0/0"]}
        assert got["allowInternetAccess"] is False  # as enforced
    assert (
        out["allowAll"]["kind"] == "SandboxError" and "not supported" in out["allowAll"]["message"]
    )


# -- commands and files on a sandbox made by the Python SDK ------------------------------


def test_js_commands(server: Server, key_a: str) -> None:
    sbx = _python_sandbox(key_a)
    try:
        out = node("commands.mjs", sbx.sandbox_id, key_a=key_a)
        killed_at = time.monotonic()
        assert out["fg"] == {
            "exitCode": 0, "stdout": "hello\n", "stderr": "oops\n", "onStdout": "hello\n"
        }  # fmt: skip
        assert out["exit"] == {
            "kind": "CommandExitError", "exitCode": 3, "stdout": "partial\n", "stderr": "bad\n"
        }  # fmt: skip
        assert out["opts"] == "/tmp\nfoo-value\nuser\n"
        # user "root" on the container tier: uid 0 of the sandbox's own namespace (docs/users.md)
        assert out["root"] == "root\n"
        assert out["timeout"]["kind"] == "TimeoutError"
        assert out["listed"] is True and out["killed"] is True
        assert out["waitAfterKill"]["kind"] == "CommandExitError"
        assert out["killAgain"] is False and out["listedAfterKill"] is False
        assert out["supportsStdinClose"] is True and out["stdin"] == "line one\nline two\n"
        assert out["reattach"]["kind"] == "CommandExitError" and out["reattach"]["exitCode"] == 4
        assert out["reattach"]["pid"] is True and "tick 5\n" in out["reattach"]["stdout"]
        assert out["connectUnknown"]["kind"] == "NotFoundError" and out["killUnknown"] is False
        # From outside: the killed command never reached its marker; its sibling did (control).
        deadline = time.monotonic() + 20
        while not sbx.files.exists("/tmp/js-control-marker") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sbx.files.exists("/tmp/js-control-marker")
        time.sleep(max(0.0, killed_at + 2.5 - time.monotonic()))
        assert not sbx.files.exists("/tmp/js-killed-marker")
        procs = sbx.commands.run("ps -eo args").stdout
        assert "sleep 600" not in procs and "\ncat\n" not in "\n" + procs
    finally:
        sbx.kill()


def test_js_files(server: Server, key_a: str) -> None:
    sbx = _python_sandbox(key_a)
    try:
        sbx.files.write("/home/user/from-python.txt", "written by python")
        out = node("files.mjs", sbx.sandbox_id, key_a=key_a)
        assert out["fromPython"] == "written by python"
        assert out["wroteText"] == {"path": "/home/user/js/a.txt", "name": "a.txt", "type": "file"}
        assert out["text"] == "hello from node" and out["bytesEqual"] is True
        assert out["blobSize"] == 25600
        assert out["many"] == ["/tmp/js-m1.txt", "/home/user/js/m2.txt"]
        assert [(e["name"], e["type"], e["size"]) for e in out["list"]] == [
            ("a.txt", "file", 15), ("b.bin", "file", 25600), ("m2.txt", "file", 3),
        ]  # fmt: skip
        assert out["info"] == {
            "name": "a.txt", "type": "file", "path": "/home/user/js/a.txt", "size": 15
        }  # fmt: skip
        assert out["dirInfo"]["type"] == "dir" and out["dirInfo"]["path"] == "/home/user/js"
        assert out["exists"] == [True, False]
        assert out["renamed"]["path"] == "/home/user/js/renamed.txt"
        assert out["existsAfterRename"] is False and out["existsAfterRemove"] is False
        assert out["makeDir"] == [True, False]
        assert out["readMissing"]["kind"] == "FileNotFoundError"
        assert out["infoMissing"]["kind"] == "FileNotFoundError"
        assert out["readDir"]["kind"] == "InvalidArgumentError"
        assert out["streamed"] == {"stream": 3 << 20, "octet": 3 << 20, "readStream": 3 << 20}
        # From outside, through the Python SDK.
        assert sbx.files.read("js/renamed.txt") == "hello from node"
        assert bytes(sbx.files.read("js/b.bin", format="bytes")) == bytes(range(256)) * 100
        big = bytes((i * 7) % 251 for i in range(3 << 20))
        assert bytes(sbx.files.read("js/s.bin", format="bytes")) == big
        assert bytes(sbx.files.read("js/o.bin", format="bytes")) == big
        assert sbx.files.read("/tmp/js-m1.txt") == "one"
        assert not sbx.files.exists("js/a.txt") and not sbx.files.exists("js/m2.txt")
        assert sbx.files.get_info("js/new/deeper").type.value == "dir"
    finally:
        sbx.kill()


# -- authentication and tenant separation -------------------------------------------------


def test_js_auth_failure_and_tenant_separation(server: Server, key_a: str, key_b: str) -> None:
    a = _python_sandbox(key_a)
    try:
        a.files.write("/home/user/canary.txt", "canary")
        out = node("tenants.mjs", a.sandbox_id, a._envd_access_token or "",
                   key_a=key_a, key_b=key_b)  # fmt: skip
        for call in ("badCreate", "badList", "badKill"):
            assert out[call]["kind"] == "AuthenticationError", (call, out[call])
        assert out["bTokenWorks"] == "2"  # control: B's own token opens B's sandbox
        # Control: the same forged-handle construction with A's own token reads the canary,
        # so the refusals below come from the server's checks, not from the handle.
        assert out["ownerRead"] == "canary"
        probe_a = out["a"]
        assert probe_a["kill"] is False and probe_a["listed"] is False
        assert probe_a["isRunning"] is False
        for call in ("getInfo", "connect", "setTimeout", "command"):
            assert probe_a[call]["kind"] == "SandboxNotFoundError", (call, probe_a[call])
        for call in ("read", "write", "list", "remove", "runCode"):
            assert probe_a[call]["kind"] == "TimeoutError", (call, probe_a[call])  # 502 "not found"
            assert "was not found" in probe_a[call]["message"]
        # Indistinguishable from an unknown id.
        unknown = json.loads(json.dumps(out["unknown"]).replace(out["unknownId"], a.sandbox_id))
        assert unknown == probe_a
        # From outside: A is running and untouched.
        assert a.is_running() and a.files.read("/home/user/canary.txt") == "canary"
        for name in ("forged.txt", "forged-cmd", "forged-code"):
            assert not a.files.exists(f"/home/user/{name}"), name
        assert a.run_code("1 + 1").text == "2"
    finally:
        a.kill()
