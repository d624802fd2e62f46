"""Template builds' status on disk (moat.engine.buildstate): no sandbox starts here."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

from moat.engine import buildstate
from moat.engine.tmplbuild import TemplateBuilds
from moat.templates.store import Store
from moat.templates.tenant import TenantTemplates


def _bid() -> str:
    return "bld-" + secrets.token_hex(12)


def test_a_record_reads_back_in_its_tenants_area_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "templates", tmp_path / "layers")
    a, b = TenantTemplates(store, "a"), TenantTemplates(store, "b")
    bid = _bid()
    entries = [{"message": str(i), "level": "info"} for i in range(buildstate.KEEP_ENTRIES + 5)]
    buildstate.save(a, {"buildID": bid, "templateID": "tpl-x", "status": "ready",
                        "entries": entries})  # fmt: skip
    rec = buildstate.load(a, bid)
    assert rec is not None and rec["status"] == "ready"
    assert rec["first"] == 5 and rec["entries"][0]["message"] == "5"  # the last ones kept
    assert buildstate.load(b, bid) is None  # another tenant's: unknown (invariant 11)
    assert buildstate.load(a, "../" + bid) is None and buildstate.load(a, _bid()) is None


def test_old_finished_records_are_pruned(tmp_path: Path) -> None:
    store = Store(tmp_path / "templates", tmp_path / "layers")
    a = TenantTemplates(store, "a")
    ids = [_bid() for _ in range(buildstate.KEEP_PER_TENANT + 3)]
    for bid in ids:
        buildstate.save(a, {"buildID": bid, "templateID": "tpl-x", "status": "error"})
    assert len(list((a.root / "builds").glob("bld-*.json"))) == buildstate.KEEP_PER_TENANT
    assert buildstate.load(a, ids[-1]) is not None


def test_only_a_dead_servers_unfinished_builds_are_orphaned(tmp_path: Path) -> None:
    """A live server's build (this process) is left alone; a dead one's is interrupted at the
    next server's start, its work directory and untagged record removed."""
    store = Store(tmp_path / "templates", tmp_path / "layers")
    store.prepare()
    a = TenantTemplates(store, "a")
    live, dead = _bid(), _bid()
    rec = a.request("t", 5)
    buildstate.save(a, {"tenant": "a", "buildID": live, "templateID": "x", "status": "building"})
    buildstate.save(a, {"tenant": "a", "buildID": dead, "templateID": rec["templateID"],
                        "status": "building"})  # fmt: skip
    child = subprocess.Popen(["true"])
    child.wait()
    path = a.root / "builds" / f"{dead}.json"
    data = json.loads(path.read_text())
    data["owner"] = f"{child.pid}:1"
    path.write_text(json.dumps(data))
    (a.root / "work" / dead).mkdir(parents=True)
    live_rec = buildstate.load(a, live)
    assert live_rec is not None and not buildstate.orphaned(live_rec)
    assert [r["buildID"] for r in buildstate.unfinished(store.templates / "tenants")] == [dead]
    builds = TemplateBuilds(None, store)  # type: ignore[arg-type]
    assert builds.recover() == 1
    after = buildstate.load(a, dead)
    assert after is not None and after["status"] == "error"
    assert after["reason"]["message"] == buildstate.INTERRUPTED
    assert not (a.root / "work" / dead).exists() and a.get(rec["templateID"]) is None
    assert builds.recover() == 0  # done once
    assert buildstate.load(a, live)["status"] == "building"  # type: ignore[index]
