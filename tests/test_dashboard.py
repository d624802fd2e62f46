"""The dashboard without a browser: its parts, and a real ``moat serve`` driven over httpx.

Forms that change state (login, logout, kill) are refused without the session's token or
from another origin (each with a positive control: the same request done right works), and
every such action, refused or not, is in the audit trail. The browser tests are in
tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.conftest import require_tier
from tests.dashboard_support import csrf_of, http_login
from tests.server_support import MOAT, Server, new_key, serving, tenant_name

from moat.dashboard.auth import MAX_TENANT_SESSIONS, MAX_TENANT_STREAMS, Sessions, admin_tenants
from moat.dashboard.words import explain
from moat.engine.activity import MAX_CALLS, MAX_TEXT, Activity
from moat.errors import InvalidArgumentError
from moat.store import AuditLog

# -- parts -------------------------------------------------------------------------------


def test_cookies_are_signed_by_this_server_only() -> None:
    a, b = Sessions(), Sessions()
    signed = a.sign("abc")
    assert a.unsign(signed) == "abc"
    assert b.unsign(signed) is None  # another server's key (or a restart)
    assert a.unsign(signed[:-1] + ("0" if signed[-1] != "0" else "1")) is None
    assert a.unsign("abc") is None and a.unsign(None) is None and a.unsign("x" * 300) is None


def test_one_tenant_can_neither_log_another_out_nor_hold_every_stream() -> None:
    s = Sessions()
    other = s.create("bob", "key-b", False)
    first = s.create("mallory", "key-m", False)
    for _ in range(MAX_TENANT_SESSIONS * 3):
        last = s.create("mallory", "key-m", False)
    live = set(s._by_id)
    assert other.session_id in live  # bob's login survives mallory's flood
    assert first.session_id not in live and last.session_id in live  # mallory's oldest went
    assert sum(1 for x in s._by_id.values() if x.tenant == "mallory") == MAX_TENANT_SESSIONS
    held = [s.open_stream(last) for _ in range(MAX_TENANT_STREAMS + 5)]
    assert held.count(True) == MAX_TENANT_STREAMS  # the cap, then refusals
    assert s.open_stream(other)  # bob still gets a stream
    s.close_stream(last)
    assert s.open_stream(last)  # a closed stream frees its place


def test_admin_tenants_come_from_a_checked_list() -> None:
    assert admin_tenants("ops, root-team ,") == {"ops", "root-team"}
    assert admin_tenants("") == frozenset()
    with pytest.raises(InvalidArgumentError):
        admin_tenants("ops,bad name")


def test_activity_is_bounded_and_guarded() -> None:
    act = Activity()
    call = act.start(
        "sbx-1", "code", "python", "print(SECRET)", lambda t: t.replace("SECRET", "[R]")
    )
    assert call.source == "print([R])"
    call.add("stdout", "x" * (MAX_TEXT + 10))
    call.add("stdout", "more")
    assert sum(len(t) for _, t in call.output) < MAX_TEXT + 100
    for i in range(MAX_CALLS + 5):
        act.start("sbx-1", "command", "bash", f"echo {i}", lambda t: t)
    calls = act.calls("sbx-1")
    assert len(calls) == MAX_CALLS and calls[0].source == f"echo {MAX_CALLS + 4}"

    def broken(text: str) -> str:
        raise RuntimeError("guard failed")

    assert act.start("sbx-2", "code", "python", "x", broken).source == "[REDACTED:unscanned]"


def test_reasons_in_words() -> None:
    assert "does not allow" in explain("not_allowed")
    assert "never reachable" in explain("blocked_address:private")
    assert explain("something_new") == "" and explain(None) == ""


def test_operator_rows_and_time_bounds(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.db") as log:
        before = time.time()
        log.record_operator("login", allowed=True, actor="acme/key-00000001", tenant="acme")
        log.record_operator("kill", allowed=True, actor="ops/key-00000002 (admin)",
                            sandbox_id="sbx-0123456789abcdef", tenant="acme")  # fmt: skip
        for _ in range(3000):  # a flood of refusals is capped, and counted
            log.record_operator("login", allowed=False, actor=None, reason="bad key")
        rows = log.query(kind="operator", tenant="acme")
        assert [r["method"] for r in rows] == ["kill", "login"]
        assert rows[0]["sandbox_id"] == "sbx-0123456789abcdef"
        refused = log.query(kind="operator", denied_only=True, limit=100_000)
        assert 0 < len(refused) < 3000
        dropped = log.query(kind="audit_dropped")
        assert sum(r["count"] for r in dropped) == 3000 - len(refused)
        assert log.query(kind="operator", tenant="acme", since=time.time() + 60) == []
        assert len(log.query(kind="operator", tenant="acme", since=before, until=time.time()))
        with pytest.raises(InvalidArgumentError):
            log.query(since="yesterday")  # type: ignore[arg-type]


# -- a real server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin() -> str:
    return tenant_name("ops")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, admin: str) -> Iterator[Server]:
    require_tier("container")
    saved = os.environ.get("MOAT_ADMIN_TENANTS")
    os.environ["MOAT_ADMIN_TENANTS"] = admin
    try:
        with serving(tmp_path_factory.mktemp("dash") / "server.log") as srv:
            yield srv
    finally:
        if saved is None:
            os.environ.pop("MOAT_ADMIN_TENANTS", None)
        else:
            os.environ["MOAT_ADMIN_TENANTS"] = saved


def test_pages_need_a_login_and_carry_safe_headers(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/").headers["location"] == "/ui/"
        for path in ("/ui/", "/ui/audit", "/ui/events", "/ui/sandboxes/sbx-0123456789abcdef"):
            r = c.get(path)
            assert r.status_code == 303 and r.headers["location"] == "/ui/login", path
        assert c.post("/ui/sandboxes/sbx-0123456789abcdef/kill").status_code == 403
        page = c.get("/ui/login")
        headers = page.headers
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY"
        assert not re.search(r"<script(?![^>]*\bsrc=)", page.text)  # no inline script
        assert c.get("/ui/static/dash.js").status_code == 200
        # The E2B wire is untouched beside it.
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/sandboxes").status_code == 401


def test_login_sets_a_safe_cookie_and_refuses_forged_forms(server: Server, admin: str) -> None:
    key = new_key(tenant_name("cookie"))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        form = c.get("/ui/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
        assert nonce is not None
        # No nonce, a foreign origin, no origin at all: refused (login CSRF).
        bad = [
            ({"api_key": key}, {"origin": server.url}),
            ({"api_key": key, "nonce": nonce.group(1)}, {"origin": "http://evil.example"}),
            ({"api_key": key, "nonce": nonce.group(1)}, {}),
        ]
        for data, headers in bad:
            r = c.post("/ui/login", data=data, headers=headers)
            assert r.status_code == 403 and "moat_session" not in r.cookies, (data, headers)
        r = c.post("/ui/login", data={"api_key": key, "nonce": nonce.group(1)},
                   headers={"origin": server.url})  # fmt: skip
        assert r.status_code == 303
        cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and
                      v.startswith("moat_session="))  # fmt: skip
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Secure" not in cookie  # plain HTTP on loopback; Secure where TLS
        assert key not in cookie and key[4:] not in cookie


def test_kill_needs_the_session_token_and_this_origin(server: Server, admin: str) -> None:
    from e2b import Sandbox

    tenant = tenant_name("csrf")
    key = new_key(tenant)
    sbx = Sandbox.create(api_key=key)
    try:
        with http_login(server.url, key) as c:
            token = csrf_of(c.get("/ui/").text)
            kill = f"/ui/sandboxes/{sbx.sandbox_id}/kill"
            refused = [
                ({}, {"origin": server.url}),  # no token
                ({"csrf": "x" * 43}, {"origin": server.url}),  # a wrong token
                ({"csrf": token}, {"origin": "http://evil.example"}),  # another site
                ({"csrf": token}, {}),  # no Origin, no Referer
                ({"csrf": token}, {"referer": "http://evil.example/ui/"}),
            ]
            for data, headers in refused:
                r = c.post(kill, data=data, headers=headers)
                assert r.status_code == 403, (data, headers)
                assert sbx.is_running(), (data, headers)  # from outside: still there
            # Positive control: the same request with the token, from this origin.
            r = c.post(kill, data={"csrf": token}, headers={"referer": server.url + "/ui/"})
            assert r.status_code == 303
        assert not sbx.is_running()
    finally:
        sbx.kill()
    # Every state-changing action is in the trail, refused ones too (the admin's view).
    with http_login(server.url, new_key(admin)) as a:
        trail = a.get("/ui/audit", params={"sandbox": sbx.sandbox_id}).text
        assert "killed from the dashboard" in trail and f"{tenant}/key-" in trail
        everything = a.get("/ui/audit").text
        assert everything.count("refused: bad origin or CSRF token") >= len(refused)


def test_logout_and_revocation_end_the_session(server: Server, admin: str) -> None:
    tenant = tenant_name("bye")
    key = new_key(tenant)
    with http_login(server.url, key) as c:
        token = csrf_of(c.get("/ui/").text)
        cookies = dict(c.cookies)
        assert c.post("/ui/logout", data={}, headers={"origin": server.url}).status_code == 403
        assert c.get("/ui/").status_code == 200  # still logged in after the forged logout
        r = c.post("/ui/logout", data={"csrf": token}, headers={"origin": server.url})
        assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    with httpx.Client(base_url=server.url, cookies=cookies, timeout=30) as replay:
        assert replay.get("/ui/").headers.get("location") == "/ui/login"  # the old cookie
    # A revoked key ends the sessions it opened, at the next request.
    with http_login(server.url, key) as c:
        assert c.get("/ui/").status_code == 200
        key_id = re.search(r"key (key-[0-9a-f]{8})", c.get("/ui/").text)
        assert key_id is not None
        subprocess.run([*MOAT, "keys", "revoke", key_id.group(1)], check=True,
                       capture_output=True, timeout=60)  # fmt: skip
        assert c.get("/ui/").headers.get("location") == "/ui/login"
    with http_login(server.url, new_key(admin)) as a:
        trail = a.get("/ui/audit").text
        assert f"{tenant}/key-" in trail and "logout" in trail
    with httpx.Client(base_url=server.url, timeout=30) as c:
        form = c.get("/ui/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
        assert nonce is not None
        r = c.post("/ui/login", data={"api_key": key, "nonce": nonce.group(1)},
                   headers={"origin": server.url})  # fmt: skip
        assert r.status_code == 401 and "not valid" in r.text  # revoked: refused


def test_a_tenants_live_streams_are_capped_and_another_tenant_still_gets_one(
    server: Server,
) -> None:
    import contextlib

    with contextlib.ExitStack() as stack:
        c = stack.enter_context(http_login(server.url, new_key(tenant_name("many"))))
        firsts, readers = [], []  # the readers stay referenced: each keeps its stream open
        for _ in range(MAX_TENANT_STREAMS + 1):
            r = stack.enter_context(c.stream("GET", "/ui/events", timeout=30))
            readers.append(r.iter_bytes())
            firsts.append(next(readers[-1]))  # the stream has started (and is counted)
        assert all(b"busy" not in f for f in firsts[:-1])  # positive control: served
        assert b"event: busy" in firsts[-1]  # over the tenant's cap
        with http_login(server.url, new_key(tenant_name("other"))) as o:
            with o.stream("GET", "/ui/events", timeout=30) as r:
                assert b"busy" not in next(r.iter_bytes())


def test_a_tenant_trail_holds_only_its_own_rows(server: Server) -> None:
    from e2b import Sandbox

    key_a, key_b = new_key(tenant_name("ta")), new_key(tenant_name("tb"))
    sbx = Sandbox.create(api_key=key_a)
    try:
        with http_login(server.url, key_b) as b:
            assert sbx.sandbox_id not in b.get("/ui/audit").text
            assert sbx.sandbox_id not in b.get("/ui/").text
            with b.stream("GET", "/ui/events") as events:
                for line in events.iter_lines():
                    if line.startswith("data:"):
                        assert sbx.sandbox_id not in line
                        break
        with http_login(server.url, key_a) as a:
            assert sbx.sandbox_id in a.get("/ui/audit").text
            later = a.get("/ui/audit", params={"since": "2099-01-01T00:00"}).text
            assert sbx.sandbox_id not in later and "No row matches" in later
            earlier = a.get("/ui/audit", params={"until": "2000-01-01T00:00"}).text
            assert sbx.sandbox_id not in earlier
            bad = a.get("/ui/audit", params={"since": "yesterday"})
            assert bad.status_code == 200 and "Times look like" in bad.text
            with a.stream("GET", "/ui/events") as events:
                for line in events.iter_lines():
                    if line.startswith("data:"):
                        assert sbx.sandbox_id in line  # positive control
                        break
    finally:
        sbx.kill()


def test_brokered_secrets_appear_by_name_only(server: Server) -> None:
    key = new_key(tenant_name("broker"))
    value = "sk-live-" + secrets.token_hex(16)
    secret = {"value": value, "hosts": ["api.example.com"]}
    body = {"templateID": "base", "timeout": 120, "moat": {"secrets": {"API_TOKEN": secret}}}
    api = {"X-API-Key": key}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v2/sandboxes", json=body, headers=api)
        assert r.status_code == 201, r.text
        sid, traffic = r.json()["sandboxID"], r.json().get("trafficAccessToken") or ""
        plane = {"E2b-Sandbox-Id": sid, "X-Access-Token": r.json()["envdAccessToken"],
                 "E2b-Sandbox-Port": "49999", "E2B-Traffic-Access-Token": traffic}  # fmt: skip
        try:
            # The code names the value itself (as a careless caller might): kept redacted.
            code = f"import os\nprint(os.environ['API_TOKEN'])\nprint({value!r})"
            out = c.post("/execute", json={"code": code}, headers=plane).text
            assert value not in out
            with http_login(server.url, key) as d:
                page = d.get(f"/ui/sandboxes/{sid}").text
        finally:
            c.delete(f"/sandboxes/{sid}", headers=api)
    assert "API_TOKEN" in page and "api.example.com" in page
    assert value not in page and value[8:] not in page
    assert "[REDACTED:API_TOKEN]" in page  # in the code shown and in its output


def test_the_script_sets_text_only() -> None:
    """The one script builds rows with textContent: nothing it receives becomes markup."""
    import moat.dashboard

    js = (Path(moat.dashboard.__file__).parent / "static" / "dash.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js, sink
    templates = Path(moat.dashboard.__file__).parent / "templates"
    for page in templates.glob("*.html"):
        text = page.read_text()
        assert "|safe" not in text.replace(" ", "") and "autoescape false" not in text, page
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), page  # no inline script
        assert not re.search(r"\son[a-z]+=", text), page  # no inline handlers


def test_pause_and_resume_from_the_dashboard(server: Server, admin: str) -> None:
    """The sandbox page pauses a running sandbox and resumes it (forms with the session's
    token, audited); checked from outside with the E2B SDK: paused, then running again with
    its files; another tenant's login cannot pause it (an unknown id's 404)."""
    from e2b import Sandbox, SandboxQuery
    from e2b.api.client.models.sandbox_state import SandboxState

    tenant = tenant_name("pz")
    key = new_key(tenant)
    sbx = Sandbox.create(api_key=key)
    try:
        sbx.files.write("/home/user/kept.txt", "still here")
        with http_login(server.url, new_key(tenant_name("pz-other"))) as other:
            token = csrf_of(other.get("/ui/").text)
            r = other.post(f"/ui/sandboxes/{sbx.sandbox_id}/pause", data={"csrf": token},
                           headers={"origin": server.url})  # fmt: skip
            assert r.status_code == 404 and sbx.is_running()
        with http_login(server.url, key) as c:
            token = csrf_of(c.get("/ui/").text)
            page = f"/ui/sandboxes/{sbx.sandbox_id}"
            assert 'id="pause"' in c.get(page).text
            r = c.post(page + "/pause", data={}, headers={"origin": server.url})
            assert r.status_code == 403 and sbx.is_running()  # no token: refused
            r = c.post(page + "/pause", data={"csrf": token}, headers={"origin": server.url})
            assert r.status_code == 303, r.text
            paused = Sandbox.list(api_key=key, query=SandboxQuery(state=[SandboxState.PAUSED]))
            assert [s.sandbox_id for s in paused.next_items()] == [sbx.sandbox_id]
            shown = c.get(page).text
            assert 'id="resume"' in shown and "paused" in shown and 'id="pause"' not in shown
            r = c.post(page + "/resume", data={"csrf": token}, headers={"origin": server.url})
            assert r.status_code == 303, r.text
            assert sbx.is_running()
            again = Sandbox.connect(sbx.sandbox_id, api_key=key)
            assert again.files.read("/home/user/kept.txt") == "still here"
        with http_login(server.url, new_key(admin)) as a:
            trail = a.get("/ui/audit", params={"sandbox": sbx.sandbox_id}).text
            assert "paused from the dashboard" in trail and "resumed from the dashboard" in trail
    finally:
        sbx.kill()


def test_activity_output_pieces_are_bounded() -> None:
    """Alternating one-character stdout/stderr chunks must not become one tuple each."""
    from moat.engine.activity import MAX_SEGMENTS, MAX_TEXT, Call

    call = Call("code", "python", "print(1)")
    for i in range(20_000):
        call.add("stdout" if i % 2 else "stderr", "é")
    assert len(call.output) <= MAX_SEGMENTS
    assert sum(len(t) for _, t in call.output) <= MAX_TEXT + 200
