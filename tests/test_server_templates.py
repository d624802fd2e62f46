"""E2B's template build API over ``moat serve`` (issue 12): the real E2B SDK's ``Template``
builder against a real server (container tier), builds in real build sandboxes.

The base is the build tests' small Debian root (``jq``, ``python3-pip``) from the machine's
layer cache (/var/cache/moat-test/layers, tests/test_templates_build.py), published here as
a host-wide template: no step of these tests needs the network. Outcomes are checked from
outside: files and settings seen inside a sandbox of the template, the template's directory
on the host's disk, and another tenant's view (exactly an unknown template's).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import BuildException, Sandbox, SandboxException, Template
from tests.conftest import require_tier
from tests.server_support import Server, new_key, serving, start_server, tenant_name
from tests.template_store import LAYERS, TEST_BASE
from tests.test_templates_build import _cgroups_of, _procs_with

from moat.paths import state_dir
from moat.templates.build import Builder
from moat.templates.store import Store, remove_tree

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(900)]

BASE = "e2b-test-base"
#: a tenant with room for one template of at most 1 MiB (the server's policy file)
SMALL = tenant_name("tmpl-small")


def _store() -> Store:
    return Store(state_dir() / "templates", LAYERS)


def _tenant_records() -> list[dict[str, Any]]:
    base = state_dir() / "templates" / "tenants"
    return [json.loads(p.read_text()) for p in base.glob("*/t/tpl-*.json")]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_tier("container")
    store = _store()
    store.prepare()
    locks = set(LAYERS.glob("*.lock"))
    asyncio.run(Builder(store).build(TEST_BASE, BASE))  # every layer cached: no step runs
    saved = os.environ.get("MOAT_TEMPLATE_LAYERS")
    os.environ["MOAT_TEMPLATE_LAYERS"] = str(LAYERS)
    policy = tmp_path_factory.mktemp("policy") / "tenants.toml"
    policy.write_text(f"[tenants.{SMALL}]\nquotas = {{ templates = 1, template_mb = 1 }}\n")
    os.environ["MOAT_TENANTS_FILE"] = str(policy)
    built: set[str] = set()
    try:
        with serving(tmp_path_factory.mktemp("serve") / "server.log") as srv:
            yield srv
            for rec in _tenant_records():
                built.update(str(t) for t in dict(rec["tags"]).values())
            built.update(str(t) for t in _DELETED)
    finally:
        os.environ.pop("MOAT_TENANTS_FILE", None)
        if saved is None:
            os.environ.pop("MOAT_TEMPLATE_LAYERS", None)
        else:
            os.environ["MOAT_TEMPLATE_LAYERS"] = saved
        # the layers these builds made leave the machine's cache (they are unique to this
        # run); the test base's stay
        keep = set(TEST_BASE.layer_keys())
        for key in set(_LAYERS) - keep:
            for p in (LAYERS / key, LAYERS / f"{key}.lock"):
                if p.exists():
                    remove_tree(p)
        for p in set(LAYERS.glob("*.lock")) - locks:  # failed steps' (no layer was made)
            if not (LAYERS / p.name.removesuffix(".lock")).exists():
                p.unlink(missing_ok=True)


#: content ids deleted by a test, and every layer key the tests' templates used
_DELETED: list[str] = []
_LAYERS: list[str] = []


def _remember_layers(tid: str) -> None:
    meta = _store().meta(tid) or {}
    _LAYERS.extend(str(k) for k in meta.get("layers", []))


@pytest.fixture(scope="module")
def key_a(server: Server) -> str:
    return new_key(tenant_name("tmpl-a"))


@pytest.fixture(scope="module")
def key_b(server: Server) -> str:
    return new_key(tenant_name("tmpl-b"))


def _h(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def _content_id(template_id: str) -> str:
    for rec in _tenant_records():
        if rec["templateID"] == template_id:
            return str(dict(rec["tags"])["default"])
    raise AssertionError("no such template record")


def test_sdk_builds_a_template_a_sandbox_uses_and_other_tenants_cannot_see(
    server: Server, key_a: str, key_b: str, tmp_path: Path
) -> None:
    marker = secrets.token_hex(6)
    (tmp_path / "hello.txt").write_text(f"hello {marker}\n")
    (tmp_path / "app" / "lib").mkdir(parents=True)
    (tmp_path / "app" / "lib" / "m.py").write_text("X = 1\n")
    template = (
        Template(file_context_path=str(tmp_path))
        .from_template(BASE)
        .set_envs({"MARK": marker})
        .run_cmd(
            f"echo build-output-{marker} && echo built-$MARK > /opt/built.txt"
            " && mkdir /opt/u && chown user /opt/u",
            user="root",
        )
        .run_cmd("id -un > /opt/u/who.txt && pwd >> /opt/u/who.txt")  # E2B's default: user
        .copy("hello.txt", "/opt/hello.txt")
        .copy("app", "/opt/app/")  # Docker's rule: the directory's contents go into /opt/app
        .set_envs({"GREETING": "hi there"})
    )
    name = f"web-{marker}"
    logs: list[Any] = []
    info = Template.build(
        template, name, cpu_count=1, memory_mb=768, on_build_logs=logs.append, api_key=key_a
    )
    text = "\n".join(str(e.message) for e in logs)
    assert f"build-output-{marker}" in text  # the step's own output came back as build logs
    cid = _content_id(info.template_id)
    _remember_layers(cid)
    assert (state_dir() / "templates" / cid / "rootfs" / "opt/hello.txt").is_file()

    sbx = Sandbox.create(name, api_key=key_a, timeout=120)
    try:
        assert sbx.get_info().memory_mb == 768  # the template's size (E2B's memoryMB)
        got = sbx.commands.run(
            "cat /opt/hello.txt /opt/built.txt /opt/u/who.txt /opt/app/lib/m.py"
            ' && echo "$GREETING|$MARK"'
        ).stdout
    finally:
        sbx.kill()
    assert got.splitlines() == [
        f"hello {marker}", f"built-{marker}", "user", "/home/user", "X = 1",
        f"hi there|{marker}",
    ]  # fmt: skip
    assert Template.exists(name, api_key=key_a)

    # tenant B: the name, the template id and the content id are all unknown
    assert not Template.exists(name, api_key=key_b)
    unknown = f"nope-{marker}"
    for ref in (name, info.template_id, cid):
        with pytest.raises(SandboxException) as got_b:
            Sandbox.create(ref, api_key=key_b, timeout=60)
        with pytest.raises(SandboxException) as got_unknown:
            Sandbox.create(unknown, api_key=key_b, timeout=60)
        assert type(got_b.value) is type(got_unknown.value)
        assert str(got_b.value).replace(ref, "X") == str(got_unknown.value).replace(unknown, "X")
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for method, path in [
            ("GET", f"/templates/{info.template_id}"),
            ("DELETE", f"/templates/{info.template_id}"),
            ("GET", f"/templates/{info.template_id}/builds/{info.build_id}/status"),
            ("GET", f"/templates/aliases/{name}"),
            ("GET", f"/templates/{info.template_id}/files/{'0' * 64}"),  # no upload link
            ("POST", f"/v2/templates/{info.template_id}/builds/{info.build_id}"),
        ]:
            r = c.request(method, path, headers=_h(key_b))
            assert r.status_code == 404, (method, path, r.text)
        assert c.get("/templates", headers=_h(key_b)).json() == []
        mine = c.get("/templates", headers=_h(key_a)).json()
        assert [t["templateID"] for t in mine] == [info.template_id]
        assert (state_dir() / "templates" / cid).is_dir()  # B's delete removed nothing
        # A deletes it: gone from the disk (checked from outside) and from every name
        assert c.delete(f"/templates/{info.template_id}", headers=_h(key_a)).status_code == 204
    _DELETED.append(cid)
    assert not (state_dir() / "templates" / cid).exists()
    assert not Template.exists(name, api_key=key_a)


def test_failing_step_reports_the_step_and_exit_code(server: Server, key_a: str) -> None:
    marker = secrets.token_hex(6)
    template = (
        Template()
        .from_template(BASE)
        .set_envs({"X": "1"})
        .run_cmd(f"echo failing-output-{marker}; exit 7", user="root")
    )
    logs: list[Any] = []
    with pytest.raises(BuildException) as exc:
        Template.build(template, f"bad-{marker}", on_build_logs=logs.append, api_key=key_a)
    message = str(exc.value)
    assert "step 2 failed: exit code 7" in message  # the SDK's numbering: ENV is step 1
    assert f"failing-output-{marker}" in message
    assert any(f"failing-output-{marker}" in str(e.message) for e in logs)


def test_what_does_not_map_is_refused_before_anything_runs(server: Server, key_a: str) -> None:
    cases: list[tuple[Any, str]] = [
        (Template().from_python_image("3").run_cmd("true"), "python:3"),
        (Template().from_template(BASE).skip_cache().run_cmd("true"), "skip_cache"),
        (Template().from_template("no-such-base"), "was not found"),
    ]
    for template, words in cases:
        with pytest.raises(BuildException, match=words):
            Template.build(template, f"refused-{secrets.token_hex(3)}", api_key=key_a)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/templates", headers=_h(key_a)).json() == []  # none left half-made
        r = c.post("/v3/templates", json={"name": "base"}, headers=_h(key_a))
        assert r.status_code == 400 and "reserved" in r.json()["message"]
        r = c.post("/v3/templates", json={"name": "x", "cpuCount": 99}, headers=_h(key_a))
        assert r.status_code == 400 and "cpuCount" in r.json()["message"]
        r = c.put("/moat/v1/template-uploads/not-a-token", content=b"x")
        assert r.status_code == 404


def test_tenant_quotas_bound_templates_uploads_and_builds(server: Server, tmp_path: Path) -> None:
    key = new_key(SMALL)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        first = c.post("/v3/templates", json={"name": "one"}, headers=_h(key))
        assert first.status_code == 202
        second = c.post("/v3/templates", json={"name": "two"}, headers=_h(key))
        assert second.status_code == 429 and "limit" in second.json()["message"]
        # an upload past the tenant's room (1 MiB): refused, nothing kept on the host
        tid = first.json()["templateID"]
        link = c.get(f"/templates/{tid}/files/{'1' * 64}", headers=_h(key)).json()
        assert link["present"] is False
        r = c.put(link["url"], content=os.urandom(2 << 20))
        assert r.status_code == 429 and "storage is full" in r.json()["message"]
        assert not list((state_dir() / "templates" / "tenants").glob(f"*/uploads/{'1' * 64}*"))
        assert c.put(link["url"], content=b"x").status_code == 404  # a link works once
    # a build: its size cap is the tenant's room, so the first layer is over it
    template = Template().from_template(BASE).run_cmd("true", user="root")
    with pytest.raises(BuildException, match="size cap of 1 MiB"):
        Template.build(template, "one", api_key=key)


def test_a_server_that_stops_ends_its_builds_and_leaves_nothing(
    server: Server, tmp_path: Path
) -> None:
    """Invariant 5: SIGTERM to ``moat serve`` mid-build kills the build step's sandbox and
    removes its temp directories (checked from outside: processes, cgroups, directories)."""
    marker = f"tmpl-stop-{secrets.token_hex(6)}"
    own = start_server(tmp_path / "server.log")
    saved = {k: os.environ.get(k) for k in ("E2B_API_URL", "E2B_SANDBOX_URL")}
    os.environ["E2B_API_URL"] = os.environ["E2B_SANDBOX_URL"] = own.url
    try:
        key = new_key(tenant_name("tmpl-stop"))
        template = Template().from_template(BASE).run_cmd(f"echo {marker}; sleep 300", user="root")
        info = Template.build_in_background(template, "slow", api_key=key)
        deadline = time.monotonic() + 120
        while not _procs_with(marker):
            assert time.monotonic() < deadline, "the build step never started"
            status = Template.get_build_status(info, api_key=key)
            assert status.status.value in ("waiting", "building"), status
            time.sleep(0.5)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        assert own.stop() == 0
    assert "Traceback" not in own.log.read_text()
    assert not _procs_with(marker)  # the step's processes died with it
    assert not _cgroups_of(own.proc.pid)
    for d in (LAYERS, state_dir() / "templates"):  # no temp directory of that server's
        assert not list(d.glob(f".tmp-{own.proc.pid}-*")), d
    assert not list((state_dir() / "templates" / "tenants").glob("*/work/*"))
    # the build's status outlives the server: the next one reads it as it ended
    again = start_server(tmp_path / "again.log")
    try:
        status = _status_over(again, key, info.template_id, info.build_id)
    finally:
        assert again.stop() == 0
    assert status["status"] == "error", status
    assert "cancelled (the server stopped)" in status["reason"]["message"], status


def _status_over(srv: Server, key: str, template_id: str, build_id: str) -> dict[str, Any]:
    r = httpx.get(
        f"{srv.url}/templates/{template_id}/builds/{build_id}/status", headers=_h(key), timeout=30
    )
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_a_build_a_dead_server_left_reads_as_interrupted(server: Server, tmp_path: Path) -> None:
    """A server killed mid-build (SIGKILL: no clean-up of its own): the next server reads
    that build as failed, "interrupted by a restart", cleans what it left in the tenant's
    area, and another tenant still can't see it (invariant 11)."""
    require_tier("container")
    marker = f"tmpl-kill-{secrets.token_hex(6)}"
    own = start_server(tmp_path / "server.log")
    key, other = new_key(tenant_name("tmpl-kill")), new_key(tenant_name("tmpl-kill-b"))
    body = {"name": "killed", "cpuCount": 1, "memoryMB": 512}
    r = httpx.post(f"{own.url}/v3/templates", json=body, headers=_h(key), timeout=30)
    assert r.status_code == 202, r.text
    tid, bid = r.json()["templateID"], r.json()["buildID"]
    steps = {"fromTemplate": BASE, "steps": [
        {"type": "RUN", "args": [f"echo {marker}; sleep 300", "root"], "force": False},
    ]}  # fmt: skip
    r = httpx.post(f"{own.url}/v2/templates/{tid}/builds/{bid}", json=steps, headers=_h(key))
    assert r.status_code == 202, r.text
    try:
        deadline = time.monotonic() + 120
        while not _procs_with(marker):
            assert time.monotonic() < deadline, "the build step never started"
            assert _status_over(own, key, tid, bid)["status"] in ("waiting", "building")
            time.sleep(0.5)
    finally:
        own.proc.kill()
        own.proc.wait(30)
    deadline = time.monotonic() + 20
    while _procs_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _procs_with(marker):  # not this test's subject (and not expected): by pid
        os.kill(pid, 9)
    again = start_server(tmp_path / "again.log")
    try:
        status = _status_over(again, key, tid, bid)
        assert status["status"] == "error", status
        assert status["reason"]["message"] == "the build was interrupted by a restart of the server"
        assert any("interrupted" in e["message"] for e in status["logEntries"])
        assert _status_over(again, key, tid, bid) == status  # read back once, then kept
        r = httpx.get(f"{again.url}/templates/{tid}/builds/{bid}/status", headers=_h(other))
        assert r.status_code == 404  # another tenant's build is unknown
        assert httpx.get(f"{again.url}/templates/{tid}", headers=_h(key)).status_code == 404
    finally:
        assert again.stop() == 0
    assert not list((state_dir() / "templates" / "tenants").glob(f"*/work/{bid}"))
