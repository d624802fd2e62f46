"""run_code, contexts, display, streaming, timeouts: real container sandboxes."""

from __future__ import annotations

import base64
import time

import pytest

from moat import InvalidArgumentError, Result, Sandbox, TimeoutError


def test_trailing_expression_is_main_result(shared_sbx: Sandbox) -> None:
    ex = shared_sbx.run_code("x = 20\nx + 22")
    assert ex.text == "42" and ex.error is None
    assert ex.results[0].is_main_result and ex.results[0].formats() == ["text"]


def test_state_persists_between_calls(shared_sbx: Sandbox) -> None:
    shared_sbx.run_code("counter = 1")
    shared_sbx.run_code("counter += 1")
    assert shared_sbx.run_code("counter").text == "2"


def test_stdout_and_stderr(shared_sbx: Sandbox) -> None:
    ex = shared_sbx.run_code("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert "".join(ex.logs.stdout) == "out\n"
    assert "".join(ex.logs.stderr) == "err\n"
    assert ex.results == []


def test_exception_is_an_execution_error(shared_sbx: Sandbox) -> None:
    ex = shared_sbx.run_code("def f():\n    raise ValueError('bad thing')\nf()")
    assert ex.error is not None
    assert ex.error.name == "ValueError" and ex.error.value == "bad thing"
    assert "<cell>" in ex.error.traceback and "moat" not in ex.error.traceback
    assert shared_sbx.run_code("1").text == "1"  # still usable


def test_syntax_error(shared_sbx: Sandbox) -> None:
    ex = shared_sbx.run_code("def (:")
    assert ex.error is not None and ex.error.name == "SyntaxError"


def test_ipython_shell_lines(shared_sbx: Sandbox) -> None:
    """IPython's ``!cmd`` (E2B's code interpreter is IPython): run in a shell, its output in
    order with the cell's; valid Python is never rewritten, and a cell that is wrong anyway
    reports its own SyntaxError."""
    ex = shared_sbx.run_code("print('before')\n!pwd\nif True:\n    !echo in-block\nprint('after')")
    assert ex.error is None, ex.error
    assert "".join(ex.logs.stdout) == "before\n/home/user\nin-block\nafter\n"
    # "!" inside valid Python (a string at a line's start) stays Python
    ex = shared_sbx.run_code('x = """\n!not a command\n"""\nprint(x.strip())')
    assert "".join(ex.logs.stdout) == "!not a command\n"
    ex = shared_sbx.run_code("!echo never\ndef broken(:")
    assert ex.error is not None and ex.error.name == "SyntaxError"
    assert "never" not in "".join(ex.logs.stdout)


def test_an_indented_cell_runs_as_in_ipython(shared_sbx: Sandbox) -> None:
    """IPython's leading_indent (E2B's suite sends cells from indented triple-quoted strings):
    the first code line's indent comes off every line; error line numbers stay the cell's."""
    ex = shared_sbx.run_code("\n    x = 20\n    if x:\n        x += 1\n    x * 2\n    ")
    assert ex.error is None and ex.text == "42", (ex.error, ex.text)
    ex = shared_sbx.run_code("\n    y = 1\n    1 / 0\n")
    assert ex.error is not None and ex.error.name == "ZeroDivisionError"
    assert "line 3" in ex.error.traceback, ex.error.traceback
    ex = shared_sbx.run_code("x = 1\n  y = 2")  # positive control: still an error after line 1
    assert ex.error is not None and ex.error.name == "IndentationError"


def test_top_level_await(shared_sbx: Sandbox) -> None:
    ex = shared_sbx.run_code("import asyncio\nawait asyncio.sleep(0)\n7")
    assert ex.text == "7"


def test_dataframe_has_text_and_html(shared_sbx: Sandbox) -> None:
    ex = shared_sbx.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})")
    r = ex.results[0]
    assert r.is_main_result and r.html is not None and "<table" in r.html
    assert r.text is not None and "a" in r.text and "b" in r.text
    assert r.data == {"a": [1, 2], "b": [3, 4]}  # E2B's data format: the columns as lists
    assert "data" in r.formats()
    ex = shared_sbx.run_code("pd.DataFrame({'t': pd.to_datetime(['2026-12-02']), 'x': [0.5]})")
    assert ex.results[0].data == {"t": ["2026-12-02T00:00:00"], "x": [0.5]}
    # a large frame has no data, so its (truncated) HTML still fits beside its text
    ex = shared_sbx.run_code("pd.DataFrame({'a': range(40_000), 'b': 'x' * 20})")
    big = ex.results[0]
    assert big.data is None and big.html and "<table" in big.html and big.text
    ex = shared_sbx.run_code("pd.DataFrame({'a': range(20_000), 'b': 'y' * 30})")
    assert ex.results[0].data is None and ex.results[0].html  # few cells, too many bytes
    ex = shared_sbx.run_code("pd.Series([1, 2])")  # not a frame: no data
    assert ex.results[0].data is None and ex.results[0].text


def test_display_sends_results_like_ipython(shared_sbx: Sandbox) -> None:
    """``display()`` is in the namespace, as in Jupyter and E2B: each value a result (not the
    main one), in every format; ``raw=True`` sends a MIME bundle as given."""
    ex = shared_sbx.run_code("import pandas as pd\ndisplay(pd.DataFrame({'a': [1]}), 'two')\n3")
    assert ex.error is None, ex.error
    frame, two, main = ex.results
    assert frame.html and "<table" in frame.html and frame.data == {"a": [1]}
    assert not frame.is_main_result and two.text == "two" and main.is_main_result
    ex = shared_sbx.run_code(
        "display({'text/latex': r'\\text{x}', 'text/html': '<i>x</i>', 'x/unknown': 1}, raw=True)"
    )
    assert ex.error is None, ex.error
    (r,) = ex.results
    assert r.formats() == ["html", "latex"] and r.latex == "\\text{x}"
    assert r.html == "<i>x</i>" and r.text is None  # no text/plain in the bundle: none


def test_matplotlib_show_and_last_value_yield_png(shared_sbx: Sandbox) -> None:
    ex = shared_sbx.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    assert ex.error is None, ex.error
    pngs = [r for r in ex.results if r.png]
    assert len(pngs) == 1 and not pngs[0].is_main_result
    assert base64.b64decode(pngs[0].png or "")[:8] == b"\x89PNG\r\n\x1a\n"
    ex = shared_sbx.run_code("fig, ax = plt.subplots()\nax.bar([1, 2], [3, 4])\nfig")
    main = [r for r in ex.results if r.is_main_result]
    assert len(ex.results) == 1 and main and main[0].png  # shown once, as the main result
    ex = shared_sbx.run_code("plt.figure(); plt.plot([1]); None")  # left open -> shown at end
    assert len([r for r in ex.results if r.png]) == 1


def test_bash_language(shared_sbx: Sandbox) -> None:
    ex = shared_sbx.run_code("echo hi from $0; echo e >&2", language="bash")
    assert "".join(ex.logs.stdout).startswith("hi from") and ex.error is None
    ex = shared_sbx.run_code("exit 3", language="bash")
    assert ex.error is not None and ex.error.name == "CommandExitError"


def test_envs_apply_to_one_call(shared_sbx: Sandbox) -> None:
    code = "import os; repr(os.environ.get('GREETING'))"
    assert shared_sbx.run_code(code, envs={"GREETING": "hey"}).text == "\"'hey'\""
    assert shared_sbx.run_code(code).text == "None"


def test_contexts_are_separate(shared_sbx: Sandbox) -> None:
    a = shared_sbx.create_code_context()
    b = shared_sbx.create_code_context(cwd="/tmp")
    shared_sbx.run_code("v = 'a'", context=a)
    shared_sbx.run_code("v = 'b'", context=b)
    assert shared_sbx.run_code("v", context=a).text == "a"
    assert shared_sbx.run_code("import os; os.getcwd()", context=b).text == "/tmp"
    ids = {c.id for c in shared_sbx.list_code_contexts()}
    assert {a.id, b.id, "default"} <= ids
    shared_sbx.restart_code_context(a)
    ex = shared_sbx.run_code("v", context=a)
    assert ex.error is not None and ex.error.name == "NameError"
    shared_sbx.remove_code_context(b)
    assert b.id not in {c.id for c in shared_sbx.list_code_contexts()}
    # a cwd the user can't enter is the caller's bad input (400 over the wire), not a fault
    before = {c.id for c in shared_sbx.list_code_contexts()}
    for bad in ("/no/such/dir", "/etc/passwd"):
        with pytest.raises(InvalidArgumentError, match="cwd"):
            shared_sbx.create_code_context(cwd=bad)
    assert {c.id for c in shared_sbx.list_code_contexts()} == before
    assert shared_sbx.run_code("1 + 1").text == "2"


def test_streaming_callbacks_arrive_before_return(shared_sbx: Sandbox) -> None:
    seen: list[tuple[float, str]] = []
    results: list[Result] = []
    code = "import time, sys\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')\n5"
    ex = shared_sbx.run_code(
        code, on_stdout=lambda s: seen.append((time.monotonic(), s)), on_result=results.append
    )
    done = time.monotonic()
    assert seen[0][1] == "first\n"
    assert done - seen[0][0] > 1.0  # the first chunk came while the code was still sleeping
    assert results and results[0].text == "5" and ex.text == "5"


def test_slow_sync_callbacks_stall_only_their_own_call(shared_sbx: Sandbox) -> None:
    # Sync callbacks run on their sandbox's own thread, in order and before run_code returns,
    # not on the event loop every sync sandbox shares: while one sleeps, another sandbox's
    # round trips go on; and a callback may itself use the SDK.
    import threading

    chunks: list[str] = []
    wrote: list[str] = []

    def slow(chunk: str) -> None:
        time.sleep(0.5)
        chunks.append(chunk)
        if not wrote:  # back into the SDK, from the callback
            wrote.append(shared_sbx.files.write("/tmp/from-callback.txt", "hi").path)

    with Sandbox.create(isolation="container", timeout=120) as other:
        other.run_code("1")
        gaps: list[float] = []

        def ping() -> None:
            for _ in range(10):
                t = time.monotonic()
                other.run_code("1")
                gaps.append(time.monotonic() - t)
                time.sleep(0.05)

        pinger = threading.Thread(target=ping)
        t0 = time.monotonic()
        pinger.start()
        shared_sbx.run_code(
            "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.2)",
            on_stdout=slow,
        )
        elapsed = time.monotonic() - t0
        pinger.join()
    assert "".join(chunks).split() == ["0", "1", "2"]  # every chunk, in order, before return
    assert elapsed >= 0.5  # positive control: the callback really was slow
    assert max(gaps) < 0.4, gaps  # ...and no other sandbox waited for it
    assert wrote and shared_sbx.files.read("/tmp/from-callback.txt") == "hi"


def test_timeout_interrupts_and_keeps_state(shared_sbx: Sandbox) -> None:
    shared_sbx.run_code("kept = 'yes'")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        shared_sbx.run_code("while True: pass", timeout=1)
    assert time.monotonic() - t0 < 5
    assert info.value.context_restarted is False
    assert shared_sbx.run_code("kept").text == "yes"


def test_a_missed_interrupt_is_repeated(shared_sbx: Sandbox) -> None:
    """Under load the first SIGINT can reach the kernel before the cell's code runs, where it
    is dropped; the agent repeats it while the cell runs, so the cell still stops and the
    context keeps its state. Here the cell itself ignores the first one."""
    shared_sbx.run_code("kept_too = 'yes'")
    code = (
        "import signal, time\n"
        "handler = signal.getsignal(signal.SIGINT)\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "time.sleep(1.25)  # the interrupt (at 1 s) arrives here, and is lost\n"
        "signal.signal(signal.SIGINT, handler)\n"
        "while True: pass"
    )
    with pytest.raises(TimeoutError) as info:
        shared_sbx.run_code(code, timeout=1)
    assert info.value.context_restarted is False
    assert shared_sbx.run_code("kept_too").text == "yes"


def test_timeout_kills_code_that_ignores_interrupts(sbx: Sandbox) -> None:
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        sbx.run_code(code, timeout=1)
    assert time.monotonic() - t0 < 8
    assert info.value.context_restarted is True
    assert sbx.run_code("1 + 1").text == "2"  # a fresh context answers


def test_output_is_capped(shared_sbx: Sandbox) -> None:
    ex = shared_sbx.run_code("import sys\nfor _ in range(600): sys.stdout.write('x' * 16384)")
    assert ex.truncated
    total = sum(len(c) for c in ex.logs.stdout)
    assert total <= 4 * 1024 * 1024
    assert "truncated" in "".join(ex.logs.stderr)
    assert shared_sbx.run_code("2").text == "2"


def test_execution_count(sbx: Sandbox) -> None:
    assert sbx.run_code("1").execution_count == 1
    assert sbx.run_code("1").execution_count == 2
