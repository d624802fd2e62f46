"""Pause and resume over E2B's wire (issue 11): a real ``moat serve`` (container tier), the
unmodified E2B SDK, moat's own SDK (embedded and over HTTP), and raw HTTP for the codes.

Outcomes are checked from outside: the paused store's directory on the host, the tokens of
before a pause (dead afterwards), another tenant's view (exactly an unknown id's).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import SandboxQuery
from e2b.api.client.models.sandbox_state import SandboxState
from e2b_code_interpreter import Sandbox as E2bSandbox
from tests.conftest import require_tier
from tests.server_support import Server, new_key, serving, tenant_name

from moat import PolicyError
from moat import Sandbox as MoatSandbox
from moat.paths import state_dir

pytestmark = [pytest.mark.container, pytest.mark.slow]


def _paused_dir(sid: str) -> Path:
    return state_dir() / "paused" / sid


def _h(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def test_e2b_sdk_pause_list_connect(server: Server, key_a: str) -> None:
    tag = secrets.token_hex(4)
    sbx = E2bSandbox.create(api_key=key_a, metadata={"run": tag}, timeout=120)
    sid = sbx.sandbox_id
    try:
        sbx.files.write("/home/user/keep.txt", "kept across pause")
        assert sbx.run_code("print(6 * 7)").logs.stdout == ["42\n"]
        assert sbx.pause() is True  # E2B leaves memory unset: the container keeps its files
        assert _paused_dir(sid).is_dir()  # on the host's disk, from outside
        assert E2bSandbox.pause(sid, api_key=key_a) is False  # 409: paused already
        assert sbx.get_info().state == SandboxState.PAUSED
        query = SandboxQuery(metadata={"run": tag}, state=[SandboxState.PAUSED])
        listed = E2bSandbox.list(api_key=key_a, query=query).next_items()
        assert [(i.sandbox_id, i.state) for i in listed] == [(sid, SandboxState.PAUSED)]
        running = SandboxQuery(metadata={"run": tag}, state=[SandboxState.RUNNING])
        assert E2bSandbox.list(api_key=key_a, query=running).next_items() == []

        back = E2bSandbox.connect(sid, api_key=key_a)
        assert back.sandbox_id == sid
        assert back.files.read("/home/user/keep.txt") == "kept across pause"
        assert back.run_code("print('again')").logs.stdout == ["again\n"]
        assert not _paused_dir(sid).exists()  # deleted once it serves again
        assert back.get_info().state == SandboxState.RUNNING
        # the same server kept its tokens for it: the object of before the pause works on
        assert sbx.files.read("/home/user/keep.txt") == "kept across pause"
        # an explicit full (memory) pause can't be kept on this tier: refused, still running
        r = httpx.post(
            f"{server.url}/sandboxes/{sid}/pause", json={"memory": True}, headers=_h(key_a)
        )
        assert r.status_code == 400 and "memory=False" in r.json()["message"]
        assert back.is_running()
    finally:
        httpx.delete(f"{server.url}/sandboxes/{sid}", headers=_h(key_a))


def test_codes_tenancy_and_kill_of_paused(server: Server, key_a: str) -> None:
    key_b = new_key(tenant_name("bob"))
    r = httpx.post(
        server.url + "/v2/sandboxes", json={"templateID": "base", "timeout": 120},
        headers=_h(key_a), timeout=60,
    )  # fmt: skip
    assert r.status_code == 201, r.text
    sid = r.json()["sandboxID"]
    url = f"{server.url}/sandboxes/{sid}"
    assert httpx.post(url + "/resume", json={}, headers=_h(key_a)).status_code == 409  # running
    assert httpx.post(url + "/pause", headers=_h(key_a)).status_code == 204
    assert httpx.post(url + "/pause", headers=_h(key_a)).status_code == 409
    # another tenant: exactly an unknown id (invariant 11)
    unknown = "sbx-" + secrets.token_hex(8)
    for target in (sid, unknown):
        u = f"{server.url}/sandboxes/{target}"
        answers = [
            httpx.post(u + "/pause", headers=_h(key_b)),
            httpx.post(u + "/connect", json={}, headers=_h(key_b)),
            httpx.post(u + "/resume", json={}, headers=_h(key_b)),
            httpx.get(u, headers=_h(key_b)),
            httpx.delete(u, headers=_h(key_b)),
        ]
        for a in answers:
            assert (a.status_code, a.json()["message"]) == (404, f"sandbox {target} was not found")
    rows = httpx.get(server.url + "/v2/sandboxes?state=paused", headers=_h(key_b)).json()
    assert rows == []
    rows = httpx.get(server.url + "/v2/sandboxes?state=paused", headers=_h(key_a)).json()
    assert [(x["sandboxID"], x["state"]) for x in rows] == [(sid, "paused")]
    assert _paused_dir(sid).is_dir()
    # legacy resume: 201 with the sandbox's body; then pause again and kill it while paused
    r = httpx.post(url + "/resume", json={}, headers=_h(key_a), timeout=60)
    assert r.status_code == 201 and r.json()["sandboxID"] == sid
    assert httpx.post(url + "/pause", headers=_h(key_a)).status_code == 204
    assert httpx.delete(url, headers=_h(key_a)).status_code == 204
    assert not _paused_dir(sid).exists()  # the kill took its state with it (from outside)
    assert httpx.post(url + "/connect", json={}, headers=_h(key_a)).status_code == 404


def test_moat_sdk_over_http_and_embedded(server: Server, key_a: str) -> None:
    options: list[dict[str, Any]] = [{"api_url": server.url, "api_key": key_a}, {}]
    for kw in options:
        sbx = MoatSandbox.create(isolation="container", timeout=120, metadata={"k": "v"}, **kw)
        sid = sbx.sandbox_id
        try:
            sbx.files.write("/tmp/t.txt", "tmp kept")
            with pytest.raises(PolicyError, match="memory=False"):
                sbx.pause()  # memory=True by default: this tier can't keep it
            sbx.pause(memory=False)
            assert sbx.get_info().state == "paused"
            assert sid in {i.sandbox_id for i in MoatSandbox.list("paused", **kw)}
            assert sid in {i.sandbox_id: i.state for i in MoatSandbox.list(**kw)}
            again = MoatSandbox.connect(sid, **kw)
            assert again.files.read("/tmp/t.txt") == "tmp kept"
            assert again.get_info().state == "running"
        finally:
            sbx.kill()
        assert not _paused_dir(sid).exists()


def test_resume_after_a_server_restart(tmp_path: Path) -> None:
    require_tier("container")
    with serving(tmp_path / "first.log") as srv:
        key = new_key(tenant_name("carol"))
        sbx = E2bSandbox.create(api_key=key, timeout=120, metadata={"who": "carol"})
        sid = sbx.sandbox_id
        sbx.files.write("/home/user/notes.md", "written before the restart")
        assert sbx.pause() is True
    assert _paused_dir(sid).is_dir()  # the server is gone; the state stays
    with serving(tmp_path / "second.log") as srv:
        r = httpx.get(f"{srv.url}/sandboxes/{sid}", headers=_h(key))
        assert r.status_code == 200 and r.json()["state"] == "paused"
        back = E2bSandbox.connect(sid, api_key=key)
        try:
            assert back.files.read("/home/user/notes.md") == "written before the restart"
            assert back.get_info().metadata == {"who": "carol"}
        finally:
            back.kill()
    assert not _paused_dir(sid).exists()


def test_auto_pause_at_timeout_and_resume_on_ingress(server: Server, key_a: str) -> None:
    """E2B's ``autoPause``: the timeout pauses; traffic to the paused sandbox's port (public
    traffic here) resumes it under the same id and tokens; a stranger's id stays unknown."""
    body = {
        "templateID": "base", "timeout": 2, "autoPause": True,
        "network": {"allowPublicTraffic": True},
    }  # fmt: skip
    r = httpx.post(server.url + "/v2/sandboxes", json=body, headers=_h(key_a), timeout=60)
    assert r.status_code == 201, r.text
    sid, token = r.json()["sandboxID"], r.json()["envdAccessToken"]
    url = f"{server.url}/sandboxes/{sid}"
    deadline = time.monotonic() + 15
    while httpx.get(url, headers=_h(key_a)).json().get("state") != "paused":
        assert time.monotonic() < deadline, "not paused at its timeout"
        time.sleep(0.2)
    assert _paused_dir(sid).is_dir()
    port = server.url.rsplit(":", 1)[1]
    host = f"8000-{sid}.moat.localhost:{port}"
    r = httpx.get(server.url + "/", headers={"Host": host}, timeout=60)
    # resumed (files only on this tier: nothing listens on 8000 until started again)
    assert r.status_code == 502
    info = httpx.get(url, headers=_h(key_a)).json()
    assert info["state"] == "running" and info["envdAccessToken"] == token
    assert not _paused_dir(sid).exists()
    assert httpx.delete(url, headers=_h(key_a)).status_code == 204
