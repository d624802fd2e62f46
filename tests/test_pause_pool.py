"""A files-only resume into a warm-pool sandbox (issue 11: container resume <= 100 ms).

Real bubblewrap sandboxes through the engine's front door, with a warm pool. Identity is
checked from outside (the engine's registry, listings, metrics, the audit trail, the
gateway the host holds) and from inside (the CA bundle, the environment, the files): the
resumed sandbox is the paused one in every respect, and the warm sandbox's own id is gone.
Non-poolable paused sandboxes (other limits, secrets) take the old path, and the pool
refills either way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import secrets
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509
from tests.conftest import require_tier
from tests.test_pause import _close

from moat import Limits
from moat.egress import Secret
from moat.engine.api import FrontDoor
from moat.engine.engine import Engine
from moat.engine.persist import Persistence
from moat.engine.session import Session
from moat.errors import NotFoundError, SandboxError
from moat.runtime.container.checkpoint import ARCHIVE, LEGACY_ARCHIVE
from moat.store.paused import PausedStore

pytestmark = [pytest.mark.asyncio, pytest.mark.container]

T = "tenant-a"
TIER = "container"


@pytest_asyncio.fixture
async def door(tmp_path: Path) -> AsyncIterator[FrontDoor]:
    require_tier(TIER)
    engine = Engine(pool={TIER: 1})
    engine.persist = Persistence(engine, PausedStore(tmp_path / "paused"))
    d = FrontDoor(engine)
    yield d
    await engine.pool.close()
    await _close(d)


async def _warm(door: FrontDoor, not_ids: tuple[str, ...] = ()) -> Session:
    """The pool's warm sandbox once there is one (other than ``not_ids``)."""
    pool = door.engine.pool
    pool.refill(TIER)
    for _ in range(400):
        ready = [s for s in pool.ready(TIER) if s.id not in not_ids]
        if ready:
            return ready[0]  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)
    raise AssertionError("the warm pool did not fill")


async def _create(door: FrontDoor, **kw: Any) -> str:
    values = kw.pop("secret_values", None)
    cfg = door.resolve(isolation=TIER, **kw)
    return (await door.create(T, cfg, secrets=values)).sandbox_id


async def _run(door: FrontDoor, sid: str, code: str) -> str:
    out = []
    async for e in door.run_code(T, sid, code):
        text = getattr(e, "text", None)
        if text is not None:
            out.append(text)
    return "".join(out)


def _ids(rows: list[dict[str, Any]]) -> set[str]:
    return {str(r.get("sandbox_id")) for r in rows}


async def test_resume_takes_a_warm_sandbox_and_is_the_paused_one(door: FrontDoor) -> None:
    engine = door.engine
    sid = await _create(door, network={"allow_out": ["pypi.org"]}, metadata={"who": "me"})
    await door.update_network(T, sid, {"allow_out": ["example.com", "pypi.org"]})
    await door.write_file(T, sid, "/home/user/keep/a.txt", "kept")
    await _run(door, sid, "import os; os.symlink('/etc/hostname', '/tmp/link')")
    started = (await door.info(T, sid)).started_at
    await door.pause(T, sid)
    warm = await _warm(door)
    warm_id, warm_gateway = warm.id, warm.gateway
    assert warm.tenant is None  # nobody's while it waits (invariant 11)

    info, resumed = await door.connect(T, sid, timeout=90)
    assert resumed and info.sandbox_id == sid and info.state == "running"
    assert engine.get(sid) is warm  # the warm sandbox, now the paused one (positive control)
    assert warm.id == sid and warm.spec.sandbox_id == sid and warm.tenant == T

    # what the paused sandbox had: files, egress policy, metadata, start, a new lifetime
    assert await door.read_file(T, sid, "/home/user/keep/a.txt") == "kept"
    assert await _run(door, sid, "import os; print(os.readlink('/tmp/link'))") == "/etc/hostname\n"
    gateway = warm.gateway
    assert gateway is not None and gateway is not warm_gateway and gateway.sandbox_id == sid
    want = {"allow_out": ["example.com", "pypi.org"], "deny_out": [], "internet_access": False}
    policy = gateway.policy.to_dict()
    assert {k: policy[k] for k in want} == want
    assert info.metadata == {"who": "me"} and info.started_at == started
    left = (info.end_at - dt.datetime.now(dt.UTC)).total_seconds()
    assert 80 < left <= 90
    # the sandbox trusts its own gateway's CA, not the warm sandbox's
    bundle = await door.read_file(T, sid, "/tmp/.moat/ca-bundle.pem")
    assert isinstance(bundle, str) and bundle.endswith(gateway.ca_cert_pem().decode())
    assert warm_gateway is not None and warm_gateway.ca_cert_pem().decode() not in bundle
    last = "-----BEGIN CERTIFICATE-----" + bundle.rsplit("-----BEGIN CERTIFICATE-----", 1)[1]
    subject = x509.load_pem_x509_certificate(last.encode()).subject.rfc4514_string()
    assert sid in subject and warm_id not in subject

    # the warm sandbox's id survives nowhere: registry, listings, metrics, audit, inside
    hexid = warm_id.removeprefix("sbx-")
    assert engine.get(warm_id) is None and warm_id not in engine.sessions
    assert warm_id not in engine._loop_of
    assert warm_id not in engine.audit._scrubbers  # the warm guard's hook on the trail
    listed = [i.sandbox_id for i in await door.list_sandboxes(T, state=None)]
    assert listed == [sid]
    with pytest.raises(NotFoundError):
        await door.metrics(T, warm_id)
    assert await door.metrics(T, sid) is not None
    inside = await _run(
        door,
        sid,
        "import os, subprocess\n"
        f"hits = [k for k, v in os.environ.items() if {hexid!r} in v]\n"
        f"out = subprocess.run(['grep', '-rl', {hexid!r}, '/tmp', '/home/user', '/etc',"
        " '/proc/self/cgroup', '/proc/self/environ'], capture_output=True, text=True).stdout\n"
        "print(hits, repr(out), open('/etc/hostname').read().strip())",
    )
    assert inside == "[] '' sandbox\n"
    rows = await asyncio.to_thread(engine.audit.query, limit=100_000)
    assert hexid not in repr(rows)  # no row names it, in any column
    mine = [r for r in reversed(rows) if r.get("sandbox_id") == sid]
    life = [r["result"] for r in mine if r["kind"] == "sandbox"]
    assert life[-2:] == ["created", "resumed"]
    assert {r.get("tenant") for r in mine[-2:]} == {T}

    # another tenant still sees nothing of it
    with pytest.raises(NotFoundError):
        await door.info("tenant-b", sid)
    assert await door.list_sandboxes("tenant-b", state=None) == []

    # the pool refills with a sandbox of its own
    fresh = await _warm(door, not_ids=(sid, warm_id))
    assert fresh.tenant is None and fresh.id not in (sid, warm_id)

    # and the resumed sandbox pauses and resumes again (into the next warm one)
    await door.write_file(T, sid, "/home/user/keep/a.txt", "twice")
    await door.pause(T, sid)
    await door.connect(T, sid)
    assert engine.get(sid) is fresh
    assert await door.read_file(T, sid, "/home/user/keep/a.txt") == "twice"


@pytest.mark.parametrize("shape", ["limits", "secrets"])
async def test_non_poolable_paused_sandbox_resumes_the_old_way(door: FrontDoor, shape: str) -> None:
    value = "pool-secret-" + secrets.token_hex(8)
    if shape == "limits":
        sid = await _create(door, limits=Limits(memory_mb=256))
    else:
        sid = await _create(
            door,
            network={"allow_out": ["example.com"]},
            secrets={"API_KEY": Secret(value, ["example.com"])},
            secret_values={"API_KEY": value},
        )
    await door.write_file(T, sid, "/home/user/f", shape)
    await door.pause(T, sid)
    warm = await _warm(door)
    hits = door.engine.pool.hits

    info, resumed = await door.connect(T, sid)
    assert resumed and info.sandbox_id == sid
    session = door.engine.get(sid)
    assert session is not None and session is not warm  # a sandbox of its own shape
    assert warm in door.engine.pool.ready(TIER) and warm.tenant is None and warm.id != sid
    assert door.engine.pool.hits == hits
    assert await door.read_file(T, sid, "/home/user/f") == shape
    if shape == "limits":
        assert info.limits.memory_mb == 256 and session.spec.limits.memory_mb == 256
    else:
        env = await _run(door, sid, "import os; print(os.environ['API_KEY'])")
        assert env.strip() and value not in env  # the placeholder, never the value


async def test_failed_replay_into_a_warm_sandbox_keeps_the_paused_state(
    door: FrontDoor,
) -> None:
    """An archive that won't extract: the warm sandbox is killed (it may hold half of it),
    the paused state stays whole, the id is not running, and the pool refills."""
    engine = door.engine
    sid = await _create(door)
    await door.write_file(T, sid, "/home/user/f", "x")
    await door.pause(T, sid)
    archive = engine.persist.store.root / sid / "ckpt" / ARCHIVE
    good = archive.read_bytes()
    archive.write_bytes(b"\x1f\x8b" + b"not a gzip stream" * 100)
    warm = await _warm(door)
    with pytest.raises(SandboxError):
        await door.connect(T, sid)
    assert not warm.is_running() and engine.get(sid) is None
    assert warm.id not in engine.sessions
    assert (engine.persist.store.root / sid / "record.json").is_file()
    assert [i.state for i in await door.list_sandboxes(T, state=None)] == ["paused"]
    await _warm(door, not_ids=(warm.id, sid))  # refilled
    archive.write_bytes(b"PK\x03\x04 a format moat never wrote")  # no decompressor guessed
    with pytest.raises(SandboxError, match="format"):
        await door.connect(T, sid)
    assert (engine.persist.store.root / sid / "record.json").is_file()
    archive.write_bytes(good)
    await door.connect(T, sid)
    assert await door.read_file(T, sid, "/home/user/f") == "x"


async def test_zstd_archive_and_a_legacy_gzip_one_both_resume(door: FrontDoor) -> None:
    """Pauses write zstd where the sandbox has it; a checkpoint of before (``fs.tar.gz``,
    gzip) still resumes."""
    sid = await _create(door)
    await door.write_file(T, sid, "/home/user/f", "legacy")
    await door.pause(T, sid)
    ckpt = door.engine.persist.store.root / sid / "ckpt"
    data = (ckpt / ARCHIVE).read_bytes()
    assert data[:4] == b"\x28\xb5\x2f\xfd"  # zstd's magic: this host's root has zstd
    tar = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    (ckpt / LEGACY_ARCHIVE).write_bytes(gzip.compress(tar))
    (ckpt / ARCHIVE).unlink()
    await door.connect(T, sid)
    assert await door.read_file(T, sid, "/home/user/f") == "legacy"


async def test_resumed_sandbox_audit_rows_are_scrubbed_by_its_guard(door: FrontDoor) -> None:
    """A sensitive value the sandbox sends out as a host name is redacted in the audit
    trail after a resume too (the pause's "ended" row had dropped its guard's hook)."""
    value = "tok" + secrets.token_hex(10)
    cfg = door.resolve(isolation=TIER)
    sid = (await door.create(T, cfg, sensitive={value: "token"})).sandbox_id
    await door.pause(T, sid)
    await _warm(door)
    await door.connect(T, sid)
    code = (
        "import urllib.request\n"
        "try:\n"
        f"    urllib.request.urlopen('http://' + {value[:6]!r} + {value[6:]!r} + '.example.com',"
        " timeout=10)\n"
        "except Exception as e:\n"
        "    print('refused')\n"
    )
    assert "refused" in await _run(door, sid, code)
    rows = await asyncio.to_thread(door.engine.audit.query, sandbox_id=sid, kind="egress")
    assert rows, "the refused request was audited"
    assert value not in repr(rows)


async def test_snapshot_starts_and_forks_take_warm_sandboxes(door: FrontDoor) -> None:
    """A start from a container snapshot of the pool's shape takes a warm sandbox as a resume
    does: a new id (not the warm one's), the snapshot's files and egress policy; a fork of 3
    with one warm sandbox gets one warm and two cold, all alike."""
    engine = door.engine
    sid = await _create(door, network={"allow_out": ["example.com"]}, metadata={"m": "1"})
    await door.write_file(T, sid, "/home/user/snap.txt", "from the snapshot")
    snap = await door.create_snapshot(T, sid)
    warm = await _warm(door)
    warm_id = warm.id
    info = await door.create_from_snapshot(T, snap.snapshot_id)
    new = info.sandbox_id
    assert engine.get(new) is warm and new not in (sid, warm_id) and warm.tenant == T
    assert await door.read_file(T, new, "/home/user/snap.txt") == "from the snapshot"
    assert info.metadata == {"m": "1"}
    gateway = warm.gateway
    assert gateway is not None and gateway.sandbox_id == new
    assert gateway.policy.to_dict()["allow_out"] == ["example.com"]
    assert engine.get(warm_id) is None and warm_id not in engine.audit._scrubbers
    listed = {i.sandbox_id for i in await door.list_sandboxes(T, state=None)}
    assert listed == {sid, new}

    second = await _warm(door, not_ids=(new, warm_id))  # refilled
    second_id = second.id
    forks = await door.fork(T, sid, 3)
    ids = [f.sandbox_id for f in forks if not isinstance(f, SandboxError)]
    assert len(ids) == 3 and second_id not in ids and engine.get(second_id) is None
    assert sum(engine.get(i) is second for i in ids) == 1  # the warm one served one fork
    for i in ids:
        assert await door.read_file(T, i, "/home/user/snap.txt") == "from the snapshot"
    every = {i.sandbox_id for i in await door.list_sandboxes(T, state=None)}
    assert every == {sid, new, *ids}
