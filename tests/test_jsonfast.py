"""moat.protocol.jsonfast answers exactly as json.dumps/json.loads do (the frame codec's JSON,
decoding what a hostile agent sends: invariant 6), and the agent starts without json and re."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from moat.protocol import jsonfast

DOCS: list[Any] = [
    {},
    [],
    {"t": "exec", "i": 7, "f": {"code": "print('é')\n", "envs": {"A": "b"}}},
    [1, -2, 2.5, 1e300, -0.0, None, True, False, "x\u00e9\ud800\x00\u2028"],
    {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf")},
    {"deep": [[[[{"a": [{}]}]]]], "k": {"z": 10**30}},
    {1: "int key", 2.5: "float key", None: "none key", False: "bool key"},
]

TEXTS = [
    "{}", ' {"a":1} ', '\n\t{"a": [1, 2.5, "\\u00e9"]}\r\n', "[1,2", '{"a":1} x', '{"a":1}{}',
    "", "   ", "NaN", "-Infinity", "Infinity", '"s"', "1e5", "-0", "01", "[1,]", '{"a":1,}',
    '{"a":"\\ud800"}', '{"a":"\x01"}', '{"a":"\\x41"}', "[tru]", '{"a" 1}', "\ufeff{}",
    '{"a":1, "a":2}', "[" * 50 + "]" * 50, "\u00a0{}", '{"t":"ready","i":0,"f":{}}',
]  # fmt: skip


def test_the_accelerated_path_is_in_use() -> None:
    assert jsonfast._built is not None  # the host's CPython: else this module only wraps json


@pytest.mark.parametrize("doc", DOCS)
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("ascii_only", [True, False])
def test_dumps_is_json_dumps(doc: Any, compact: bool, ascii_only: bool) -> None:
    sep = (",", ":") if compact else (", ", ": ")
    want = json.dumps(doc, separators=sep, ensure_ascii=ascii_only)
    assert jsonfast.dumps(doc, compact=compact, ensure_ascii=ascii_only) == want


@pytest.mark.parametrize("text", TEXTS)
def test_loads_is_json_loads(text: str) -> None:
    def outcome(fn: Any) -> str:
        try:
            return "ok " + repr(fn(text))
        except ValueError:
            return "ValueError"

    assert outcome(jsonfast.loads) == outcome(json.loads)


def test_bad_values_fail_as_in_json_and_leave_no_state() -> None:
    class Odd:
        pass

    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(TypeError, match="not JSON serializable"):
        jsonfast.dumps({"a": [Odd()]})
    with pytest.raises(ValueError, match="Circular"):
        jsonfast.dumps(loop)
    # a failure midway leaves no circular-reference marker behind for the next document
    shared = {"x": 1}
    with pytest.raises(TypeError):
        jsonfast.dumps([shared, Odd()])
    assert jsonfast.dumps([shared, shared]) == '[{"x":1},{"x":1}]'


def test_agent_start_imports_stay_lean(tmp_path: Path) -> None:
    """The point of the module: the agent's start (and its forked kernel's) imports neither
    json nor re, nor base64 (which imports re) nor ast (a kernel imports it at its first
    cell): each is CPU on every create. A positive control: ``json`` itself imports ``re``."""
    src = Path(__file__).resolve().parent.parent / "src" / "moat"
    tree = tmp_path / "moat"  # laid out as moat.runtime.agentdir lays it out for a sandbox
    tree.mkdir()
    (tree / "__init__.py").write_text("")
    for pkg in ("protocol", "agent"):
        shutil.copytree(src / pkg, tree / pkg)
    probe = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import moat.agent.main, "
        "moat.agent.kernel; print(sorted(m for m in ('json', 're', 'base64', 'ast') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
    control = subprocess.run(
        [sys.executable, "-I", "-S", "-c", "import json, sys; print('re' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert control.stdout.strip() == "True"
