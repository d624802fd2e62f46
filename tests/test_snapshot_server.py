"""Snapshots and fork over E2B's wire (issue 11): a real ``moat serve`` (container tier), the
unmodified E2B SDK (2.63: ``create_snapshot``, ``list_snapshots``, ``delete_snapshot``,
``fork``, ``Sandbox.create(<snapshot id>)``), and raw HTTP for the codes.

Outcomes are checked from outside: the snapshot store's directories on the host, another
tenant's view (exactly an unknown id's), the tokens of every new sandbox (its own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import SandboxException
from e2b_code_interpreter import Sandbox as E2bSandbox
from tests.server_support import Server, new_key, tenant_name

from moat.paths import state_dir

pytestmark = [pytest.mark.container, pytest.mark.slow]


def _snap_dir(snap_id: str) -> Path:
    return state_dir() / "snapshots" / snap_id


def _h(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def test_e2b_sdk_snapshot_list_create_from_delete(server: Server, key_a: str) -> None:
    sbx = E2bSandbox.create(api_key=key_a, timeout=120)
    try:
        sbx.files.write("/home/user/a.txt", "before")
        info = sbx.create_snapshot(name="one")
        snap = info.snapshot_id
        assert snap.startswith("snap-") and info.names == ["one"]
        assert _snap_dir(snap).is_dir()  # on the host's disk, complete
        # the source keeps serving; its later writes stay its own
        sbx.files.write("/home/user/a.txt", "after")
        assert sbx.run_code("print(6 * 7)").logs.stdout == ["42\n"]
        listed = E2bSandbox.list_snapshots(api_key=key_a).next_items()
        assert [s.snapshot_id for s in listed] == [snap]
        mine = E2bSandbox.list_snapshots(api_key=key_a, sandbox_id=sbx.sandbox_id).next_items()
        assert [s.snapshot_id for s in mine] == [snap]
        new = E2bSandbox.create(snap, api_key=key_a, timeout=120)
        try:
            assert new.sandbox_id != sbx.sandbox_id
            assert new.files.read("/home/user/a.txt") == "before"
            assert new.run_code("print('new')").logs.stdout == ["new\n"]
            assert sbx.files.read("/home/user/a.txt") == "after"
        finally:
            new.kill()
        # e2b 2.45 sends allow_internet_access=true on every create: that SDK default starts
        # the snapshot (with its own network); asking for another network is refused.
        url = f"{server.url}/sandboxes"
        r = httpx.post(url, json={"templateID": snap, "allow_internet_access": True},
                       headers=_h(key_a), timeout=120)  # fmt: skip
        assert r.status_code == 201, r.text
        _kill = httpx.delete(f"{url}/{r.json()['sandboxID']}", headers=_h(key_a), timeout=60)
        assert _kill.status_code == 204
        for body in ({"allow_internet_access": False}, {"envVars": {"A": "1"}},
                     {"network": {"allowOut": ["example.com"]}}):  # fmt: skip
            r = httpx.post(url, json={"templateID": snap, **body}, headers=_h(key_a), timeout=60)
            assert r.status_code == 400 and "keeps its envVars" in r.json()["message"], r.text
        assert E2bSandbox.delete_snapshot(snap, api_key=key_a) is True
        assert not _snap_dir(snap).exists()  # gone, checked from outside
        assert E2bSandbox.delete_snapshot(snap, api_key=key_a) is False
    finally:
        sbx.kill()


def test_e2b_sdk_fork_gives_new_sandboxes_with_their_own_tokens(server: Server, key_a: str) -> None:
    sbx = E2bSandbox.create(api_key=key_a, timeout=120)
    try:
        sbx.files.write("/home/user/s.txt", "shared")
        forks = sbx.fork(count=3)
        assert len(forks) == 3 and all(isinstance(f, E2bSandbox) for f in forks)
        try:
            ids = {f.sandbox_id for f in forks}
            assert len(ids | {sbx.sandbox_id}) == 4
            tokens = {f._envd_access_token for f in forks} | {sbx._envd_access_token}
            assert len(tokens) == 4
            probe = "import os, uuid; print(os.urandom(16).hex(), uuid.uuid4())"
            seen = set()
            for f in forks:
                assert f.files.read("/home/user/s.txt") == "shared"
                seen.add(f.run_code(probe).logs.stdout[0])
            assert len(seen) == 3

            def read(sid: str, token: str) -> int:
                headers = {
                    "E2b-Sandbox-Id": sid,
                    "E2b-Sandbox-Port": "49983",
                    "X-Access-Token": token,
                }
                url = f"{server.url}/files"
                return httpx.get(
                    url, params={"path": "/home/user/s.txt"}, headers=headers
                ).status_code

            # a fork's token opens that fork only (its own does: the positive control); any
            # other answers like an unknown sandbox (sandbox.py: 502, "was not found")
            assert read(forks[0].sandbox_id, forks[0]._envd_access_token) == 200
            assert read(forks[0].sandbox_id, forks[1]._envd_access_token) == 502  # as an unknown id
            assert read(forks[0].sandbox_id, sbx._envd_access_token) == 502  # as an unknown id
        finally:
            for f in forks:
                if isinstance(f, E2bSandbox):
                    f.kill()
        assert sbx.run_code("print('src')").logs.stdout == ["src\n"]
        assert E2bSandbox.list_snapshots(api_key=key_a).next_items() == []  # temp: gone
    finally:
        sbx.kill()


def test_snapshot_and_fork_routes_keep_tenants_apart(server: Server, key_a: str) -> None:
    key_b = new_key(tenant_name("bob"))
    sbx = E2bSandbox.create(api_key=key_a, timeout=120)
    try:
        snap = sbx.create_snapshot().snapshot_id
        unknown = "snap-" + "0" * 16
        sid = sbx.sandbox_id
        for path in ("/snapshots", "/fork"):
            r = httpx.post(f"{server.url}/sandboxes/{sid}{path}", json={}, headers=_h(key_b))
            ghost = httpx.post(
                f"{server.url}/sandboxes/sbx-{'0' * 16}{path}", json={}, headers=_h(key_b)
            )
            assert r.status_code == ghost.status_code == 404
            assert r.json()["message"].replace(sid, "X") == ghost.json()["message"].replace(
                f"sbx-{'0' * 16}", "X"
            )
        r = httpx.get(f"{server.url}/snapshots", headers=_h(key_b))
        assert r.status_code == 200 and r.json() == []
        for probe in (snap, unknown):
            r = httpx.delete(f"{server.url}/templates/{probe}", headers=_h(key_b))
            assert r.status_code == 404
            assert r.json()["message"] == f"template {probe} was not found"
            r = httpx.post(
                f"{server.url}/v2/sandboxes", json={"templateID": probe}, headers=_h(key_b)
            )
            assert r.status_code == 404, r.text
            assert r.json()["message"] == f"snapshot {probe} was not found"
        assert _snap_dir(snap).is_dir()  # untouched by the other tenant
        with pytest.raises(SandboxException, match=f"404: snapshot {snap} was not found"):
            E2bSandbox.create(snap, api_key=key_b)
        # paging: x-next-token
        second = sbx.create_snapshot().snapshot_id
        r = httpx.get(f"{server.url}/snapshots", params={"limit": 1}, headers=_h(key_a))
        assert [x["snapshotID"] for x in r.json()] == [snap] and r.headers["x-next-token"]
        r = httpx.get(
            f"{server.url}/snapshots",
            params={"limit": 1, "nextToken": r.headers["x-next-token"]},
            headers=_h(key_a),
        )
        assert [x["snapshotID"] for x in r.json()] == [second]
        assert "x-next-token" not in r.headers
        for s in (snap, second):
            assert httpx.delete(f"{server.url}/templates/{s}", headers=_h(key_a)).status_code == 204
    finally:
        sbx.kill()


def test_moat_sdk_over_http_snapshot_fork_list_delete(server: Server, key_a: str) -> None:
    from moat import Sandbox as MoatSandbox

    kw: dict[str, Any] = {"api_url": server.url, "api_key": key_a}
    sbx = MoatSandbox.create(isolation="container", timeout=120, **kw)
    try:
        sbx.files.write("/home/user/h.txt", "over http")
        info = sbx.create_snapshot(name="http")
        assert info.sandbox_id == sbx.sandbox_id and info.name == "http" and info.size > 0
        assert info.tier == "container" and info.memory is False
        new = MoatSandbox.create(template=info.snapshot_id, timeout=60, **kw)
        assert new.sandbox_id != sbx.sandbox_id
        assert new.files.read("/home/user/h.txt") == "over http"
        new.kill()
        forks = sbx.fork(2)
        assert len(forks) == 2
        for f in forks:
            assert isinstance(f, MoatSandbox)
            assert f.files.read("/home/user/h.txt") == "over http"
            f.kill()
        listed = MoatSandbox.list_snapshots(sandbox_id=sbx.sandbox_id, **kw)
        assert [s.snapshot_id for s in listed] == [info.snapshot_id]
        assert MoatSandbox.delete_snapshot(info.snapshot_id, **kw)
        assert not MoatSandbox.delete_snapshot(info.snapshot_id, **kw)
        assert not _snap_dir(info.snapshot_id).exists()
    finally:
        sbx.kill()
