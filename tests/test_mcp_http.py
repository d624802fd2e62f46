"""moat's MCP server over streamable HTTP at ``/mcp`` in a real ``moat serve``, driven by the
official MCP SDK's client: API-key authentication, tenants kept apart, both protocol eras
(the 2026 stateless one the client picks by default, and the session-ful handshake), and a
session's unnamed sandboxes killed when it ends (DELETE or idle timeout), checked from
outside: the E2B REST list of the tenant and the host's /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import require_tier
from tests.killcheck import cannot_run, eventually
from tests.mcp_support import failed, http_client, new_sandbox, ok, text
from tests.server_support import MOAT, Server, free_port, new_key, serving, tenant_name

pytestmark = [pytest.mark.asyncio, pytest.mark.container]

#: The server's MCP sessions end after this many idle seconds (MOAT_MCP_IDLE_TIMEOUT).
IDLE_S = 6
HANDSHAKE = "2025-11-25"
#: MCP sessions one tenant may hold open (MOAT_MCP_MAX_SESSIONS).
MAX_SESSIONS = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_tier("container")
    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as mp:  # the server's environment, not the tests'
            mp.setenv("MOAT_MCP_ISOLATION", "container")
            mp.setenv("MOAT_MCP_IDLE_TIMEOUT", str(IDLE_S))
            mp.setenv("MOAT_MCP_MAX_SESSIONS", str(MAX_SESSIONS))
            srv = stack.enter_context(serving(tmp_path_factory.mktemp("serve") / "server.log"))
        yield srv


@pytest.fixture(scope="module")
def key_b(server: Server) -> str:
    return new_key(tenant_name("bob"))


def _state(server: Server, key: str, sid: str) -> str:
    """The sandbox's life as the server's audit trail tells it, outside the MCP face:
    "running", "ended" (killed) or "unknown"."""
    r = httpx.get(
        f"{server.url}/moat/v1/sandboxes/{sid}/audit", headers={"X-API-Key": key}, timeout=30
    )
    if r.status_code == 404:
        return "unknown"
    r.raise_for_status()
    life = [row["result"] for row in r.json() if row["kind"] == "sandbox"]
    return "ended" if "ended" in life else "running" if "created" in life else "unknown"


def _ended(server: Server, key: str, sid: str) -> bool:
    return _state(server, key, sid) == "ended"


def _sleepers(marker: str) -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"sleep\0{marker}".encode() in (proc / "cmdline").read_bytes():
                    found.add(int(proc.name))
            except OSError:
                pass
    return found


class Raw:
    """The session-ful protocol by hand (httpx), to hold a session id and walk away."""

    def __init__(self, server: Server, key: str) -> None:
        self.url = server.url + "/mcp"
        self.key = key
        self.session: str | None = None
        self.ids = 0

    def post(self, method: str, params: dict[str, Any] | None = None, *,
             key: str | None = None, notify: bool = False) -> httpx.Response:  # fmt: skip
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
        if not notify:
            self.ids += 1
            body["id"] = self.ids
        return httpx.post(self.url, json=body, headers=self._headers(key), timeout=60)

    def _headers(self, key: str | None) -> dict[str, str]:
        headers = {
            "X-API-Key": key or self.key,
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": HANDSHAKE,
        }
        if self.session:
            headers["Mcp-Session-Id"] = self.session
        return headers

    def open(self) -> None:
        r = self.post("initialize", {"protocolVersion": HANDSHAKE, "capabilities": {},
                                     "clientInfo": {"name": "raw", "version": "1"}})  # fmt: skip
        assert r.status_code == 200, r.text
        self.session = r.headers["mcp-session-id"]
        assert self.post("notifications/initialized", notify=True).status_code == 202

    def close(self) -> None:
        """End the session (DELETE), as a client does when it is done."""
        r = httpx.delete(self.url, headers=self._headers(self.key), timeout=30)
        assert r.status_code == 200, r.text

    def call(self, tool: str, **args: Any) -> dict[str, Any]:
        r = self.post("tools/call", {"name": tool, "arguments": args})
        assert r.status_code == 200, r.text
        return _message(r)["result"]  # type: ignore[no-any-return]


def _message(r: httpx.Response) -> dict[str, Any]:
    if r.headers["content-type"].startswith("application/json"):
        return r.json()  # type: ignore[no-any-return]
    data = [line[5:] for line in r.text.splitlines() if line.startswith("data:")]
    return json.loads(data[-1])  # type: ignore[no-any-return]


async def test_authentication(server: Server, key_a: str) -> None:
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": HANDSHAKE, "capabilities": {},
                       "clientInfo": {"name": "t", "version": "1"}}}  # fmt: skip
    accept = {"Accept": "application/json, text/event-stream"}
    url = server.url + "/mcp"
    other = "e2b_" + secrets.token_hex(20)  # well-formed, but no tenant's

    def post(headers: dict[str, str]) -> httpx.Response:
        return httpx.post(url, json=init, headers=headers, timeout=30)

    for headers in ({}, {"X-API-Key": other}, {"Authorization": f"Bearer {other}"},
                    {"Authorization": key_a}, {"X-API-Key": key_a[:-1]}):  # fmt: skip
        r = await asyncio.to_thread(post, {**accept, **headers})
        assert r.status_code == 401, (headers, r.text)
        assert key_a not in r.text and "Traceback" not in r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
    for headers in ({"X-API-Key": key_a}, {"Authorization": f"Bearer {key_a}"}):
        r = await asyncio.to_thread(post, {**accept, **headers})
        assert r.status_code == 200, r.text  # positive control: the same request, a good key
        gone = {**headers, "Mcp-Session-Id": r.headers["mcp-session-id"]}
        assert (await asyncio.to_thread(httpx.delete, url, headers=gone)).status_code == 200
    with pytest.raises(Exception):  # noqa: B017 (the SDK's error for a 401 varies)
        async with http_client(server.url, None) as client:
            await client.list_tools()


async def test_tools_over_http(server: Server, key_a: str) -> None:
    async with http_client(server.url, key_a) as client:  # the 2026 stateless era
        assert len((await client.list_tools()).tools) == 8
        assert await ok(client, "run_code", code="print('hi')\n6 * 7") == "stdout:\nhi\nresult:\n42"
        result = await client.call_tool("run_code", {"code": "raise KeyError('k')"})
        assert result.is_error and "KeyError" in text(result)
        shown = await failed(client, "run_code", {"code": 1, "sandbox": 2})
        assert "code:" in shown and "sandbox:" in shown
        # no session to tie an unnamed sandbox to: a clear error, and a named one works
        shown = await failed(client, "create_sandbox", {})
        assert "give create_sandbox a `name`" in shown
        name = "work-" + secrets.token_hex(3)
        sid = await new_sandbox(client, name)
        await ok(client, "write_file", sandbox=name, path="f.txt", content="round trip")
        assert await ok(client, "read_file", sandbox=name, path="f.txt") == "round trip"
        assert _state(server, key_a, sid) == "running"
        shown = await failed(client, "create_sandbox", {"name": name})
        assert "running already" in shown and sid in shown
    async with http_client(server.url, key_a, bearer=True) as client:  # another call, Bearer
        assert "round trip" in await ok(client, "run_command", sandbox=name, command="cat f.txt")
        await ok(client, "kill_sandbox", sandbox=name)
    assert await asyncio.to_thread(eventually, lambda: _ended(server, key_a, sid), 20)


async def test_egress_policy_applies(server: Server, key_a: str) -> None:
    """A sandbox made through MCP gets the resolved policy (deny-all by default): the
    gateway refuses, and says so in the audit trail (invariant 2)."""
    name = "net-" + secrets.token_hex(3)
    code = (
        "import urllib.request\ntry:\n"
        "    urllib.request.urlopen('http://example.com/', timeout=20)\n"
        "    print('REACHED')\nexcept Exception as e:\n    print('refused:', type(e).__name__)"
    )
    async with http_client(server.url, key_a) as client:
        sid = await new_sandbox(client, name)
        shown = await ok(client, "run_code", sandbox=name, code=code)
        assert "refused:" in shown and "REACHED" not in shown
        await ok(client, "kill_sandbox", sandbox=name)
    r = await asyncio.to_thread(
        httpx.get, f"{server.url}/moat/v1/sandboxes/{sid}/audit",
        headers={"X-API-Key": key_a}, timeout=30,
    )  # fmt: skip
    egress = [row for row in r.json() if row["kind"] == "egress"]
    assert egress and all(row["result"] == "deny" for row in egress), egress
    assert any(row["host"] == "example.com" for row in egress), egress


async def test_bad_mcp_setting_stops_the_server() -> None:
    proc = await asyncio.to_thread(
        subprocess.run, [*MOAT, "serve", "--port", str(free_port())],
        env={**os.environ, "MOAT_MCP_TRUST": "reckless"}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "bad MCP setting" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


async def test_tenants_are_separate(server: Server, key_a: str, key_b: str) -> None:
    name = "shared-" + secrets.token_hex(3)
    async with http_client(server.url, key_a) as a, http_client(server.url, key_b) as b:
        sid_a = await new_sandbox(a, name)
        await ok(a, "write_file", sandbox=sid_a, path="secret.txt", content="alice only")
        for ref in (name, sid_a):
            for tool, args in (
                ("kill_sandbox", {"sandbox": ref}),
                ("read_file", {"sandbox": ref, "path": "secret.txt"}),
                ("run_code", {"sandbox": ref, "code": "open('secret.txt').read()"}),
                ("write_file", {"sandbox": ref, "path": "x", "content": "y"}),
            ):
                shown = await failed(b, tool, args)
                # exactly the answer of an unknown sandbox (invariant 11)
                assert shown == (
                    f"NotFoundError: no running sandbox named or with id {ref!r} "
                    "(list_sandboxes shows yours)"
                ), shown
        assert sid_a not in await ok(b, "list_sandboxes")
        sid_b = await new_sandbox(b, name)  # names are per tenant
        assert sid_b != sid_a
        assert "alice only" in await ok(a, "read_file", sandbox=name, path="secret.txt")
        await ok(b, "kill_sandbox", sandbox=name)
        assert _state(server, key_a, sid_a) == "running"  # B's kill took its own
        assert _state(server, key_b, sid_a) == "unknown"
        await ok(a, "kill_sandbox", sandbox=name)
    # another tenant's MCP session id answers like an unknown one
    raw = Raw(server, key_a)
    raw.open()
    assert raw.post("tools/list").status_code == 200  # positive control: its owner
    assert raw.post("tools/list", key=key_b).status_code == 404
    raw.close()


async def test_session_end_kills_its_unnamed_sandboxes(server: Server, key_a: str) -> None:
    marker = str(600 + secrets.randbelow(10_000))
    name = "keep-" + secrets.token_hex(3)
    async with http_client(server.url, key_a, mode="legacy") as client:  # the handshake era
        unnamed = await new_sandbox(client)
        named = await new_sandbox(client, name)
        for sid in (unnamed, named):
            await ok(client, "run_command", sandbox=sid,
                     command=f"nohup sleep {marker} >/dev/null 2>&1 &")  # fmt: skip
        assert unnamed in await ok(client, "list_sandboxes")
        await asyncio.sleep(0.3)
        pids = _sleepers(marker)
        assert len(pids) == 2  # positive control: both sandboxes' sleepers, seen from outside
        assert _state(server, key_a, unnamed) == _state(server, key_a, named) == "running"
    # the client's DELETE ended the session: its unnamed sandbox is gone, the named one not
    assert await asyncio.to_thread(eventually, lambda: _ended(server, key_a, unnamed), 20)
    assert _state(server, key_a, named) == "running"
    assert await asyncio.to_thread(eventually, lambda: sum(cannot_run(p) for p in pids) == 1, 20)
    async with http_client(server.url, key_a, mode="legacy") as client:
        shown = await ok(client, "list_sandboxes")
        assert named in shown and unnamed not in shown
        await ok(client, "kill_sandbox", sandbox=name)
    assert await asyncio.to_thread(eventually, lambda: all(cannot_run(p) for p in pids), 20)


async def test_idle_session_end_kills_its_unnamed_sandboxes(server: Server, key_a: str) -> None:
    raw = Raw(server, key_a)
    raw.open()
    result = raw.call("create_sandbox")
    assert not result.get("isError"), result
    sid = result["content"][0]["text"].split()[1]
    assert _state(server, key_a, sid) == "running"
    ran = raw.call("run_command", sandbox=sid, command="true")
    assert "exit code: 0" in ran["content"][0]["text"]
    started = time.monotonic()
    # the client walks away without DELETE: the session ends after IDLE_S, and the sandbox
    assert await asyncio.to_thread(eventually, lambda: _ended(server, key_a, sid), IDLE_S + 20)
    assert time.monotonic() - started >= IDLE_S - 1
    assert raw.post("tools/list").status_code == 404  # the session is gone too


async def test_sessions_per_tenant_are_capped(server: Server, key_b: str) -> None:
    """One tenant can't take every MCP session of the server (invariant 11)."""
    key = new_key(tenant_name("many"))
    raws = [Raw(server, key) for _ in range(MAX_SESSIONS)]
    for raw in raws:
        raw.open()
    extra = Raw(server, key)
    r = extra.post("initialize", {"protocolVersion": HANDSHAKE, "capabilities": {},
                                  "clientInfo": {"name": "raw", "version": "1"}})  # fmt: skip
    assert r.status_code == 429 and "too many open MCP sessions" in r.text
    other = Raw(server, key_b)
    other.open()  # another tenant is not held back
    assert raws[0].post("tools/list").status_code == 200  # the open ones still serve
    raws[0].close()
    extra.open()  # room again once one ended
    for raw in (*raws[1:], extra, other):
        raw.close()
