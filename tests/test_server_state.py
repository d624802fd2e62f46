"""The server's per-sandbox records end with their sandbox, however it ends (fast: fake runtime).

A record left behind by a sandbox that timed out or died is a leak that grows for as long as
the server runs; the engine's end notification drops it (``FrontDoor.on_ended``).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from moat.engine.api import FrontDoor
from moat.server.app import ServerState, make_app
from moat.store.keys import KeyStore
from moat.testing import fake_front_door


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[ServerState, httpx.AsyncClient, str]]:
    front: FrontDoor = fake_front_door()
    keys = KeyStore(tmp_path / "keys.db")
    _, key = keys.create("alice")
    state = ServerState(front, keys, None)
    transport = httpx.ASGITransport(app=make_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://moat") as client:
        yield state, client, key
    state.unsubscribe()
    for s in list(front.engine.sessions.values()):
        await s.kill()
    keys.close()


async def _create(client: httpx.AsyncClient, key: str, timeout: int) -> dict[str, Any]:
    r = await client.post(
        "/v2/sandboxes", json={"templateID": "base", "timeout": timeout}, headers={"X-API-Key": key}
    )
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


async def _gone(state: ServerState, sid: str, within: float = 10.0) -> bool:
    deadline = asyncio.get_running_loop().time() + within
    while sid in state.records:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _answers_not_found(client: httpx.AsyncClient, key: str, created: dict[str, Any]) -> None:
    sid = created["sandboxID"]
    r = await client.get(f"/sandboxes/{sid}", headers={"X-API-Key": key})
    assert r.status_code == 404 and "was not found" in r.json()["message"]
    plane = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983",
             "X-Access-Token": created["envdAccessToken"]}  # fmt: skip
    r = await client.get("/health", headers=plane)
    assert r.status_code == 502 and "was not found" in r.json()["message"]


@pytest.mark.asyncio
async def test_a_timed_out_sandbox_takes_its_record(
    served: tuple[ServerState, httpx.AsyncClient, str],
) -> None:
    state, client, key = served
    created = await _create(client, key, timeout=1)
    sid = created["sandboxID"]
    assert sid in state.records
    assert await _gone(state, sid)
    assert state.records == {}
    await _answers_not_found(client, key, created)


@pytest.mark.asyncio
async def test_a_dead_sandbox_takes_its_record(
    served: tuple[ServerState, httpx.AsyncClient, str],
) -> None:
    state, client, key = served
    created = await _create(client, key, timeout=300)
    sid = created["sandboxID"]
    keep = await _create(client, key, timeout=300)  # a neighbour that must stay
    session = state.front.engine.sessions[sid]
    assert session.proc is not None
    os.kill(session.proc._proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]  # the agent dies
    assert await _gone(state, sid)
    assert set(state.records) == {keep["sandboxID"]}
    await _answers_not_found(client, key, created)


@pytest.mark.asyncio
async def test_delete_and_unsubscribe(served: tuple[ServerState, httpx.AsyncClient, str]) -> None:
    state, client, key = served
    created = await _create(client, key, timeout=300)
    r = await client.delete(f"/sandboxes/{created['sandboxID']}", headers={"X-API-Key": key})
    assert r.status_code == 204 and state.records == {}
    # Positive control: with the subscription gone, a timed-out sandbox leaves its record
    # (what the server did before), so the tests above can see a leak.
    state.unsubscribe()
    created = await _create(client, key, timeout=1)
    assert not await _gone(state, created["sandboxID"], within=3.0)
    assert created["sandboxID"] not in state.front.engine.sessions


@pytest.mark.container
@pytest.mark.slow
def test_a_timed_out_sandbox_is_gone_through_the_sdk(tmp_path: Path) -> None:
    """The same end through a real server and the E2B SDK: the id answers as unknown."""
    from e2b.exceptions import NotFoundException
    from e2b_code_interpreter import Sandbox
    from tests.conftest import require_tier
    from tests.killcheck import eventually
    from tests.server_support import new_key, serving, tenant_name

    require_tier("container")
    with serving(tmp_path / "server.log") as srv:
        key = new_key(tenant_name("brief"))
        sbx = Sandbox.create(api_key=key, timeout=2)
        assert sbx.run_code("1 + 1").text == "2"
        assert eventually(lambda: not sbx.is_running(), 20)
        with pytest.raises(NotFoundException):
            Sandbox.get_info(sbx.sandbox_id, api_key=key)
        assert sbx.sandbox_id not in {s.sandbox_id for s in Sandbox.list(api_key=key).next_items()}
        plane = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983",
                 "X-Access-Token": str(sbx._envd_access_token)}  # fmt: skip
        r = httpx.get(srv.url + "/health", headers=plane, timeout=30)
        assert r.status_code == 502 and "was not found" in r.json()["message"]
