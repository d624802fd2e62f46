"""The paused store's commit, claim and crash repair, on plain files (no sandbox)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moat.errors import NotFoundError
from moat.store.paused import PausedStore

SID = "sbx-00112233aabbccdd"
DEAD = "999999999.1"  # no process has this pid: its work is a crash's leftover


def _commit(store: PausedStore, sid: str = SID) -> None:
    pending = store.begin(sid)
    (pending.checkpoint / "blob").write_bytes(b"x" * 100)
    store.commit(pending, {"sandbox_id": sid, "tenant": "t"})


def test_commit_is_one_rename_and_records_load(tmp_path: Path) -> None:
    store = PausedStore(tmp_path)
    pending = store.begin(SID)
    assert [p.name[:5] for p in tmp_path.iterdir()] == [".tmp-"]
    assert list(store.records()) == []  # not committed: not paused
    (pending.checkpoint / "blob").write_bytes(b"x")
    store.commit(pending, {"sandbox_id": SID, "tenant": "t"})
    assert [p.name for p in tmp_path.iterdir()] == [SID]
    assert json.loads((tmp_path / SID / "record.json").read_text())["tenant"] == "t"
    assert [sid for sid, _ in store.records()] == [SID]


def test_claim_is_exclusive_and_unclaim_restores(tmp_path: Path) -> None:
    store = PausedStore(tmp_path)
    _commit(store)
    claimed = store.claim(SID)
    with pytest.raises(NotFoundError):
        store.claim(SID)  # a second resume (this or another engine) finds nothing
    store.unclaim(claimed, SID)
    assert (tmp_path / SID / "ckpt" / "blob").read_bytes() == b"x" * 100
    store.release(store.claim(SID), SID)
    assert list(tmp_path.iterdir()) == []


def test_scan_repairs_a_dead_owners_work_and_leaves_a_live_ones(tmp_path: Path) -> None:
    store = PausedStore(tmp_path)
    _commit(store)
    # a resume that crashed: its claim goes back to paused, whole
    os.rename(tmp_path / SID, tmp_path / f".res-{SID}-{DEAD}-0000")
    # a pause and a delete that crashed: removed
    (tmp_path / f".tmp-sbx-1111222233334444-{DEAD}-0000" / "ckpt").mkdir(parents=True)
    (tmp_path / f".del-sbx-5555666677778888-{DEAD}-0000").mkdir()
    # a committed-looking directory without a record: removed
    (tmp_path / "sbx-9999aaaabbbbcccc" / "ckpt").mkdir(parents=True)
    # this (live) process's pause in progress: left alone
    live = store.begin("sbx-aaaabbbbccccdddd")
    removed = store.scan()
    assert len(removed) == 4
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([SID, live.tmp.name])
    assert (tmp_path / SID / "ckpt" / "blob").is_file()


def test_agent_takes_a_new_gateways_ca_on_a_second_net_setup(tmp_path: Path) -> None:
    """An agent restored with its memory keeps its proxy port; the new gateway's NET_SETUP
    must still replace the CA bundle (else HTTPS through the new gateway fails)."""
    import socket

    from moat.agent.netproxy import NetProxy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = NetProxy(channel=None)  # type: ignore[arg-type]
    ca = tmp_path / ".moat" / "ca-bundle.pem"
    proxy.setup(port, str(ca), b"OLD-CA\n")
    listener = proxy.listener
    assert ca.read_bytes().endswith(b"OLD-CA\n")
    proxy.setup(port, str(ca), b"NEW-CA\n")
    assert proxy.listener is listener  # the same port, not bound twice
    assert ca.read_bytes().endswith(b"NEW-CA\n")
    assert listener is not None
    listener.close()


def test_a_shared_stores_scan_leaves_another_hosts_work_alone(tmp_path: Path) -> None:
    """A cluster's store is shared by machines: a pid of another host means nothing here, so
    its work is left alone; an earlier boot of this host is dead; a lost node's work is
    repaired by name (``scan(abandoned)``)."""
    from moat.store.paused import host_token, owner_of

    store = PausedStore(tmp_path)
    mine = host_token()
    other_host = "ffffffff" + mine[8:] if not mine.startswith("ffffffff") else "0" * 16
    old_boot = mine[:8] + ("0" * 8 if mine[8:] != "0" * 8 else "1" * 8)
    assert owner_of(store.begin(SID).tmp.name) == (os.getpid(), mine)  # names its host
    elsewhere = tmp_path / f".tmp-sbx-1111222233334444-{DEAD}.{other_host}-0000"
    rebooted = tmp_path / f".tmp-sbx-5555666677778888-1.1.{old_boot}-0000"
    elsewhere.mkdir()
    rebooted.mkdir()
    store.scan()
    assert elsewhere.is_dir()  # another host's pause in progress: untouched
    assert not rebooted.exists()  # this host before its reboot: a crash's leftover
    # the server repairs a lost node's work by its owner's name only
    _commit(store, "sbx-9999aaaabbbbcccc")
    claimed = tmp_path / f".res-sbx-9999aaaabbbbcccc-{DEAD}.{other_host}-0001"
    os.rename(tmp_path / "sbx-9999aaaabbbbcccc", claimed)
    lost = (999999999, other_host)
    store.scan(lambda name: owner_of(name) == lost)
    assert (tmp_path / "sbx-9999aaaabbbbcccc" / "ckpt" / "blob").is_file()  # paused again
    assert not elsewhere.exists()  # that node's unfinished pause: removed
