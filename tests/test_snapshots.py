"""Snapshots and fork on the container tier (issue 11), through the engine's front door.

Real bubblewrap sandboxes. Outcomes are checked from outside: the snapshot store's
directories on the host, files read back through the restored sandboxes, the source's
answers while and after it is snapshotted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from tests.conftest import require_tier
from tests.test_pause import _close

from moat.egress import Secret
from moat.engine.api import FrontDoor
from moat.engine.engine import Engine
from moat.engine.persist import Persistence
from moat.engine.snapshots import Snapshots
from moat.engine.tenants import parse_tenants
from moat.errors import InvalidArgumentError, NotFoundError, PolicyError, QuotaExceededError
from moat.model import SandboxInfo
from moat.store.paused import PausedStore
from moat.store.snapshots import SnapshotStore

pytestmark = [pytest.mark.asyncio, pytest.mark.container]

T = "tenant-a"


def _door(root: Path, tenants: str | None = None) -> FrontDoor:
    engine = Engine(pool={})
    engine.persist = Persistence(engine, PausedStore(root / "paused"))
    engine.snapshots = Snapshots(engine, SnapshotStore(root / "snapshots"))
    policy = parse_tenants(tenants) if tenants else None
    return FrontDoor(engine, policy)


@pytest_asyncio.fixture
async def door(tmp_path: Path) -> AsyncIterator[FrontDoor]:
    require_tier("container")
    d = _door(tmp_path)
    yield d
    await _close(d)


async def _create(door: FrontDoor, tenant: str = T, **kw: object) -> str:
    cfg = door.resolve(isolation="container", **kw)
    return (await door.create(tenant, cfg)).sandbox_id


async def _sh(door: FrontDoor, sid: str, cmd: str, tenant: str = T) -> str:
    out = []
    async for e in (await door.start_command(tenant, sid, cmd)).events():
        text = getattr(e, "text", None)
        if text is not None and getattr(e, "stream", None) == "stdout":
            out.append(text)
    return "".join(out)


def _dirs(root: Path) -> list[str]:
    return (
        sorted(p.name for p in (root / "snapshots").iterdir())
        if (root / "snapshots").exists()
        else []
    )


async def test_snapshot_keeps_files_source_runs_and_restore_is_a_new_sandbox(
    door: FrontDoor, tmp_path: Path
) -> None:
    sid = await _create(door)
    await _sh(door, sid, "echo before > /home/user/a.txt")
    snap = await door.create_snapshot(T, sid, name="first")
    assert snap.snapshot_id.startswith("snap-") and snap.sandbox_id == sid and snap.size > 0
    assert snap.memory is False  # the container tier keeps files only
    # the source keeps running and serving, and its later writes are its own
    assert await door.is_running(T, sid)
    await _sh(door, sid, "echo after > /home/user/b.txt; echo again >> /home/user/a.txt")
    assert _dirs(tmp_path) == [snap.snapshot_id]  # on disk, complete (no temp dir left)
    info = await door.create_from_snapshot(T, snap.snapshot_id)
    new = info.sandbox_id
    assert new != sid and info.state == "running"
    assert await _sh(door, new, "cat /home/user/a.txt") == "before\n"
    assert await _sh(door, new, "test -e /home/user/b.txt && echo yes || echo no") == "no\n"
    assert await _sh(door, sid, "cat /home/user/a.txt") == "before\nagain\n"
    # listing and filters
    rows = await door.list_snapshots(T)
    assert [r.snapshot_id for r in rows] == [snap.snapshot_id]
    assert [r.snapshot_id for r in await door.list_snapshots(T, sandbox_id=sid)] == [
        snap.snapshot_id
    ]
    assert await door.list_snapshots(T, sandbox_id=new) == []
    assert [r.name for r in await door.list_snapshots(T, name="first")] == ["first"]
    # deleted: its directory is gone (checked on the host), a start from it is unknown
    assert await door.delete_snapshot(T, snap.snapshot_id)
    assert _dirs(tmp_path) == []
    assert not await door.delete_snapshot(T, snap.snapshot_id)
    with pytest.raises(NotFoundError):
        await door.create_from_snapshot(T, snap.snapshot_id)
    assert await door.is_running(T, sid) and await door.is_running(T, new)


async def test_another_tenants_snapshot_answers_like_an_unknown_one(
    door: FrontDoor, tmp_path: Path
) -> None:
    sid = await _create(door)
    snap = await door.create_snapshot(T, sid)
    unknown = "snap-" + "0" * 16
    for probe in (snap.snapshot_id, unknown):
        with pytest.raises(NotFoundError) as exc:
            await door.create_from_snapshot("tenant-b", probe)
        assert str(exc.value) == f"snapshot {probe} was not found"
        assert not await door.delete_snapshot("tenant-b", probe)
    assert await door.list_snapshots("tenant-b") == []
    with pytest.raises(NotFoundError):  # nor can another tenant snapshot or fork it
        await door.create_snapshot("tenant-b", sid)
    with pytest.raises(NotFoundError):
        await door.fork("tenant-b", sid, 1)
    assert _dirs(tmp_path) == [snap.snapshot_id]  # untouched
    with pytest.raises(InvalidArgumentError):
        await door.create_snapshot(T, sid, name="../etc")


async def test_fork_of_three_gives_distinct_sandboxes_with_their_own_state(
    door: FrontDoor, tmp_path: Path
) -> None:
    sid = await _create(door)
    await _sh(door, sid, "echo shared > /home/user/s.txt")
    got = await door.fork(T, sid, 3)
    assert len(got) == 3 and all(isinstance(g, SandboxInfo) for g in got)
    ids = [g.sandbox_id for g in got if isinstance(g, SandboxInfo)]
    assert len(set(ids) | {sid}) == 4
    probe = "python3 -c 'import os,uuid; print(os.urandom(16).hex(), uuid.uuid4())'"
    seen = set()
    for f in ids:
        assert await _sh(door, f, "cat /home/user/s.txt") == "shared\n"
        seen.add(await _sh(door, f, probe))
    assert len(seen) == 3
    assert _dirs(tmp_path) == []  # the fork's temporary snapshot is gone
    assert await door.list_snapshots(T) == []
    assert await door.is_running(T, sid)
    with pytest.raises(InvalidArgumentError):
        await door.fork(T, sid, 21)


async def test_quota_refusal_leaves_the_source_running_and_nothing_on_disk(tmp_path: Path) -> None:
    require_tier("container")
    door = _door(tmp_path, "[tenants.tenant-a.quotas]\nsnapshot_mb = 1\n")
    try:
        sid = await _create(door)
        await _sh(door, sid, "head -c 3000000 /dev/urandom > /home/user/big.bin")
        with pytest.raises(QuotaExceededError):
            await door.create_snapshot(T, sid)
        assert _dirs(tmp_path) == []
        assert await door.is_running(T, sid)
        assert await _sh(door, sid, "echo ok") == "ok\n"
        with pytest.raises(QuotaExceededError):  # a fork's snapshot counts too
            await door.fork(T, sid, 2)
        assert _dirs(tmp_path) == []
        assert await door.is_running(T, sid)
    finally:
        await _close(door)


async def test_snapshots_survive_an_engine_restart(tmp_path: Path) -> None:
    require_tier("container")
    first = _door(tmp_path)
    try:
        sid = await _create(first)
        await _sh(first, sid, "echo kept > /home/user/k.txt")
        snap = await first.create_snapshot(T, sid, name="keep")
    finally:
        await _close(first)
    second = _door(tmp_path)  # a new engine on the same state: loaded from disk
    try:
        rows = await second.list_snapshots(T)
        assert [(r.snapshot_id, r.name) for r in rows] == [(snap.snapshot_id, "keep")]
        info = await second.create_from_snapshot(T, snap.snapshot_id)
        assert await _sh(second, info.sandbox_id, "cat /home/user/k.txt") == "kept\n"
    finally:
        await _close(second)


async def test_embedded_sdk_snapshot_create_from_fork_list_delete(
    door: FrontDoor, tmp_path: Path
) -> None:
    from moat.sdk.async_ import AsyncSandbox
    from moat.sdk.transport.local import LocalTransport

    t = LocalTransport(door, T)
    sbx = await AsyncSandbox.create(isolation="container", transport=t)
    await sbx.files.write("/home/user/a.txt", "one")
    info = await sbx.create_snapshot(name="sdk")
    assert info.name == "sdk" and info.sandbox_id == sbx.sandbox_id
    new = await AsyncSandbox.create(template=info.snapshot_id, timeout=60, transport=t)
    assert new.sandbox_id != sbx.sandbox_id
    assert await new.files.read("/home/user/a.txt") == "one"
    with pytest.raises(InvalidArgumentError, match="keeps the snapshot's settings"):
        await AsyncSandbox.create(
            template=info.snapshot_id, isolation="gvisor", envs={"A": "1"}, transport=t
        )
    forks = await sbx.fork(2)
    assert len(forks) == 2 and all(isinstance(f, AsyncSandbox) for f in forks)
    for f in forks:
        assert isinstance(f, AsyncSandbox)
        assert await f.files.read("/home/user/a.txt") == "one"
    listed = await AsyncSandbox.list_snapshots(transport=t)
    assert [s.snapshot_id for s in listed] == [info.snapshot_id]
    assert await AsyncSandbox.delete_snapshot(info.snapshot_id, transport=t)
    assert not await AsyncSandbox.delete_snapshot(info.snapshot_id, transport=t)
    assert _dirs(tmp_path) == []


async def test_source_serves_during_the_snapshot_and_its_processes_live_on(
    door: FrontDoor,
) -> None:
    sid = await _create(door)
    bg = await door.start_command(T, sid, "sleep 120")
    await _sh(door, sid, "head -c 4000000 /dev/urandom > /home/user/big.bin")
    snap, echoed = await asyncio.gather(  # a call to the source while it is snapshotted
        door.create_snapshot(T, sid), _sh(door, sid, "echo during")
    )
    assert echoed == "during\n"
    assert snap.size > 4_000_000
    procs = await door.list_commands(T, sid)
    assert bg.pid in [p.pid for p in procs]  # its background process was never stopped
    assert await _sh(door, sid, "echo after") == "after\n"


async def test_secrets_by_reference_and_needed_again_after_a_restart(tmp_path: Path) -> None:
    require_tier("container")
    first = _door(tmp_path)
    cfg = first.resolve(
        isolation="container",
        network={"allow_out": ["example.com"]},
        secrets={"API_KEY": Secret("s3cr3t-value-xyz", ["example.com"])},
    )
    try:
        sid = (await first.create(T, cfg, secrets={"API_KEY": "s3cr3t-value-xyz"})).sandbox_id
        snap = await first.create_snapshot(T, sid)
        # this process holds the values: a start needs nothing more
        held = await first.create_from_snapshot(T, snap.snapshot_id)
        assert held.sandbox_id != sid
    finally:
        await _close(first)
    for path in (tmp_path / "snapshots").rglob("*"):
        if path.is_file():  # invariant 3: the value is nowhere on disk (checked from outside)
            assert b"s3cr3t-value-xyz" not in path.read_bytes(), path
    record = json.loads((tmp_path / "snapshots" / snap.snapshot_id / "record.json").read_text())
    assert record["secret_names"] == ["API_KEY"]
    second = _door(tmp_path)
    try:
        with pytest.raises(PolicyError, match="API_KEY"):
            await second.create_from_snapshot(T, snap.snapshot_id)
        info = await second.create_from_snapshot(
            T, snap.snapshot_id, secrets={"API_KEY": "s3cr3t-value-xyz"}
        )
        env = await _sh(second, info.sandbox_id, "printenv API_KEY")
        assert env.strip() and "s3cr3t-value-xyz" not in env  # a placeholder only
    finally:
        await _close(second)


async def test_a_forks_snapshot_left_by_a_crash_is_removed_at_load(tmp_path: Path) -> None:
    require_tier("container")
    first = _door(tmp_path)
    try:
        sid = await _create(first)
        kept = await first.create_snapshot(T, sid)
        temp = await first._take(T, first._session(T, sid), None, None, temporary=True)
    finally:
        await _close(first)  # "crashed" before the fork deleted its snapshot
    assert _dirs(tmp_path) == sorted([kept.snapshot_id, temp.snapshot_id])
    second = _door(tmp_path)
    try:
        rows = await second.list_snapshots(T)
        assert [r.snapshot_id for r in rows] == [kept.snapshot_id]
        assert _dirs(tmp_path) == [kept.snapshot_id]  # removed, checked on the host
        assert temp.snapshot_id in second.engine.snapshots.scan_report
    finally:
        await _close(second)


async def test_a_reseed_while_kernels_start_never_kills_them(door: FrontDoor) -> None:
    """A restored or forked sandbox is reseeded as soon as its agent answers, while its
    kernels may still be starting: SIGUSR2 then must wait for the kernel's handler, not
    kill it (its default action). Seen before the fix: a fork's first run_code answered
    ContextDied about once in twelve forks."""
    from moat.engine.persist import reseed

    sid = await _create(door)
    session = door.engine.get(sid)
    assert session is not None
    for _ in range(4):
        ctx = await door.create_context(T, sid)  # a kernel spawning now
        for _ in range(30):  # reseeds all through its start
            await reseed(session)
        out = []
        async for e in door.run_code(T, sid, "print('alive')", context=ctx.id):
            out.append(e)
        assert any(getattr(e, "text", None) == "alive\n" for e in out), out


async def test_a_snapshot_of_a_templated_sandbox_starts_on_its_template(door: FrontDoor) -> None:
    """A start from a snapshot builds the spec as create did: the template's root, not the
    host's /usr (the marker exists only in the template)."""
    import secrets

    from tests import template_support

    content = "marker-" + secrets.token_hex(6)
    found = template_support.install(
        "tt-snap", files={"/usr/share/moat-test/snap-marker.txt": content}
    )
    sid = await _create(door, template=found.name)
    probe = "cat /usr/share/moat-test/snap-marker.txt"
    assert await _sh(door, sid, probe) == content  # positive control: the template's root
    snap = await door.create_snapshot(T, sid)
    info = await door.create_from_snapshot(T, snap.snapshot_id)
    assert info.template == found.name
    assert await _sh(door, info.sandbox_id, probe) == content
    forks = await door.fork(T, sid, 1)
    fork = forks[0]
    assert isinstance(fork, SandboxInfo)
    assert await _sh(door, fork.sandbox_id, probe) == content
