"""moat's SDK over its HTTP transport against a real ``moat serve``, beside the embedded SDK.

Each check makes the same calls through both (``local``: this process's engine; ``remote``:
``Sandbox.create(api_url=..., api_key=...)``) and compares the results field by field: the
same classes, values and exceptions. Then what only the wire has: keys, tenants, secrets in
responses, options the server's policy decides.
"""

from __future__ import annotations

import io
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from tests.server_support import Server, new_key, tenant_name

from moat import (
    CommandExitError,
    Execution,
    InvalidArgumentError,
    IsolationUnavailableError,
    NotFoundError,
    PolicyError,
    Sandbox,
    Secret,
    TimeoutError,
)
from moat.errors import (
    AuthenticationError,
    LeakBlockedError,
    QuotaExceededError,
    SandboxDiedError,
    SandboxError,
)
from moat.sdk._loop import loop_thread
from moat.sdk.transport import _wire as w
from moat.sdk.transport.http import HttpTransport

pytestmark = [pytest.mark.container, pytest.mark.slow]


@pytest.fixture(scope="module")
def key(server: Server) -> str:
    return new_key(tenant_name("sdk"))


@pytest.fixture(scope="module")
def pair(server: Server, key: str) -> Iterator[tuple[Sandbox, Sandbox]]:
    """(local, remote): one embedded sandbox and one through the server, same tier."""
    local = Sandbox.create(isolation="container", timeout=900)
    remote = Sandbox.create(isolation="container", timeout=900, api_url=server.url, api_key=key)
    yield local, remote
    local.kill()
    remote.kill()


@contextmanager
def transport(url: str, api_key: str) -> Iterator[HttpTransport]:
    """An HTTP transport of the test's own, its connections closed after."""
    t = HttpTransport(url, api_key)
    try:
        yield t
    finally:
        loop_thread().run(t.aclose())


def both(pair: tuple[Sandbox, Sandbox], call: Callable[[Sandbox], Any]) -> tuple[Any, Any]:
    """``call`` on each sandbox: its result, or the exception it raised (as a value)."""
    out = []
    for sbx in pair:
        try:
            out.append(call(sbx))
        except Exception as exc:  # noqa: BLE001 - the exception is the result compared
            out.append(exc)
    return out[0], out[1]


def same_error(a: Any, b: Any, cls: type[BaseException]) -> None:
    assert isinstance(a, cls) and type(a) is type(b), (a, b)
    assert str(a) == str(b)


def _entry(e: Any) -> dict[str, Any]:
    d: dict[str, Any] = e.to_dict()
    d.pop("modified_time")
    return d


# -- code ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "import sys\nprint('out')\nprint('err', file=sys.stderr)\n40 + 2",
        "def f():\n    raise ValueError('bad thing')\nf()",
        "def (:",
        "class R:\n    def _repr_html_(self): return '<b>x</b>'\n"
        "    def _repr_json_(self): return {'a': [1, 2]}\n"
        "    def _repr_png_(self): return bytes(range(40))\n"
        "    def __repr__(self): return 'R()'\nR()",
        "import base64\nprint(base64.b64encode(bytes(range(256))).decode())",
    ],
)
def test_run_code_same_execution(pair: tuple[Sandbox, Sandbox], code: str) -> None:
    local, remote = both(pair, lambda s: s.run_code(code))
    assert isinstance(local, Execution) and isinstance(remote, Execution)
    ld, rd = local.to_dict(), remote.to_dict()
    # Each sandbox counts its own executions; everything else is the same.
    ld.pop("execution_count"), rd.pop("execution_count")
    assert ld == rd
    assert remote.execution_count is not None


def test_a_figure_s_chart_is_the_same_over_http(pair: tuple[Sandbox, Sandbox]) -> None:
    code = "import matplotlib.pyplot as plt\nplt.pie([1, 3], labels=['a', 'b'])\nplt.show()"
    local, remote = both(pair, lambda s: s.run_code(code))
    assert isinstance(local, Execution) and isinstance(remote, Execution)
    (lr,), (rr,) = local.results, remote.results
    assert rr.chart is not None and rr.chart == lr.chart and rr.chart["type"] == "pie"
    assert rr.formats() == lr.formats() == ["text", "png", "chart"]


def test_bash_and_contexts(pair: tuple[Sandbox, Sandbox]) -> None:
    local, remote = both(pair, lambda s: s.run_code("echo $((6*7))", language="bash"))
    assert local.logs == remote.logs and local.logs.stdout == ["42\n"]

    def contexts(s: Sandbox) -> tuple[Any, ...]:
        ctx = s.create_code_context(cwd="/tmp")
        s.run_code("x = 41", context=ctx)
        seen = s.run_code("x + 1", context=ctx.id).text
        listed = [(c.language, c.cwd) for c in s.list_code_contexts() if c.id == ctx.id]
        s.restart_code_context(ctx)
        after = s.run_code("x", context=ctx).error
        s.remove_code_context(ctx)
        try:
            s.run_code("1", context=ctx)
        except NotFoundError as exc:  # its message: the agent's, or the server's naming the id
            gone = type(exc).__name__
        return (ctx.language, ctx.cwd), seen, listed, after and after.name, gone

    local, remote = both(pair, contexts)
    assert local == remote
    assert local[1] == "42" and local[3] == "NameError"


def test_streaming_callbacks_in_order(pair: tuple[Sandbox, Sandbox]) -> None:
    code = "import sys\nprint('a')\nprint('b', file=sys.stderr)\nprint('c')\n6 * 7"

    def seen(s: Sandbox) -> list[tuple[str, str]]:
        calls: list[tuple[str, str]] = []
        for cell in (code, "print('d')\n1/0"):
            s.run_code(
                cell,
                on_stdout=lambda t: calls.append(("out", t)),
                on_stderr=lambda t: calls.append(("err", t)),
                on_result=lambda r: calls.append(("result", str(r.text))),
                on_error=lambda e: calls.append(("error", e.name)),
            )
        return calls

    local, remote = both(pair, seen)
    assert local == remote
    assert ("result", "42") in local and ("err", "b\n") in local
    assert ("error", "ZeroDivisionError") in local


@pytest.mark.parametrize(
    ("code", "timeout"),
    [
        # before any output: the server answers with an error status
        ("import time\ntime.sleep(20)", 0.5),
        # after output: the stream has begun, the failure comes as a line of it
        ("print('started', flush=True)\nimport time\ntime.sleep(20)", 1.5),
    ],
)
def test_run_code_timeout_is_the_same_error(
    pair: tuple[Sandbox, Sandbox], code: str, timeout: float
) -> None:
    local, remote = both(pair, lambda s: s.run_code(code, timeout=timeout))
    same_error(local, remote, TimeoutError)
    assert local.context_restarted == remote.context_restarted
    # both sandboxes still run code afterwards
    assert [s.run_code("2 + 2").text for s in pair] == ["4", "4"]


def test_truncated_output_flag(pair: tuple[Sandbox, Sandbox]) -> None:
    code = "print('x' * (6 << 20))"  # past the default 4 MiB per-call cap
    local, remote = both(pair, lambda s: s.run_code(code))
    assert local.truncated and remote.truncated


# -- commands --------------------------------------------------------------------------------


def test_commands_foreground_exit_and_env(pair: tuple[Sandbox, Sandbox]) -> None:
    run = "pwd; echo $FOO; echo oops >&2"
    local, remote = both(pair, lambda s: s.commands.run(run, cwd="/tmp", envs={"FOO": "bar"}))
    assert local.to_dict() == remote.to_dict() and local.stdout == "/tmp\nbar\n"
    local, remote = both(pair, lambda s: s.commands.run("echo partial; echo why >&2; exit 7"))
    assert isinstance(local, CommandExitError) and isinstance(remote, CommandExitError)
    assert (local.exit_code, local.stdout, local.stderr) == (
        remote.exit_code,
        remote.stdout,
        remote.stderr,
    )
    local, remote = both(pair, lambda s: s.commands.run("cat | tr a-z A-Z", stdin="shout"))
    assert local.stdout == remote.stdout == "SHOUT"


def test_commands_background_stdin_kill_reattach(pair: tuple[Sandbox, Sandbox]) -> None:
    def flow(s: Sandbox) -> tuple[Any, ...]:
        chunks: list[str] = []
        h = s.commands.run(
            "read line; echo got:$line; sleep 60", background=True, stdin=True,
            on_stdout=chunks.append,
        )  # fmt: skip
        listed = h.pid in [p.pid for p in s.commands.list()]
        cmd = next(p.cmd for p in s.commands.list() if p.pid == h.pid)
        again = s.commands.connect(h.pid)
        h.send_stdin("hi\n")
        s.run_code("import time; time.sleep(0.5)")  # the echo arrives meanwhile
        killed = s.commands.kill(h.pid)
        try:
            h.wait(timeout=10)
        except CommandExitError as exc:
            code = exc.exit_code
        try:
            again.wait(timeout=10)
        except CommandExitError as exc:
            code_again = exc.exit_code
        return listed, cmd, killed, code, code_again, "".join(chunks), s.commands.kill(h.pid)

    local, remote = both(pair, flow)
    assert local == remote
    assert local[0] and local[2] and local[5] == "got:hi\n" and local[6] is False


def test_command_wait_timeout(pair: tuple[Sandbox, Sandbox]) -> None:
    local, remote = both(pair, lambda s: s.commands.run("sleep 30", timeout=1))
    same_error(local, remote, TimeoutError)
    assert all("sleep 30" not in p.cmd for s in pair for p in s.commands.list())


# -- files -----------------------------------------------------------------------------------


def test_files_round_trip(pair: tuple[Sandbox, Sandbox]) -> None:
    big = os.urandom(3 << 20)

    def flow(s: Sandbox) -> tuple[Any, ...]:
        wrote = _entry(s.files.write("/home/user/t/a.txt", "héllo"))
        streamed = _entry(s.files.write("t/big.bin", io.BytesIO(big)))
        text = s.files.read("t/a.txt")
        data = s.files.read("t/big.bin", format="bytes")
        listing = sorted(_entry(e)["name"] for e in s.files.list("t"))
        made = (s.files.make_dir("t/d/e"), s.files.make_dir("t/d/e"))
        moved = _entry(s.files.rename("t/a.txt", "t/d/e/b.txt"))
        info = _entry(s.files.get_info("t/d"))
        deep = sorted(e.path for e in s.files.list("t", depth=3))
        s.files.remove("t/d/e/b.txt")
        exists = (s.files.exists("t/d/e/b.txt"), s.files.exists("t/big.bin"))
        return wrote, streamed, text, data == big, listing, made, moved, info, deep, exists

    local, remote = both(pair, flow)
    assert local == remote
    assert local[2] == "héllo" and local[3] and local[5] == (True, False)


def test_file_errors_are_the_same(pair: tuple[Sandbox, Sandbox]) -> None:
    local, remote = both(pair, lambda s: s.files.read("/nope/missing"))
    same_error(local, remote, NotFoundError)
    local, remote = both(pair, lambda s: s.files.get_info("/nope/missing"))
    same_error(local, remote, NotFoundError)
    local, remote = both(pair, lambda s: s.files.read(""))
    same_error(local, remote, InvalidArgumentError)
    local, remote = both(pair, lambda s: s.files.remove("/nope/missing"))
    same_error(local, remote, NotFoundError)
    local, remote = both(pair, lambda s: s.files.read("/tmp"))  # a directory
    same_error(local, remote, InvalidArgumentError)
    local, remote = both(pair, lambda s: s.commands.connect(99999))
    same_error(local, remote, NotFoundError)


# -- lifecycle -------------------------------------------------------------------------------


def test_info_list_timeout_kill(server: Server, key: str) -> None:
    tag = secrets.token_hex(4)
    sbx = Sandbox.create(
        isolation="container", timeout=60, metadata={"run": tag}, api_url=server.url, api_key=key
    )
    other = Sandbox.create(timeout=60, metadata={"run": tag + "x"}, api_url=server.url, api_key=key)
    try:
        info = sbx.get_info()
        assert (info.sandbox_id, info.tier, info.template) == (
            sbx.sandbox_id,
            "container",
            "default",
        )
        assert info.metadata == {"run": tag} and info.state == "running"
        with transport(server.url, key) as t:
            listed = loop_thread().run(t.list_sandboxes(metadata={"run": tag}))
            assert loop_thread().run(t.list_sandboxes(state="ended", metadata={"run": tag})) == []
            with pytest.raises(InvalidArgumentError):
                loop_thread().run(t.list_sandboxes(state="gone"))
        assert [i.sandbox_id for i in listed] == [sbx.sandbox_id]
        assert listed[0] == sbx.get_info()
        sbx.set_timeout(600)
        assert (sbx.get_info().end_at - info.end_at).total_seconds() > 400
        assert sbx.is_running()
        sbx.kill()
        assert not sbx.is_running()
        with pytest.raises(NotFoundError, match="the sandbox was killed"):  # as embedded
            sbx.run_code("1")
        with pytest.raises(NotFoundError):
            sbx.commands.run("true")
        with pytest.raises(NotFoundError):
            sbx.get_info()
        with transport(server.url, key) as t:
            assert loop_thread().run(t.kill(sbx.sandbox_id)) is False
        # ended sandboxes are listed when asked for (moat's extension), as embedded
        ended = Sandbox.list(state="ended", metadata={"run": tag}, api_url=server.url, api_key=key)
        assert [(i.sandbox_id, i.state) for i in ended] == [(sbx.sandbox_id, "ended")]
        assert Sandbox.list(metadata={"run": tag}, api_url=server.url, api_key=key) == []
    finally:
        sbx.kill()
        other.kill()


def test_calls_after_the_end_raise_why(server: Server, key: str) -> None:
    """A killed sandbox, one past its lifetime: the same errors as embedded (the reason from
    the audit trail), on every path (code, commands, files, contexts)."""

    def after(sbx: Sandbox, end: Callable[[], None]) -> list[Any]:
        end()
        calls: list[Callable[[], Any]] = [
            lambda: sbx.run_code("1"),
            lambda: sbx.commands.run("true"),
            lambda: sbx.files.read("x"),
            lambda: sbx.files.list("."),
            lambda: sbx.list_code_contexts(),
        ]
        out = []
        for call in calls:
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - the exception is the result compared
                out.append((type(exc), str(exc)))
        return out

    local = Sandbox.create(isolation="container", timeout=60)
    remote = Sandbox.create(isolation="container", timeout=60, api_url=server.url, api_key=key)
    killed = after(local, local.kill), after(remote, remote.kill)
    assert killed[0] == killed[1] and killed[0][0][0] is NotFoundError
    local = Sandbox.create(isolation="container", timeout=2)
    remote = Sandbox.create(isolation="container", timeout=2, api_url=server.url, api_key=key)
    timed = after(local, lambda: time.sleep(3)), after(remote, lambda: None)
    assert timed[0] == timed[1] and timed[0][0][0] is TimeoutError
    assert len(timed[0]) == 5


def test_audit_over_the_wire(pair: tuple[Sandbox, Sandbox]) -> None:
    for s in pair:
        s.run_code("1 + 1")
    local, remote = both(pair, lambda s: s.audit(limit=5))
    assert {r["kind"] for r in local} == {r["kind"] for r in remote}
    assert any(r["kind"] == "exec" for r in remote)
    assert all(r["sandbox_id"] == pair[1].sandbox_id for r in remote)


def test_env_selects_the_transport(
    server: Server, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOAT_API_URL", server.url)
    monkeypatch.setenv("MOAT_API_KEY", key)
    with Sandbox.create(timeout=60) as sbx:
        assert isinstance(sbx._a._t, HttpTransport)
        assert sbx.run_code("6 * 7").text == "42"


# -- what only the wire has -------------------------------------------------------------------


def test_the_server_names_the_class(server: Server, key: str) -> None:
    """A PolicyError answers 400 (which alone reads as InvalidArgumentError): the Moat-Error
    header names the class, so the caller gets the embedded SDK's exception."""
    bad = {"allow_out": ["*.com"]}  # a wildcard over a public suffix
    with pytest.raises(PolicyError) as local:
        Sandbox.create(timeout=60, network=bad)
    with pytest.raises(PolicyError) as remote:
        Sandbox.create(timeout=60, network=bad, api_url=server.url, api_key=key)
    assert type(local.value) is type(remote.value) and str(local.value) == str(remote.value)


def test_update_network(pair: tuple[Sandbox, Sandbox]) -> None:
    good = {"allow_out": ["example.com"], "deny_out": ["evil.example.com"]}
    local, remote = both(pair, lambda s: s.update_network(good))
    assert local is None and remote is None
    local, remote = both(pair, lambda s: s.update_network({"allow_out": ["*.com"]}))
    same_error(local, remote, PolicyError)
    local, remote = both(pair, lambda s: s.update_network(None))  # back to deny-all
    assert local is None and remote is None


def test_wrong_key_is_an_authentication_error(server: Server) -> None:
    bad = "e2b_" + "0" * 40
    with pytest.raises(AuthenticationError):
        Sandbox.create(timeout=60, api_url=server.url, api_key=bad)
    with pytest.raises(AuthenticationError):
        Sandbox.create(timeout=60, api_url=server.url, api_key="")


def test_another_tenants_sandbox_is_not_found(
    server: Server, key: str, pair: tuple[Sandbox, Sandbox]
) -> None:
    sid = pair[1].sandbox_id
    with transport(server.url, key) as mine:  # positive control: the id exists
        assert loop_thread().run(mine.info(sid)).sandbox_id == sid
    with transport(server.url, new_key(tenant_name("eve"))) as theirs:
        _not_found_for(theirs, sid)
    assert pair[1].run_code("1").text == "1"  # untouched


def _not_found_for(theirs: HttpTransport, sid: str) -> None:
    unknown = "sbx-" + "0" * 16
    for target in (sid, unknown):
        calls = [
            theirs.info(target),
            theirs.audit(target),
            theirs.read_file(target, "/etc/hostname", "text"),
            theirs.stat(target, "/"),
            theirs.list_commands(target),
            theirs.create_context(target, "python", None),
        ]
        messages = []
        for call in calls:
            with pytest.raises(NotFoundError) as info:
                loop_thread().run(call)
            messages.append(str(info.value).replace(target, "ID"))
        assert loop_thread().run(theirs.kill(target)) is False
        if target == sid:
            first = messages
        else:
            assert messages == first  # another tenant's id answers exactly like an unknown


def test_secrets_never_cross_the_wire(server: Server, key: str) -> None:
    value = "sk-live-" + secrets.token_hex(16)
    other = "pw-" + secrets.token_hex(12)
    with Sandbox.create(
        timeout=120,
        secrets={"API_TOKEN": Secret(value, hosts=["api.example.com"])},
        sensitive=[other],
        api_url=server.url,
        api_key=key,
    ) as sbx:
        seen = sbx.run_code("import os\nprint(os.environ['API_TOKEN'])").logs.stdout
        assert seen and value not in "".join(seen)  # a placeholder inside (invariant 3)
        # The guard on the reply channel through the server (invariant 4): code that prints
        # the values (the test wrote them into it) gets them redacted, a plain word through.
        out = sbx.run_code(f"print('{value}', '{other}', 'plain-{other[:3]}')").logs.stdout
        assert value not in "".join(out) and other not in "".join(out)
        assert "plain-pw-" in "".join(out)  # positive control: output does come back
        # No endpoint returns them: info, list, audit, contexts, files.
        h = {"X-API-Key": key}
        bodies = [
            httpx.get(f"{server.url}/sandboxes/{sbx.sandbox_id}", headers=h).text,
            httpx.get(f"{server.url}/v2/sandboxes", headers=h).text,
            httpx.get(f"{server.url}/moat/v1/sandboxes/{sbx.sandbox_id}/audit", headers=h).text,
        ]
        sbx.files.write("env.txt", "x")
        bodies.append(str(sbx.get_info()) + str(sbx.audit()) + str(sbx.files.list(".")))
        assert sbx.sandbox_id in bodies[0]  # positive control: these are its replies
        for body in bodies:
            assert value not in body and other not in body


def test_server_chosen_options_fail_closed(server: Server, key: str) -> None:
    for kwargs in (
        {"limits": {"memory_mb": 256}},
        {"trust": "trusted"},
        {"guard": {"mode": "off"}},
    ):
        with pytest.raises(PolicyError):
            Sandbox.create(timeout=60, api_url=server.url, api_key=key, **kwargs)
    with transport(server.url, key) as t:
        before = len(loop_thread().run(t.list_sandboxes()))
        # The server runs the container tier: another is an error, never a downgrade.
        with pytest.raises(IsolationUnavailableError):
            Sandbox.create(isolation="gvisor", timeout=60, api_url=server.url, api_key=key)
        assert len(loop_thread().run(t.list_sandboxes())) == before  # it was killed
        with pytest.raises(InvalidArgumentError):
            Sandbox.create(api_url=server.url, api_key=key, transport=t)
    with Sandbox.create(timeout=60, api_url=server.url, api_key=key) as sbx:
        with pytest.raises(PolicyError):
            sbx.guard  # noqa: B018 - the property raises
        with pytest.raises(PolicyError):  # envd's wire has SIGKILL and SIGTERM only
            loop_thread().run(sbx._a._t.signal(sbx.sandbox_id, 1, "SIGINT"))
    with pytest.raises(InvalidArgumentError):
        Sandbox.create(api_url="ftp://x", api_key=key)


# -- the error mapping (pure) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (400, {"code": 400, "message": "bad"}, InvalidArgumentError),
        (401, {"code": 401, "message": "invalid key"}, AuthenticationError),
        (404, {"code": 404, "message": "sandbox x was not found"}, NotFoundError),
        (429, {"code": 429, "message": "too many"}, QuotaExceededError),
        (429, {"message": "too many", "moatError": "QuotaExceededError"}, QuotaExceededError),
        # the edge's "not found": the transport then asks the audit trail why
        (502, {"message": "The sandbox was not found", "code": 502}, w.Gone),
        (502, {"message": "bad gateway"}, SandboxDiedError),
        (504, None, TimeoutError),
        # the server names the class: it wins over the status
        (403, {"message": "output blocked by the guard on stdout: a, b",
               "moatError": "LeakBlockedError", "labels": ["a", "b"], "channel": "stdout"},
         LeakBlockedError),
        (500, {"message": "m", "moatError": "SandboxDiedError"}, SandboxDiedError),
        # a name outside moat's tree is never instantiated: the status decides
        (400, {"message": "m", "moatError": "SystemExit"}, InvalidArgumentError),
    ],
)  # fmt: skip
def test_error_mapping(status: int, body: Any, cls: type[Exception]) -> None:
    exc = w.error(status, body, "sbx-1234", retry_after="3")
    assert type(exc) is cls
    if isinstance(exc, QuotaExceededError):
        assert exc.retry_after == 3.0
    if isinstance(exc, LeakBlockedError):
        assert (exc.labels, exc.channel) == (["a", "b"], "stdout")
        assert str(exc) == body["message"]
    assert w.leak("output blocked by the guard on files: k").labels == ["k"]


def test_http_transport_loads_no_engine_or_server() -> None:
    code = (
        "import json, sys, moat.sdk.transport.http, moat.sdk.async_; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('moat'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = out.stdout
    assert "moat.sdk.transport.http" in loaded
    for part in ("moat.engine", "moat.server", "moat.runtime", "moat.egress", "moat.guard"):
        assert part + "." not in loaded and f'"{part}"' not in loaded, loaded


def test_streams_have_an_idle_limit_not_a_call_limit(
    server: Server, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call may run longer than any read timeout (the server's keepalives arrive every
    5 s on /execute); a silence longer than STREAM_IDLE fails it (a dead server)."""
    import moat.sdk.transport.http as transport_http

    code = "import time\ntime.sleep(8)\n7"
    for idle, ok in ((6.0, True), (3.0, False)):  # 3 s < the keepalive: the control fails
        monkeypatch.setattr(transport_http, "STREAM_IDLE", idle)
        with transport(server.url, key) as t, Sandbox.create(timeout=60, transport=t) as sbx:
            if ok:
                assert sbx.run_code(code, timeout=30).text == "7"
            else:
                with pytest.raises(SandboxError, match="unreachable"):
                    sbx.run_code(code, timeout=30)


def test_cancelling_run_code_interrupts_it(server: Server, key: str) -> None:
    """The caller leaves (its task is cancelled): the server interrupts the code, and the
    context runs the next cell (as embedded, where cancelling stops the call)."""
    import asyncio

    from moat import AsyncSandbox

    async def flow() -> str | None:
        t = HttpTransport(server.url, key)
        sbx = await AsyncSandbox.create(timeout=60, transport=t)
        try:
            task = asyncio.ensure_future(sbx.run_code("import time\ntime.sleep(30)\n'slept'"))
            await asyncio.sleep(1.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            started = time.monotonic()
            text = (await sbx.run_code("'next'", timeout=20)).text
            assert time.monotonic() - started < 15  # not after the 30 s sleep
            return text
        finally:
            await sbx.kill()
            await t.aclose()

    assert asyncio.run(flow()) == "next"


def test_a_remote_only_program_never_loads_the_engine(server: Server, key: str) -> None:
    """A program that uses only a server ends cleanly without loading the engine (its exit
    hook kills local sandboxes only when the engine was loaded)."""
    code = (
        "import atexit, sys\n"
        "loaded = lambda: 'engine' if 'moat.engine.api' in sys.modules else 'clean'\n"
        "atexit.register(lambda: print(loaded()))\n"
        "from moat import Sandbox\n"
        f"s = Sandbox.create(timeout=60, api_url={server.url!r}, api_key={key!r})\n"
        "print(s.run_code('6 * 7').text)\n"
        "s.kill()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["42", "clean"], out.stdout
    assert "Traceback" not in out.stderr


def test_pty_over_the_wire(pair: tuple[Sandbox, Sandbox]) -> None:
    """Terminals through moat serve: the same session semantics as embedded (size, resize,
    Ctrl-C, Ctrl-D), re-attach by pid, env/cwd, and the same refusals."""
    from tests.test_pty import Screen, _session, _shell

    _, remote = pair
    _session(remote)
    first, second = Screen(), Screen()
    h = _shell(remote, first)
    h.disconnect()
    again = remote.pty.connect(h.pid, on_data=second)
    again.send_stdin(b"echo re$((1+1))attached\nexit 3\n")
    second.wait_for(b"re2attached")
    with pytest.raises(CommandExitError) as err:
        again.wait()
    assert err.value.exit_code == 3
    screen = Screen()
    remote.pty.create(
        90, 20, on_data=screen, envs={"ABC": "x-1-y"}, cwd="/tmp", cmd='echo "$ABC $PWD $(tty)"'
    ).wait()
    assert b"x-1-y /tmp /dev/pts/" in screen.data
    for cols, rows in ((0, 24), (80, 100_000), (-1, 24)):
        with pytest.raises(InvalidArgumentError):
            remote.pty.create(cols, rows)
    # a killed terminal's pid answers False on both faces
    k = remote.pty.create(80, 24, cmd="sleep 600")
    assert remote.pty.kill(k.pid) is True
    with pytest.raises(CommandExitError):
        k.wait()


def test_watch_dir_over_the_wire(pair: tuple[Sandbox, Sandbox]) -> None:
    """Directory watches through moat serve give the embedded SDK's events, in both forms."""
    from tests.test_watch import _kinds, _wait_for

    from moat.model import FilesystemEvent

    seen: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {}
    for name, box in zip(("local", "remote"), pair, strict=True):
        box.files.make_dir("wq1")
        got: list[FilesystemEvent] = []
        handle = box.files.watch_dir("wq1", got.append)
        box.commands.run("cd ~/wq1 && echo a > f && chmod 600 f && mv f g && rm g")
        _wait_for(got, ("g", "remove"))
        handle.stop()
        box.files.make_dir("wq2")
        poll = box.files.watch_dir("wq2", include_entry=True)
        box.files.write("wq2/x.txt", "hello")
        events = poll.get_new_events()
        entry = events[-1].entry
        assert entry is not None and entry.path == "/home/user/wq2/x.txt" and entry.size == 5
        poll.stop()
        seen[name] = (_kinds(got), _kinds(events))
        with pytest.raises(NotFoundError):
            box.files.watch_dir("no-such-dir")
        with pytest.raises(InvalidArgumentError, match="not a directory"):
            box.files.watch_dir("wq2/x.txt")
    assert seen["remote"] == seen["local"]
    assert seen["local"][0] == [
        ("f", "create"), ("f", "write"), ("f", "chmod"), ("f", "rename"), ("g", "create"),
        ("g", "remove"),
    ]  # fmt: skip
