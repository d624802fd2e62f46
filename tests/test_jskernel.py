"""JavaScript code contexts (``run_code(language="js")``, issue 10) on real sandboxes.

The kernel is Node from the sandbox's template running moat's ``jskernel.js`` under the same
limits as the Python kernel; its frames are validated on the host like any agent's. The
container tier gets every check; gVisor and the microVM one each; the E2B code interpreter
SDK drives it through ``moat serve``.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest
from tests.conftest import require_tier
from tests.server_support import Server, new_key, serving, tenant_name

from moat import InvalidArgumentError, Sandbox, TimeoutError


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    require_tier("container")
    value = "tok-" + secrets.token_hex(12)
    with Sandbox.create(isolation="container", timeout=600, sensitive=[value]) as s:
        s.canary = value  # type: ignore[attr-defined]
        yield s


def _text(sbx: Sandbox, code: str, **kw: object) -> str:
    e = sbx.run_code(code, language="js", **kw)  # type: ignore[arg-type]
    assert e.error is None, e.error
    return (e.results[0].text or "") if e.results else ""


@pytest.mark.container
def test_state_output_results_and_json(box: Sandbox) -> None:
    e = box.run_code("let n = 40; console.log('hi', {a: 1}); console.error('e!'); n + 2",
                     language="js")  # fmt: skip
    assert e.error is None and e.logs.stdout == ["hi { a: 1 }\n"] and e.logs.stderr == ["e!\n"]
    assert [r.text for r in e.results] == ["42"] and e.results[0].is_main_result
    assert _text(box, "n * 2") == "80"  # top-level declarations persist
    r = box.run_code("({a: [1, 2], b: 'z'})", language="js").results[0]
    assert r.json == {"a": [1, 2], "b": "z"} and r.text == "{ a: [ 1, 2 ], b: 'z' }"
    assert _text(box, "Promise.resolve(7)") == "7"  # a returned promise is awaited
    assert _text(box, "'str'") == "str"
    assert box.run_code("let unused = 1", language="js").results == []
    who = _text(box, "require('os').userInfo().username + ' ' + process.cwd()")
    assert who == "user /home/user"


@pytest.mark.container
def test_errors_are_execution_errors_with_the_users_frames(box: Sandbox) -> None:
    e = box.run_code("function f() { throw new TypeError('bad') }\nf()", language="js")
    assert e.error is not None and (e.error.name, e.error.value) == ("TypeError", "bad")
    assert e.error.traceback.splitlines()[:3] == [
        "TypeError: bad", "    at f (<cell>:1:22)", "    at <cell>:2:1",
    ]  # fmt: skip
    assert "jskernel" not in e.error.traceback and "node:" not in e.error.traceback
    e = box.run_code("let = ;", language="js")
    assert e.error is not None and e.error.name == "SyntaxError"
    e = box.run_code("throw 5", language="js")
    assert e.error is not None and e.error.value == "5"
    assert _text(box, "1 + 1") == "2"  # the context survives its errors


@pytest.mark.container
def test_named_contexts_are_separate_and_interrupts_keep_state(box: Sandbox) -> None:
    ctx = box.create_code_context(language="js")
    assert ctx.language == "js"
    assert box.run_code("var q = 3; q", context=ctx).results[0].text == "3"
    assert _text(box, "typeof q") == "undefined"  # the default js context is another
    assert box.run_code("typeof q", context=ctx).results[0].text == "number"
    with pytest.raises(InvalidArgumentError, match="language mismatch"):
        box.run_code("1", language="python", context=ctx)
    # A busy loop is interrupted at the timeout (SIGINT breaks the script); state stays.
    box.run_code("var kept = 'yes'", context=ctx)
    with pytest.raises(TimeoutError):
        box.run_code("while (true) {}", context=ctx, timeout=2)
    assert box.run_code("kept", context=ctx).results[0].text == "yes"
    assert ctx.id in [c.id for c in box.list_code_contexts()]


@pytest.mark.container
def test_output_passes_the_guard(box: Sandbox) -> None:
    value = box.canary  # type: ignore[attr-defined]
    e = box.run_code(f"console.log({value!r}); {value!r} + '!'", language="js")
    assert value not in "".join(e.logs.stdout) and value not in (e.results[0].text or "")
    # positive control: a value the guard was not told about comes through
    other = "tok-" + secrets.token_hex(12)
    assert _text(box, f"{other!r}") == other


@pytest.mark.container
def test_typescript_is_stripped_or_refused_clearly(box: Sandbox) -> None:
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True)
    major, minor = (int(x) for x in node.stdout.strip().lstrip("v").split(".")[:2])
    e = box.run_code("let y: number = 41; y + 1", language="ts")
    if (major, minor) >= (22, 13):
        assert e.error is None and e.results[0].text == "42"
    else:  # never run as JavaScript with the types left in, never a silent drop
        assert e.error is not None and e.error.name == "UnsupportedError"
        assert "Node >= 22.13" in e.error.value


def test_gvisor_and_microvm_run_javascript() -> None:
    for tier in ("gvisor", "microvm"):
        require_tier(tier)
        with Sandbox.create(isolation=tier, timeout=300) as s:
            assert _text(s, "let a = 6; a * 7") == "42"
            assert _text(s, "a + 1") == "7"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_tier("container")
    with serving(tmp_path_factory.mktemp("serve") / "server.log") as srv:
        yield srv


@pytest.mark.container
def test_e2b_code_interpreter_runs_javascript(server: Server) -> None:
    from e2b_code_interpreter import Sandbox as E2BSandbox

    with E2BSandbox.create(api_key=new_key(tenant_name("js"))) as sbx:
        e = sbx.run_code("const xs = [1, 2, 3]; console.log('sum'); xs.reduce((a, b) => a + b)",
                         language="js")  # fmt: skip
        assert e.error is None and e.text == "6" and e.logs.stdout == ["sum\n"]
        ctx = sbx.create_code_context(language="javascript")
        sbx.run_code("var z = 9", context=ctx)
        assert sbx.run_code("z", context=ctx).text == "9"
        e = sbx.run_code("null.x", language="js")
        assert e.error is not None and e.error.name == "TypeError"
