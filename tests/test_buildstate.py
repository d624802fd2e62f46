"""Template builds' status on disk (moat.engine.buildstate): no sandbox starts here."""

from __future__ import annotations

import secrets
from pathlib import Path

from moat.engine import buildstate
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
