"""The guard on every channel out of a REAL sandbox (invariant 4), on every tier.

The secret is planted inside the sandbox the way an agent would meet it (a file it reads),
and every channel is checked from the caller's side, with a control that the plain text
does come through when it is not registered.
"""

from __future__ import annotations

import base64
import http.server
import secrets
import threading
from collections.abc import Iterator

import pytest
from tests.conftest import TIER_PARAMS, require_tier

from moat import LeakBlockedError, Sandbox
from moat.egress import GatewayConfig, StaticResolver
from moat.guard import GuardPolicy

SECRET = "s3cr3t-" + secrets.token_hex(12)
LABEL = "DB_PASSWORD"


@pytest.fixture(scope="module", params=TIER_PARAMS)
def guarded(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    require_tier(request.param)
    with Sandbox.create(isolation=request.param, timeout=600, sensitive={SECRET: LABEL}) as s:
        s.files.write("creds.txt", f"password={SECRET}\n")
        yield s


def no_secret(*texts: object) -> None:
    for t in texts:
        assert SECRET not in str(t)


def test_every_channel_redacts(guarded: Sandbox) -> None:
    s = guarded
    streamed: list[str] = []
    ex = s.run_code(
        "import sys\ndata = open('creds.txt').read()\nprint(data)\nprint(data, file=sys.stderr)\n"
        "data",
        on_stdout=streamed.append,
        on_stderr=streamed.append,
    )
    assert f"[REDACTED:{LABEL}]" in "".join(ex.logs.stdout)
    no_secret(ex.logs.stdout, ex.logs.stderr, ex.text, streamed)
    assert streamed  # the callbacks ran, and got redacted text only
    ex = s.run_code("raise ValueError(open('creds.txt').read())")
    assert ex.error is not None
    no_secret(ex.error.value, ex.error.traceback)
    ex = s.run_code(
        "class R:\n"
        "    def _repr_html_(self): return '<b>' + open('creds.txt').read()\n"
        "    def _repr_json_(self): return {'p': open('creds.txt').read()}\n"
        "R()"
    )
    no_secret(ex.results[0].html, ex.results[0].json, ex.results[0].text)
    r = s.commands.run("cat creds.txt; cat creds.txt >&2")
    no_secret(r.stdout, r.stderr)
    assert f"[REDACTED:{LABEL}]" in r.stdout
    no_secret(s.files.read("creds.txt"), s.files.read("creds.txt", format="bytes"))
    s.files.write(f"/tmp/{SECRET}.txt", "x")  # a file NAMED after the secret
    no_secret([e.name for e in s.files.list("/tmp")], [e.path for e in s.files.list("/tmp")])
    # encoded forms and a split across the pause-free stream
    r = s.commands.run("base64 -w0 creds.txt; echo; xxd -p creds.txt | tr -d '\\n'; echo")
    no_secret(r.stdout)
    assert base64.b64encode(SECRET.encode()).decode()[:16] not in r.stdout


def test_control_unregistered_text_passes(guarded: Sandbox) -> None:
    plain = "not-a-secret-" + secrets.token_hex(6)
    assert plain in guarded.run_code(f"print({plain!r})").logs.stdout[0]


def test_findings_are_audited_without_values(guarded: Sandbox) -> None:
    rows = [r for r in guarded.audit(limit=10000) if r.get("kind") == "finding"]
    assert {r.get("channel") for r in rows} >= {"stdout", "files"}
    assert all(
        r.get("label") == LABEL
        or r.get("label", "").startswith(("canary", "guard"))
        or r.get("label")
        for r in rows
    )
    no_secret(rows)


def test_canary_in_output_is_flagged(guarded: Sandbox) -> None:
    canary = guarded.guard.canary("github")
    guarded.files.write("notes.md", f"token: {canary}\n")
    out = guarded.commands.run("cat notes.md").stdout
    assert canary not in out
    rows = [r for r in guarded.audit(limit=10000) if r.get("kind") == "finding"]
    assert any(r.get("label", "").startswith("canary:github") for r in rows)


@pytest.mark.parametrize("tier", ["container"])
def test_block_mode_raises_and_returns_nothing(tier: str) -> None:
    require_tier(tier)
    seen: list[str] = []
    with Sandbox.create(isolation=tier, timeout=120, sensitive=[SECRET],
                        guard=GuardPolicy(mode="block")) as s:  # fmt: skip
        with pytest.raises(LeakBlockedError) as info:
            s.run_code(f"print('before')\nprint({SECRET!r})\nprint('after')", on_stdout=seen.append)
        assert SECRET not in str(info.value) and info.value.labels
        no_secret(seen)
        with pytest.raises(LeakBlockedError):
            s.commands.run(f"echo {SECRET}")
        assert s.run_code("1 + 1").text == "2"  # the sandbox is still usable


def test_canary_in_egress_request_is_flagged_and_blocked() -> None:
    require_tier("container")
    received: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            received.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    cfg = GatewayConfig(
        unsafe_allow_private_ranges=True,
        resolver=StaticResolver({"api.example.test": ["127.0.0.1"]}),
    )
    try:
        for mode in ("redact", "block"):
            with Sandbox.create(isolation="container", timeout=120, gateway_config=cfg,
                                network={"allow_out": [f"api.example.test:{port}"]},
                                guard=GuardPolicy(mode=mode)) as s:  # fmt: skip
                canary = s.guard.canary("aws")
                code = (
                    "import urllib.request\n"
                    f"def get(q):\n    try:\n        return urllib.request.urlopen("
                    f"'http://api.example.test:{port}/?q=' + q, timeout=10).status\n"
                    "    except Exception as e:\n        return getattr(e, 'code', repr(e))\n"
                    f"[get('hello'), get({canary!r})]"
                )
                statuses = s.run_code(code).text
                rows = [r for r in s.audit(limit=1000) if r.get("kind") == "finding"]
                assert any(r.get("channel") == "egress" and "canary" in r.get("label", "")
                           for r in rows), rows  # fmt: skip
                if mode == "block":
                    assert statuses == "[200, 403]"
                    assert not any(canary in p for p in received)
                else:
                    assert statuses == "[200, 200]"  # flagged, not blocked
    finally:
        srv.shutdown()
        srv.server_close()
