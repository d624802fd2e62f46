"""Resume into a warm-pool sandbox over E2B's wire (issue 11): ``POST /sandboxes/{id}/connect``
on a real ``moat serve`` with a warm pool, through the unmodified E2B SDK.

Checked from outside: the sandbox's audit rows (its resume's "created" row names the warm
pool), the tenant's listing (the paused sandbox's id only, no warm sandbox's), another
tenant's view, and the files read back through the SDK objects of before and after.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from e2b_code_interpreter import Sandbox as E2bSandbox
from tests.conftest import require_tier
from tests.server_support import new_key, serving, tenant_name

pytestmark = [pytest.mark.container, pytest.mark.slow]


def test_e2b_connect_resumes_into_a_warm_sandbox(tmp_path: Path) -> None:
    require_tier("container")
    with serving(tmp_path / "serve.log", pool="container=1") as srv:
        key, other = new_key(tenant_name("pool")), new_key(tenant_name("other"))
        h = {"X-API-Key": key}
        sbx = E2bSandbox.create(api_key=key, timeout=120, metadata={"who": "pool"})
        sid = sbx.sandbox_id
        try:
            sbx.files.write("/home/user/keep.txt", "kept in a warm sandbox")
            assert sbx.pause() is True
            time.sleep(1.0)  # the pool refills after the first (cold) create
            t0 = time.perf_counter()
            back = E2bSandbox.connect(sid, api_key=key)
            took = time.perf_counter() - t0
            assert back.sandbox_id == sid
            assert back.files.read("/home/user/keep.txt") == "kept in a warm sandbox"
            assert sbx.files.read("/home/user/keep.txt") == "kept in a warm sandbox"  # tokens
            assert back.get_info().metadata == {"who": "pool"}
            assert back.run_code("print(6 * 7)").logs.stdout == ["42\n"]
            rows = httpx.get(f"{srv.url}/moat/v1/sandboxes/{sid}/audit", headers=h).json()
            life = [(r["result"], r.get("reason")) for r in rows if r["kind"] == "sandbox"]
            assert ("created", "warm pool") in life and ("resumed", None) in life, life
            listed = httpx.get(f"{srv.url}/v2/sandboxes", headers=h).json()
            assert [(x["sandboxID"], x["state"]) for x in listed] == [(sid, "running")]
            assert httpx.get(f"{srv.url}/v2/sandboxes", headers={"X-API-Key": other}).json() == []
            print(f"connect (resume into a warm sandbox) over the wire: {took * 1000:.0f} ms")
        finally:
            httpx.delete(f"{srv.url}/sandboxes/{sid}", headers=h)
