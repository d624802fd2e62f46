"""``moat serve`` driven by the older E2B Python SDK (e2b 2.45.1, e2b-code-interpreter 2.9.1),
which creates and connects through ``/sandboxes`` rather than ``/v2/sandboxes``.

The SDK lives in a virtualenv of its own (``make install``: ``/var/tmp/moat-e2b-2.45.1``, pinned
in ``tests/e2b-2.45-requirements.txt``; ``MOAT_E2B_LEGACY_VENV`` names another). It runs
``tests/e2b_legacy_scenario.py`` against a real server; this test asserts on the scenario's
summary and checks what it left behind from outside, through the newest SDK.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2b import SandboxQuery
from e2b_code_interpreter import Sandbox
from tests.conftest import require, require_tier
from tests.server_support import Server, new_key, serving, tenant_name

pytestmark = [pytest.mark.container, pytest.mark.slow]

VENV = Path(os.environ.get("MOAT_E2B_LEGACY_VENV", "/var/tmp/moat-e2b-2.45.1"))
SCENARIO = Path(__file__).parent / "e2b_legacy_scenario.py"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_tier("container")
    missing = None if (VENV / "bin" / "python").exists() else f"no virtualenv at {VENV}"
    require(missing, "e2b 2.45.1 (make install)")
    with serving(tmp_path_factory.mktemp("serve") / "server.log") as srv:
        yield srv


def test_e2b_2_45_create_code_commands_files_list_connect_kill(server: Server) -> None:
    key_a, key_b = new_key(tenant_name("alice")), new_key(tenant_name("bob"))
    tag = secrets.token_hex(4)
    env = {**os.environ, "MOAT_KEY_A": key_a, "MOAT_KEY_B": key_b}
    proc = subprocess.run(
        [str(VENV / "bin" / "python"), str(SCENARIO), tag],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    kept = Sandbox.connect(out["kept"], api_key=key_a)
    try:
        assert out["versions"] == ["2.45.1", "2.9.1"]
        assert out["templates"] == ["code-interpreter-v1", "base"]
        assert out["code"] == {"text": "42", "stdout": ["out\n"], "stderr": ["err\n"]}
        assert out["error"] == ["ValueError", "bad value", True] and out["html"] == "<b>hi</b>"
        assert out["context"] == ["5", "False"]
        assert out["fg"] == [0, "hello\n", "oops\n"] and out["exit"] == [3, "partial\n"]
        assert out["bg"] == [True, True, False, False]  # listed, killed, gone, second kill
        assert out["stdin"] == "line one\nline two\n" and out["reattach"] == [4, True]
        assert out["files"] == {
            "read": "from 2.45",
            "bytes": True,
            "list": ["a.txt", "b.bin"],
            "info": [9, "dir"],
            "exists": [True, False],
            "rename": "/home/user/legacy/renamed.txt",
            "makeDir": [True, False],
            "missing": "FileNotFoundException",
            "removed": False,
        }
        assert out["listed"] == [out["kept"]] and out["timeoutMovedS"] > 100
        assert out["connected"] == "42"
        assert out["kill"] == [True, False] and out["afterKill"] == "SandboxNotFoundException"
        assert out["killedDuringRun"] == ["TimeoutException", True]
        assert out["badKey"] == "AuthenticationException"
        assert out["tenantB"] == {
            "info": "SandboxNotFoundException",
            "connect": "SandboxNotFoundException",
            "kill": False,
            "listed": False,
        }
        assert out["async"] == ["4", "async\n", "async in\n", "async file", True, "6"]
        # From outside, with the newest SDK: what 2.45 wrote, and what it killed.
        assert kept.files.read("legacy/renamed.txt") == "from 2.45"
        assert not kept.files.exists("legacy/b.bin")
        assert kept.run_code("x").text == "6"  # its interpreter state, kept by the server
        run = SandboxQuery(metadata={"run": tag})
        assert [s.sandbox_id for s in Sandbox.list(api_key=key_a, query=run).next_items()] == [
            out["kept"]
        ]
        assert Sandbox.list(api_key=key_a, query=SandboxQuery(metadata={"run": tag + "x"})
                            ).next_items() == []  # fmt: skip
    finally:
        kept.kill()
