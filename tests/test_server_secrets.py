"""A brokered secret (moat's create extension) never crosses the wire back (invariant 3).

Every response of every endpoint a client can call on a sandbox holding a secret is kept,
whole (status, headers, body, the base64 payloads of Connect streams decoded), and searched
for the value. Positive controls: the sandbox sees the placeholder, and the same calls with
the value given as a plain E2B ``envVars`` entry show it on the very channels searched.
"""

from __future__ import annotations

import base64
import json
import secrets
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.conftest import require_tier
from tests.server_support import Server, new_key, serving, tenant_name

pytestmark = [pytest.mark.container, pytest.mark.slow]

NAME = "API_TOKEN"
HOSTS = ["api.example.com"]
CODE = f"""
import os
v = os.environ[{NAME!r}]
print(v)
print(dict(os.environ))
open("/home/user/token.txt", "w").write(v)
v
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_tier("container")
    with serving(tmp_path_factory.mktemp("serve") / "server.log") as srv:
        yield srv


def _envelope(msg: Any) -> bytes:
    body = json.dumps(msg).encode()
    return struct.pack(">BI", 0, len(body)) + body


def _decoded(raw: bytes) -> list[bytes]:
    """The base64 payloads of a Connect stream's frames (process output is base64)."""
    out: list[bytes] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            try:
                out.append(base64.b64decode(node, validate=True))
            except ValueError:
                pass

    while len(raw) >= 5:
        _, n = struct.unpack(">BI", raw[:5])
        try:
            walk(json.loads(raw[5 : 5 + n]))
        except ValueError:
            pass
        raw = raw[5 + n :]
    return out


def _exchange(server: Server, key: str, create: dict[str, Any]) -> tuple[list[bytes], str]:
    """Every call a client can make on one sandbox: each response as bytes (status line,
    headers, body, decoded stream payloads), and what the sandbox printed for ``NAME``."""
    seen: list[bytes] = []

    def keep(r: httpx.Response) -> None:
        r.read()
        head = "".join(f"{k}: {v}\n" for k, v in r.headers.items())
        seen.append(f"{r.status_code}\n{head}\n".encode() + r.content)
        seen.extend(_decoded(r.content))

    api = {"X-API-Key": key}
    with httpx.Client(base_url=server.url, timeout=60, event_hooks={"response": [keep]}) as c:
        r = c.post("/v2/sandboxes", json=create, headers=api)
        assert r.status_code == 201, r.text
        sid, token = r.json()["sandboxID"], r.json()["envdAccessToken"]
        traffic = r.json().get("trafficAccessToken") or ""
        plane = {"E2b-Sandbox-Id": sid, "X-Access-Token": token}
        envd = {**plane, "E2b-Sandbox-Port": "49983", "Connect-Protocol-Version": "1"}
        code = {**plane, "E2b-Sandbox-Port": "49999", "E2B-Traffic-Access-Token": traffic}
        try:
            c.get(f"/sandboxes/{sid}", headers=api)
            c.get("/v2/sandboxes", headers=api)
            c.post(f"/sandboxes/{sid}/connect", json={"timeout": 120}, headers=api)
            c.get(f"/sandboxes/{sid}/metrics", headers=api)
            r = c.post("/execute", json={"code": CODE}, headers=code)
            lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
            printed = next(x["text"] for x in lines if x.get("type") == "stdout").splitlines()[0]
            c.post("/execute", json={"code": f"raise RuntimeError(os.environ[{NAME!r}])"},
                   headers=code)  # fmt: skip
            c.get("/contexts", headers=code)
            c.get("/files", params={"path": "/home/user/token.txt"},
                  headers={**envd, "Connect-Protocol-Version": ""})  # fmt: skip
            cmd = f"env; cat /home/user/token.txt; echo ${NAME} >&2; exit 3"
            c.post("/process.Process/Start",
                   content=_envelope({"process": {"cmd": "/bin/bash", "args": ["-c", cmd]}}),
                   headers={**envd, "Content-Type": "application/connect+json"})  # fmt: skip
            json_rpc = {**envd, "Content-Type": "application/json"}
            c.post("/process.Process/List", json={}, headers=json_rpc)
            c.post("/filesystem.Filesystem/ListDir", json={"path": "/home/user"}, headers=json_rpc)
            c.post("/filesystem.Filesystem/Stat", json={"path": "/home/user/token.txt"},
                   headers=json_rpc)  # fmt: skip
        finally:
            c.delete(f"/sandboxes/{sid}", headers=api)
        c.get(f"/sandboxes/{sid}", headers=api)  # an ended sandbox's answer too
    return seen, printed


def _carry(replies: list[bytes], value: str) -> list[bytes]:
    forms = (value.encode(), base64.b64encode(value.encode()), value.encode().hex().encode())
    return [r for r in replies if any(f in r for f in forms)]


def test_brokered_secret_never_in_any_http_response(server: Server) -> None:
    key = new_key(tenant_name("broker"))
    value = "sk-live-" + secrets.token_hex(16)
    secret = {"value": value, "hosts": HOSTS}
    replies, printed = _exchange(
        server, key, {"templateID": "base", "timeout": 120, "moat": {"secrets": {NAME: secret}}}
    )
    assert len(replies) > 16
    assert _carry(replies, value) == [], _carry(replies, value)[:2]
    # Positive control: the sandbox saw a placeholder, and it came back on the same channels
    # (stdout, the result, the file, the command stream), so a value there would have shown.
    assert printed and printed != value
    assert sum(printed.encode() in r for r in replies) >= 4

    # Refused creates must not echo the value either (invariant 8).
    for bad in (
        {"value": value, "hosts": ["not a host!"]},
        {"value": value, "hosts": HOSTS, "header": "Bad\nHeader"},
        {"value": value, "hosts": HOSTS, "template": "no placeholder"},
        {"value": value, "hosts": HOSTS, "extra": value},
        {"value": value, "hosts": HOSTS * 65},
    ):
        r = httpx.post(server.url + "/v2/sandboxes", headers={"X-API-Key": key}, timeout=60,
                       json={"templateID": "base", "moat": {"secrets": {NAME: bad}}})  # fmt: skip
        if r.status_code == 201:
            httpx.delete(f"{server.url}/sandboxes/{r.json()['sandboxID']}",
                         headers={"X-API-Key": key})  # fmt: skip
        assert value not in r.text and value not in str(r.headers), (bad, r.text)
        if "extra" not in bad:  # unknown keys are ignored, as everywhere in E2B's bodies
            assert r.status_code == 400, (bad, r.text)
    r = httpx.post(server.url + "/v2/sandboxes", headers={"X-API-Key": key}, timeout=60,
                   json={"templateID": "base", "moat": {"secrets": {"1 bad": secret}}})  # fmt: skip
    assert r.status_code == 400 and value not in r.text


def test_positive_control_a_plain_env_var_shows_everywhere(server: Server) -> None:
    """The same calls with the value as an E2B envVars entry (not brokered, not registered):
    the search above finds it on every channel it reads, so it can see a leak."""
    key = new_key(tenant_name("plain"))
    value = "sk-live-" + secrets.token_hex(16)
    replies, printed = _exchange(
        server, key, {"templateID": "base", "timeout": 120, "envVars": {NAME: value}}
    )
    assert printed == value
    assert len(_carry(replies, value)) >= 4
