"""The secrets store over the wire (issue 10): named, per tenant, values write-only, usable by
name at create; a real ``moat serve`` and real container sandboxes.

Containment: the value never comes back in any reply, never sits readable in the store's files,
and a sandbox created with the secret's name sees only a placeholder; the guard knows the value
(it redacts it when it comes out of that sandbox), which proves the server handed the stored
value to the engine. Positive control: the same read-back from a sandbox without the stored
secret shows the value verbatim.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.conftest import require_tier
from tests.rawfile import raw_bytes
from tests.server_support import Server, new_key, serving, tenant_name

from moat.paths import state_dir

pytestmark = [pytest.mark.container, pytest.mark.slow]

NAME = "STORED_TOKEN"
BINDING = {"hosts": ["api.example.com"], "template": "Bearer {value}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_tier("container")
    with serving(tmp_path_factory.mktemp("serve") / "server.log") as srv:
        yield srv


def _client(server: Server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=60)


def _read_back(c: httpx.Client, create: dict[str, Any], value: str) -> tuple[str, str]:
    """(what the sandbox has in $NAME, what comes back when it prints a file holding value)."""
    r = c.post("/v2/sandboxes", json={"templateID": "base", "timeout": 120, **create})
    assert r.status_code == 201, r.text
    assert value not in r.text
    sid, token = r.json()["sandboxID"], r.json()["envdAccessToken"]
    plane = {"E2b-Sandbox-Id": sid, "X-Access-Token": token}
    try:
        up = c.post("/files", params={"path": "/home/user/v.txt"}, content=value.encode(),
                    headers={**plane, "E2b-Sandbox-Port": "49983",
                             "Content-Type": "application/octet-stream"})  # fmt: skip
        assert up.status_code < 300, up.text
        code = f"import os; print(os.environ.get({NAME!r}, '-')); print(open('v.txt').read())"
        r = c.post("/execute", json={"code": code}, headers={**plane, "E2b-Sandbox-Port": "49999"})
        lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
        out = "".join(x["text"] for x in lines if x.get("type") == "stdout").splitlines()
        assert out, r.text
        return out[0], "\n".join(out[1:]) + r.text
    finally:
        c.delete(f"/sandboxes/{sid}")


def test_stored_secret_is_brokered_by_name_and_never_read_back(server: Server) -> None:
    value = "sk-stored-" + secrets.token_hex(16)
    with _client(server, new_key(tenant_name("store"))) as c:
        r = c.post("/secrets", json={"name": NAME, "value": value, "moat": BINDING})
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["name"] == NAME and created["currentVersion"] == 1
        assert created["moat"]["hosts"] == BINDING["hosts"]
        sid = created["secretID"]
        replies = [r.text, c.get("/secrets").text, c.get(f"/secrets/{sid}").text]

        placeholder, back = _read_back(c, {"moat": {"storedSecrets": [NAME]}}, value)
        assert placeholder not in ("-", value) and value not in placeholder
        assert value not in back  # the guard knew the stored value: the server bound it
        # Positive control: without the stored secret the same read-back shows the value.
        unbound, plain = _read_back(c, {}, value)
        assert unbound == "-" and value in plain

        # A new version replaces the value the next sandbox gets (the old one is not known).
        new_value = "sk-stored-" + secrets.token_hex(16)
        r = c.post(f"/secrets/{sid}", json={"value": new_value, "metadata": {"team": "a"}})
        assert r.status_code == 200 and r.json()["currentVersion"] == 2, r.text
        assert r.json()["metadata"] == {"team": "a"}
        replies.append(r.text)
        _, back = _read_back(c, {"moat": {"storedSecrets": [NAME]}}, new_value)
        assert new_value not in back
        for reply in replies:
            assert value not in reply and new_value not in reply

        # The binding can't be re-aimed without the value: else the tenant's key (an agent)
        # could point the stored value at its own host through the gateway.
        r = c.post(f"/secrets/{sid}", json={"moat": {"hosts": ["attacker.example"]}})
        assert r.status_code == 400 and "needs the value again" in r.text
        assert c.get(f"/secrets/{sid}").json()["moat"]["hosts"] == BINDING["hosts"]
        # At rest: sealed, so neither value is in the store's files.
        for suffix in ("", "-wal"):
            f = state_dir() / f"secrets.db{suffix}"
            if f.exists():
                data = raw_bytes(f)
                assert value.encode() not in data and new_value.encode() not in data

        assert c.delete(f"/secrets/{sid}").status_code == 204
        assert c.get(f"/secrets/{sid}").status_code == 404
        r = c.post("/v2/sandboxes", json={"templateID": "base", "moat": {"storedSecrets": [NAME]}})
        assert r.status_code == 400 and "no stored secret named STORED_TOKEN" in r.text


def test_tenants_never_see_each_others_secrets(server: Server) -> None:
    value = "sk-tenant-" + secrets.token_hex(16)
    with (
        _client(server, new_key(tenant_name("sa"))) as a,
        _client(server, new_key(tenant_name("sb"))) as b,
    ):
        sid = a.post("/secrets", json={"name": NAME, "value": value, "moat": BINDING}).json()[
            "secretID"
        ]
        unknown = "sec-" + "0" * 16
        for method, body in (("GET", None), ("POST", {"value": "x" * 20}), ("DELETE", None)):
            theirs = b.request(method, f"/secrets/{sid}", json=body)
            nobodys = b.request(method, f"/secrets/{unknown}", json=body)
            assert theirs.status_code == nobodys.status_code == 404
            assert theirs.json() == nobodys.json()
        assert b.get("/secrets").json() == []
        r = b.post("/v2/sandboxes", json={"templateID": "base", "moat": {"storedSecrets": [NAME]}})
        assert r.status_code == 400 and value not in r.text
        # Positive control: its owner still has it, unchanged.
        assert a.get(f"/secrets/{sid}").json()["currentVersion"] == 1
        # The same name is free in another tenant's store.
        assert b.post("/secrets", json={"name": NAME, "value": value, "moat": BINDING}).is_success


@pytest.mark.parametrize(
    "body",
    [
        {"name": NAME, "value": "VALUE-PLACE-1234"},  # no binding: never used anywhere
        {"name": "1bad name", "value": "VALUE-PLACE-1234", "moat": BINDING},
        {"name": NAME, "value": "VALUE-PLACE-1234", "moat": {"hosts": ["not a host!"]}},
        {"name": NAME, "value": "VALUE-PLACE-1234", "moat": {"hosts": ["a.com"], "header": "B\n"}},
        {"name": NAME, "value": "VALUE-PLACE-1234", "moat": {"hosts": []}},
        {"name": NAME, "value": "VALUE\nPLACE-1234", "moat": BINDING},
        {"name": NAME, "value": 12345678, "moat": BINDING},
        {"name": NAME, "value": "VALUE-PLACE-1234", "metadata": {"a": 1}, "moat": BINDING},
    ],
)
def test_bad_secrets_are_refused_without_echoing_the_value(
    server: Server, body: dict[str, Any]
) -> None:
    with _client(server, new_key(tenant_name("bad"))) as c:
        r = c.post("/secrets", json=body)
        assert r.status_code == 400, r.text
        assert "PLACE-1234" not in r.text
        assert c.get("/secrets").json() == []


def test_duplicate_names_and_unauthenticated_calls(server: Server) -> None:
    with _client(server, new_key(tenant_name("dup"))) as c:
        body = {"name": NAME, "value": "v-" + secrets.token_hex(8), "moat": BINDING}
        assert c.post("/secrets", json=body).status_code == 201
        r = c.post("/secrets", json=body)
        assert r.status_code == 400 and "exists already" in r.text
        r = c.post(
            "/v2/sandboxes",
            json={"templateID": "base",
                  "moat": {"storedSecrets": [NAME], "secrets": {NAME: {**body, "hosts": ["a.b"]}}}},
        )  # fmt: skip
        assert r.status_code == 400
    for method in ("GET", "POST"):
        r = httpx.request(method, server.url + "/secrets", json={}, timeout=30)
        assert r.status_code == 401


def _plane_run(c: httpx.Client, sid: str, token: str, code: str) -> str:
    plane = {"E2b-Sandbox-Id": sid, "X-Access-Token": token, "E2b-Sandbox-Port": "49999"}
    r = c.post("/execute", json={"code": code}, headers=plane)
    lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
    return "".join(x["text"] for x in lines if x.get("type") == "stdout")


def test_a_paused_sandbox_resumes_after_a_restart_with_its_stored_secrets(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """After a restart the engine has no value (never written down): the server takes the
    stored secrets' values from the store again, only while they are bound as they were.
    The resumed sandbox has its placeholder of before, and the guard knows the value again
    (it redacts it). Positive control: a sandbox whose secret was given inline can't be
    resumed that way (a clear error, its paused state kept)."""
    value = "sk-stored-" + secrets.token_hex(16)
    logs = tmp_path_factory.mktemp("restart")
    tenant = tenant_name("restart")
    with serving(logs / "first.log") as srv, _client(srv, new_key(tenant)) as c:
        key = c.headers["X-API-Key"]
        assert c.post("/secrets", json={"name": NAME, "value": value, "moat": BINDING}).is_success
        made = {}
        for kind, ext in (
            ("stored", {"storedSecrets": [NAME]}),
            ("inline", {"secrets": {"INLINE": {"value": "sk-inline-" + secrets.token_hex(8),
                                               "hosts": ["api.example.com"]}}}),
        ):  # fmt: skip
            r = c.post("/v2/sandboxes", json={"templateID": "base", "timeout": 300, "moat": ext})
            assert r.status_code == 201, r.text
            made[kind] = r.json()["sandboxID"], r.json()["envdAccessToken"]
        sid, token = made["stored"]
        before = _plane_run(c, sid, token, f"import os; print(os.environ[{NAME!r}])").strip()
        assert before.startswith("moat-ph-")
        for s, _ in made.values():
            assert c.post(f"/sandboxes/{s}/pause").status_code == 204
    with serving(logs / "second.log") as srv, _client(srv, key) as c:
        try:
            r = c.post(f"/sandboxes/{made['inline'][0]}/connect", json={"timeout": 60})
            assert r.status_code >= 400 and "INLINE" in r.text  # its value is nowhere now
            r = c.post(f"/sandboxes/{sid}/connect", json={"timeout": 120})
            assert r.status_code == 201, r.text
            token = r.json()["envdAccessToken"]
            code = f"import os; print(os.environ[{NAME!r}]); print({value[:6]!r} + {value[6:]!r})"
            out = _plane_run(c, sid, token, code)
            assert out.splitlines()[0] == before  # the placeholder it had
            assert value not in out and "[REDACTED" in out  # the guard has the value again
        finally:
            for s, _ in made.values():
                c.delete(f"/sandboxes/{s}")


def test_a_rebound_stored_secret_is_not_handed_to_a_resume(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    logs = tmp_path_factory.mktemp("rebound")
    tenant = tenant_name("rebound")
    value = "sk-stored-" + secrets.token_hex(16)
    with serving(logs / "first.log") as srv, _client(srv, new_key(tenant)) as c:
        key = c.headers["X-API-Key"]
        created = c.post("/secrets", json={"name": NAME, "value": value, "moat": BINDING}).json()
        r = c.post("/v2/sandboxes", json={"templateID": "base", "moat": {"storedSecrets": [NAME]}})
        sid = r.json()["sandboxID"]
        assert c.post(f"/sandboxes/{sid}/pause").status_code == 204
    with serving(logs / "second.log") as srv, _client(srv, key) as c:
        try:
            wider = {
                "value": value,
                "moat": {**BINDING, "hosts": ["api.example.com", "evil.example"]},
            }
            r = c.post(f"/secrets/{created['secretID']}", json=wider)
            assert r.is_success, r.text
            r = c.post(f"/sandboxes/{sid}/connect", json={"timeout": 60})
            assert r.status_code >= 400 and "bound otherwise" in r.text
            assert value not in r.text
        finally:
            c.delete(f"/sandboxes/{sid}")
