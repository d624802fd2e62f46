"""The built default template (issue 12): sandboxes that name no template run on
``code-interpreter``, built by ``moat template build --defaults`` (``make install``), on
every tier; nothing of the host's ``/usr`` is in them (invariant 1).

The rest of the suite pins ``MOAT_DEFAULT_TEMPLATE=host`` (tests/conftest.py); these tests
unset it. They need the defaults built in this run's state directory (CI: ``make install``);
missing, they fail (``MOAT_ALLOW_SKIP=1`` skips).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import Sandbox as E2bSandbox
from e2b_code_interpreter import Sandbox as CiSandbox
from tests.conftest import TIER_PARAMS, require, require_tier
from tests.server_support import new_key, serving, tenant_name

from moat import Sandbox
from moat.engine import templating
from moat.errors import TemplateNotBuiltError

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parent.parent
#: On the host's /usr (QEMU: the microVM tier needs it), never in a Debian template.
HOST_ONLY = "/usr/bin/qemu-system-x86_64"
CHART = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [3, 1, 2])\nplt.show()"
FRAME = "import pandas as pd\npd.DataFrame({'city': ['Lyon', 'Oslo'], 'temp_c': [14.2, 3.1]})"


def _require_defaults() -> None:
    built = all(templating.exists(n) for n in ("code-interpreter", "base"))
    require(None if built else "run `moat template build --defaults`", "the default templates")


@pytest.fixture(autouse=True)
def real_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real default: the suite's pin to ``host`` is lifted for these tests (and the
    servers and scripts they start)."""
    monkeypatch.delenv(templating.DEFAULT_ENV, raising=False)
    _require_defaults()


@pytest.fixture
def canary() -> Iterator[tuple[Path, str]]:
    """A file that exists only on the host's /usr (removed after the test)."""
    value = f"moat-dt-canary-{secrets.token_hex(8)}"
    path = Path("/usr/local/share") / f"{value}.txt"
    path.write_text(value)
    try:
        yield path, value
    finally:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module", params=TIER_PARAMS)
def dflt(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """One sandbox per tier on the real default (no template argument)."""
    require_tier(request.param)
    _require_defaults()
    saved = os.environ.pop(templating.DEFAULT_ENV, None)
    try:
        sbx = Sandbox.create(isolation=request.param, timeout=900)
    finally:
        if saved is not None:
            os.environ[templating.DEFAULT_ENV] = saved
    with sbx:
        yield sbx


def test_the_readme_example_runs_on_the_default(dflt: Sandbox) -> None:
    ex = dflt.run_code("import pandas as pd\npd.DataFrame({'x': [1, 2, 3]}).describe()")
    assert ex.error is None and ex.text is not None and "count" in ex.text
    assert ex.results[0].html is not None and "<table" in ex.results[0].html
    ex = dflt.run_code("1 / 0")
    assert ex.error is not None and ex.error.name == "ZeroDivisionError"
    assert dflt.commands.run("uname -r").stdout.strip()
    dflt.files.write("data.csv", "a,b\n1,2\n")
    w = dflt.files.watch_dir(".", recursive=True)
    dflt.commands.run("mkdir -p out && echo 1 > out/r.txt")
    names = {e.name for e in w.get_new_events()}
    w.stop()
    assert "out" in names or "out/r.txt" in names, names


def test_ipython_display_sends_results(dflt: Sandbox) -> None:
    """IPython's own ``display`` (the default template has IPython, as E2B's does; without an
    IPython shell it only prints) sends results too, from each module that has it. Positive
    control: IPython's own formatting (``HTML``, ``Markdown``) reaches the result, so the
    call went through IPython's classes."""
    ex = dflt.run_code(
        "from IPython.display import display, HTML, Markdown\n"
        "import IPython.core.display as core\n"
        "display(HTML('<b>x</b>'), Markdown('*m*'))\n"
        "core.display_html('<i>y</i>', raw=True)\n"
        "display({'text/latex': r'\\text{CustomReprObject}'}, raw=True)"
    )
    assert ex.error is None, ex.error
    assert [r.formats() for r in ex.results] == [["text", "html"], ["text", "markdown"],
                                                 ["html"], ["latex"]]  # fmt: skip
    assert [ex.results[0].html, ex.results[1].markdown] == ["<b>x</b>", "*m*"]
    assert ex.logs.stdout == []  # nothing printed in place of a result


def test_charts_and_frames_render_on_the_default(dflt: Sandbox) -> None:
    ex = dflt.run_code(CHART)
    assert ex.error is None, ex.error
    assert any(r.png for r in ex.results), ex.results  # matplotlib's display support
    ex = dflt.run_code(FRAME)
    assert ex.error is None and ex.results and ex.results[0].html
    assert "Lyon" in ex.results[0].html and "<table" in ex.results[0].html


def test_the_hosts_usr_is_not_in_the_default(dflt: Sandbox, canary: tuple[Path, str]) -> None:
    """Invariant 1: a file only the host's /usr has is not there, nor is a canary planted in
    it now; the template's own Python is what runs (Debian's numpy, not the host's)."""
    path, value = canary
    probe = (
        f"test -e {HOST_ONLY} && echo host-only-visible; "
        f"cat {path} 2>/dev/null; grep -rl {value} /usr/local 2>/dev/null; "
        "python3 -c 'import numpy, sys; print(numpy.__file__)'"
    )
    out = dflt.commands.run(probe, timeout=120).stdout
    assert "host-only-visible" not in out and value not in out, out
    assert "/usr/lib/python3/dist-packages/numpy/" in out, out  # positive: Debian's numpy


def test_the_pool_serves_the_default_and_never_another_root(
    monkeypatch: pytest.MonkeyPatch, canary: tuple[Path, str]
) -> None:
    """The warm pool keeps sandboxes of the default template (a create naming none is then
    served warm), and a warm one started on another default (the setting changed since) is
    killed rather than handed out: a create always gets the default's root."""
    require_tier("container")
    import asyncio

    from moat.engine.engine import Engine
    from moat.sdk.async_ import AsyncSandbox
    from moat.testing import local_transport

    path, value = canary

    async def wait_ready(engine: Engine) -> str:
        for _ in range(400):
            if engine.pool.ready("container"):
                return str(engine.pool.ready("container")[0].id)
            await asyncio.sleep(0.05)
        raise AssertionError("the pool did not fill")

    async def main() -> None:
        monkeypatch.setenv(templating.DEFAULT_ENV, "host")  # the pool fills on the host's /usr
        engine = Engine(pool={"container": 1})
        first = await AsyncSandbox.create(
            isolation="container", transport=local_transport(engine), timeout=60
        )
        host_warm = await wait_ready(engine)
        monkeypatch.delenv(templating.DEFAULT_ENV)  # now the built code-interpreter
        second = await AsyncSandbox.create(
            isolation="container", transport=local_transport(engine), timeout=60
        )
        assert second.sandbox_id != host_warm  # the host-rooted warm one was not used
        seen = await second.commands.run(f"cat {path} 2>/dev/null || echo absent")
        assert seen.stdout.strip() == "absent"
        # the pool refills on the default template: the next create is served warm from it
        await second.kill()
        warm = await wait_ready(engine)
        assert warm != host_warm
        third = await AsyncSandbox.create(
            isolation="container", transport=local_transport(engine), timeout=60
        )
        assert third.sandbox_id == warm  # served from the pool
        out = await third.commands.run(
            f"cat {path} 2>/dev/null || echo absent; test -e {HOST_ONLY} && echo host || echo none"
        )
        assert out.stdout.split() == ["absent", "none"]  # no host /usr in a warm default
        assert (await third.run_code("import numpy; numpy.__name__")).text == "numpy"
        control = await first.commands.run(f"cat {path}")  # positive control: host's /usr
        assert control.stdout.strip() == value
        for s in (first, third):
            await s.kill()
        await engine.pool.close()

    asyncio.run(main())


def test_positive_control_the_host_template_sees_the_canary(canary: tuple[Path, str]) -> None:
    """The same probe on ``template="host"`` sees both (so the check above can fail)."""
    require_tier("container")
    path, value = canary
    with Sandbox.create(template="host", isolation="container", timeout=120) as s:
        out = s.commands.run(f"test -e {HOST_ONLY} && echo host-only-visible; cat {path}").stdout
    assert "host-only-visible" in out and value in out, out


def test_the_demo_runs_on_the_default() -> None:
    """``make demo``: examples/demo.py (container tier), on the built default."""
    require_tier("container")
    env = {k: v for k, v in os.environ.items() if k != templating.DEFAULT_ENV}
    env["PYTHONPATH"] = str(ROOT / "src")
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "mean temperature: 12.366" in out.stdout and "Oslo" in out.stdout, out.stdout
    assert "blocked:" in out.stdout and "connected!" not in out.stdout, out.stdout


@pytest.mark.parametrize("tier", TIER_PARAMS)
def test_e2b_sdks_get_base_and_code_interpreter(tier: str, tmp_path: Path) -> None:
    """Over ``moat serve``: E2B's ``base`` is moat's ``base`` (no numpy), the code
    interpreter SDK's ``code-interpreter-v1`` is ``code-interpreter``; neither has the
    host's /usr."""
    require_tier(tier)
    with serving(tmp_path / "serve.log", tier=tier) as srv:
        key = new_key(tenant_name("dt"))
        with E2bSandbox.create(api_key=key, timeout=600) as s:
            assert s.get_info().template_id == "base"
            r = s.commands.run(
                f"test -e {HOST_ONLY} && echo host-only-visible; git --version; node --version; "
                "python3 -c 'import numpy' 2>&1 | tail -n 1",
                timeout=120,
            )
            assert "host-only-visible" not in r.stdout and "git version" in r.stdout, r.stdout
            assert "No module named 'numpy'" in r.stdout, r.stdout  # base, not the interpreter
        with CiSandbox.create(api_key=key, timeout=600) as c:
            ex = c.run_code(FRAME)
            assert ex.error is None and ex.results[0].html and "Lyon" in ex.results[0].html
            ex = c.run_code(CHART)
            assert any(r.png for r in ex.results), ex.results
            out = c.commands.run(f"test -e {HOST_ONLY} && echo host-only-visible; echo done")
            assert "host-only-visible" not in out.stdout and "done" in out.stdout
        assert "not built" not in srv.log.read_text()


def _empty_state(tmp_path: Path) -> Path:
    """A state directory with no templates (the tiers' shared assets linked in)."""
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(state, 0o755)
    real = Path(os.environ.get("MOAT_STATE_DIR") or "/var/lib/moat")
    for shared in ("microvm", "gvisor-compat"):
        if (real / shared).exists():
            (state / shared).symlink_to((real / shared).resolve())
    return state


def test_a_default_not_built_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty template store: the create fails naming the command, in the SDK and over the
    wire, and nothing falls back to the host's /usr (invariant 7)."""
    require_tier("container")
    monkeypatch.setenv("MOAT_STATE_DIR", str(_empty_state(tmp_path)))
    with pytest.raises(TemplateNotBuiltError, match="moat template build --defaults"):
        Sandbox.create(isolation="container", timeout=60)
    with serving(tmp_path / "serve.log", tier="container") as srv:
        key = new_key(tenant_name("dt"))
        for cls in (E2bSandbox, CiSandbox):
            with pytest.raises(Exception, match="moat template build --defaults") as e:
                cls.create(api_key=key, timeout=60)
            assert str(tmp_path) not in str(e.value)  # no host path (invariant 8)
        log = srv.log.read_text()
    assert "warning: template 'code-interpreter' is not built" in log, log[-2000:]
