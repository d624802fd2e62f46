"""Pause and resume on the container tier (issue 11), through the engine's front door.

Real bubblewrap sandboxes. Every outcome is checked from outside: the paused store's
directory on the host, the gateway's policy as the host holds it, files read back through
a new sandbox. The crash test SIGKILLs a real engine process in the middle of pauses.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from tests.conftest import require_tier

from moat.egress import Secret
from moat.engine.api import FrontDoor
from moat.engine.engine import Engine
from moat.engine.persist import Persistence, reseed
from moat.engine.tenants import parse_tenants
from moat.engine.tiers import runtime_for
from moat.errors import (
    DiskFullError,
    NotFoundError,
    PolicyError,
    QuotaExceededError,
    SandboxError,
)
from moat.store.paused import PausedStore

pytestmark = [pytest.mark.asyncio, pytest.mark.container]

T = "tenant-a"


def _door(root: Path, tenants: str | None = None) -> FrontDoor:
    engine = Engine(pool={})
    engine.persist = Persistence(engine, PausedStore(root))
    policy = parse_tenants(tenants) if tenants else None
    return FrontDoor(engine, policy)


async def _close(door: FrontDoor) -> None:
    """End the engine's sandboxes and its loop watcher (several engines share this loop; at
    the loop's end each watcher would wait for the others)."""
    engine = door.engine
    for s in list(engine.sessions.values()):
        await s.kill()
    loop = asyncio.get_running_loop()
    engine._ending.add(id(loop))
    watcher = engine._watchers.pop(id(loop), None)
    if watcher is not None:
        watcher.cancel()


@pytest_asyncio.fixture
async def door(tmp_path: Path) -> AsyncIterator[FrontDoor]:
    require_tier("container")
    d = _door(tmp_path / "paused")
    yield d
    await _close(d)


async def _create(door: FrontDoor, tenant: str = T, **kw: object) -> str:
    cfg = door.resolve(isolation="container", **kw)
    return (await door.create(tenant, cfg)).sandbox_id


async def _run(door: FrontDoor, sid: str, code: str, tenant: str = T) -> str:
    out = []
    async for e in door.run_code(tenant, sid, code):
        text = getattr(e, "text", None)
        if text is not None:
            out.append(text)
    return "".join(out)


def _root(door: FrontDoor) -> Path:
    return door.engine.persist.store.root


async def test_files_and_egress_policy_kept_across_25_cycles(door: FrontDoor) -> None:
    sid = await _create(door, network={"allow_out": ["pypi.org"]})
    await door.update_network(T, sid, {"allow_out": ["example.com", "pypi.org"]})
    want = {"allow_out": ["example.com", "pypi.org"], "deny_out": [], "internet_access": False}
    await door.write_file(T, sid, "/home/user/keep/a.txt", "cycle-0")
    await _run(door, sid, "import os; os.symlink('/etc/hostname', '/tmp/link')")
    for i in range(25):
        info = await door.pause(T, sid)
        assert info.state == "paused"
        assert (await door.info(T, sid)).state == "paused"
        assert not await door.is_running(T, sid)
        assert (_root(door) / sid / "record.json").is_file()  # on disk, from outside
        assert door.engine.get(sid) is None  # nothing of it runs
        paused = [i.sandbox_id for i in await door.list_sandboxes(T, state="paused")]
        assert paused == [sid]
        assert await door.list_sandboxes(T, state="running") == []
        info, resumed = await door.connect(T, sid)
        assert resumed and info.state == "running" and info.sandbox_id == sid
        assert not (_root(door) / sid).exists()  # deleted once it serves again
        assert await door.read_file(T, sid, "/home/user/keep/a.txt") == f"cycle-{i}"
        policy = door.engine.get(sid).gateway.policy.to_dict()  # type: ignore[union-attr]
        assert {k: policy[k] for k in want} == want
        await door.write_file(T, sid, "/home/user/keep/a.txt", f"cycle-{i + 1}")
    # a symlink made inside came back as a symlink (tar ran inside; the host never followed it)
    assert await _run(door, sid, "import os; print(os.readlink('/tmp/link'))") == "/etc/hostname\n"
    _, resumed = await door.connect(T, sid)
    assert not resumed  # a running sandbox: connect just answers


async def test_memory_pause_on_container_is_refused_and_sandbox_keeps_running(
    door: FrontDoor,
) -> None:
    sid = await _create(door)
    await _run(door, sid, "x = 41")
    with pytest.raises(PolicyError, match="memory=False"):
        await door.pause(T, sid, memory=True)
    assert await _run(door, sid, "print(x + 1)") == "42\n"  # same process, untouched
    assert list(_root(door).iterdir()) == []


async def test_kill_of_paused_deletes_its_state(door: FrontDoor) -> None:
    sid = await _create(door)
    await door.write_file(T, sid, "/home/user/f", "x" * 1000)
    await door.pause(T, sid)
    assert (_root(door) / sid / "ckpt").is_dir()
    assert await door.kill(T, sid)
    assert list(_root(door).iterdir()) == []  # from outside: nothing left
    with pytest.raises(NotFoundError):
        await door.connect(T, sid)
    assert not await door.kill(T, sid)


async def test_another_tenant_sees_a_paused_sandbox_as_unknown(door: FrontDoor) -> None:
    sid = await _create(door)
    await door.pause(T, sid)
    unknown = "sbx-" + secrets.token_hex(8)
    for target in (sid, unknown):
        for call in (
            door.connect("tenant-b", target),
            door.pause("tenant-b", target),
            door.info("tenant-b", target),
        ):
            with pytest.raises(NotFoundError) as exc:
                await call
            assert str(exc.value) == f"sandbox {target} was not found"
    assert not await door.kill("tenant-b", sid)
    assert await door.list_sandboxes("tenant-b", state=None) == []
    assert (_root(door) / sid).is_dir()  # untouched by the other tenant
    assert await door.face_data("tenant-b", sid) is None


async def test_pause_twice_is_refused(door: FrontDoor) -> None:
    sid = await _create(door)
    await door.pause(T, sid)
    with pytest.raises(Exception, match="already paused"):
        await door.pause(T, sid)


async def test_snapshot_quota_refuses_and_sandbox_keeps_running(tmp_path: Path) -> None:
    require_tier("container")
    door = _door(
        tmp_path / "paused",
        f"version = 1\n[tenants.{T}]\nquotas = {{ snapshot_mb = 1 }}\n",
    )
    try:
        sid = await _create(door)
        # 3 MiB of random bytes: no compression shrinks them under the 1 MiB quota
        await _run(door, sid, "import os; open('/home/user/big','wb').write(os.urandom(3<<20))")
        with pytest.raises(QuotaExceededError, match="quota"):
            await door.pause(T, sid)
        assert await door.is_running(T, sid)
        assert list((tmp_path / "paused").iterdir()) == []  # nothing half-written
        await _run(door, sid, "import os; os.remove('/home/user/big')")
        assert (await door.pause(T, sid)).state == "paused"  # under quota now
    finally:
        await _close(door)


async def test_disk_full_during_pause_keeps_the_sandbox_running(tmp_path: Path) -> None:
    require_tier("container")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], check=True)
    try:
        door = _door(mnt / "paused")
        try:
            sid = await _create(door)
            await door.write_file(T, sid, "/tmp/keep", "still here")
            await _run(door, sid, "import os; open('/home/user/big','wb').write(os.urandom(2<<20))")
            with pytest.raises(DiskFullError, match="keeps running"):
                await door.pause(T, sid)
            assert await door.is_running(T, sid)
            assert await door.read_file(T, sid, "/tmp/keep") == "still here"
            assert list((mnt / "paused").iterdir()) == []
        finally:
            await _close(door)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_paused_sandbox_survives_an_engine_restart(tmp_path: Path) -> None:
    """A new engine (a restarted process) loads the records and resumes; a secret's value,
    never written down, must be given again (a PolicyError names it)."""
    require_tier("container")
    root = tmp_path / "paused"
    first = _door(root)
    cfg = first.resolve(
        isolation="container",
        network={"allow_out": ["example.com"]},
        secrets={"API_KEY": Secret("s3cr3t-value-xyz", ["example.com"])},
        metadata={"who": "me"},
    )
    sid = (await first.create(T, cfg, secrets={"API_KEY": "s3cr3t-value-xyz"})).sandbox_id
    await first.write_file(T, sid, "/home/user/notes", "before restart")
    placeholder = (await _run(first, sid, "import os; print(os.environ['API_KEY'])")).strip()
    ca = first.engine.get(sid).gateway.ca_cert_pem()  # type: ignore[union-attr]
    await first.pause(T, sid, face={"template_id": "base"})
    record = (root / sid / "record.json").read_text()
    assert "s3cr3t-value-xyz" not in record  # invariant 3: by reference only
    # the gateway's identity (placeholders, CA with its key) beside the checkpoint: host only
    kept = root / sid / "gateway.json"
    assert kept.stat().st_mode & 0o777 == 0o600 and "s3cr3t-value-xyz" not in kept.read_text()
    assert placeholder in kept.read_text()
    assert json.loads(record)["secret_names"] == ["API_KEY"]
    await _close(first)

    second = _door(root)
    try:
        listed = await second.list_sandboxes(T, state="paused")
        assert [(i.sandbox_id, i.metadata) for i in listed] == [(sid, {"who": "me"})]
        assert await second.face_data(T, sid) == {"template_id": "base"}
        with pytest.raises(PolicyError, match="API_KEY"):
            await second.connect(T, sid)
        assert (root / sid).is_dir()  # a refused resume leaves the paused state
        info, resumed = await second.connect(T, sid, secrets={"API_KEY": "s3cr3t-value-xyz"})
        assert resumed and info.metadata == {"who": "me"}
        assert await second.read_file(T, sid, "/home/user/notes") == "before restart"
        policy = second.engine.get(sid).gateway.policy.to_dict()  # type: ignore[union-attr]
        assert policy["allow_out"] == ["example.com"]
        # the placeholder is there, the value is not (invariant 3), and the guard knows it
        env = await _run(second, sid, "import os; print(os.environ['API_KEY'])", T)
        assert env.strip() and "s3cr3t-value-xyz" not in env
        # and it is the one it had (files or processes may hold it), with the CA it trusted
        gateway = second.engine.get(sid).gateway  # type: ignore[union-attr]
        assert gateway is not None
        assert env.strip() == placeholder == gateway.placeholders()["API_KEY"]
        assert gateway.ca_cert_pem() == ca
    finally:
        await _close(second)


async def test_reseed_reaches_every_kernel(door: FrontDoor) -> None:
    """The agent's RESEED op reseeds each context's ``random`` (positive control: without
    it, the seeded sequence repeats)."""
    sid = await _create(door)
    ctx = await door.create_context(T, sid)
    session = door.engine.get(sid)
    assert session is not None
    code = "import random; random.seed(7); a = random.random()"
    expect = await _run(door, sid, "import random; random.seed(7); print(random.random())")
    for c in ("default", ctx.id):
        await _drain(door.run_code(T, sid, code, context=c))
    await reseed(session)
    for c in ("default", ctx.id):
        out = await _collect(door.run_code(T, sid, "print(random.random())", context=c))
        assert out and out != expect
    # control: seeded again and not reseeded, the sequence repeats
    await _drain(door.run_code(T, sid, "random.seed(7)"))
    assert await _collect(door.run_code(T, sid, "print(random.random())")) == expect


async def _drain(events: AsyncIterator[object]) -> None:
    async for _ in events:
        pass


async def _collect(events: AsyncIterator[object]) -> str:
    return "".join([getattr(e, "text", "") or "" async for e in events])


_CRASH_CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from moat.engine.api import FrontDoor
    from moat.engine.engine import Engine
    from moat.engine.persist import Persistence
    from moat.store.paused import PausedStore

    async def main():
        if sys.argv[2] == "hold":  # stop between the checkpoint and its commit
            real = PausedStore.commit
            def held(self, pending, record):
                print("committing", flush=True)
                import time; time.sleep(30)
                real(self, pending, record)
            PausedStore.commit = held
        engine = Engine(pool={})
        engine.persist = Persistence(engine, PausedStore(Path(sys.argv[1])))
        door = FrontDoor(engine)
        sid = (await door.create("t", door.resolve(isolation="container"))).sandbox_id
        await door.write_file("t", sid, "/home/user/data", "x" * 200000)
        await door.write_file("t", sid, "/home/user/mark", sid)
        print(sid, flush=True)
        sys.stdin.readline()
        await door.pause("t", sid)
        print("paused", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_sigkill_during_pause_leaves_old_or_new_state(tmp_path: Path) -> None:
    """SIGKILL a real engine process at several moments of a pause; the next start reports
    and removes what is half-written, and every committed pause resumes whole."""
    require_tier("container")
    root = tmp_path / "paused"
    outcomes = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for delay in ("hold", 0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.4):
        child = subprocess.Popen(
            [sys.executable, "-c", _CRASH_CHILD, str(root), str(delay)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
        )  # fmt: skip
        assert child.stdout is not None and child.stdin is not None
        sid = child.stdout.readline().strip()
        assert sid.startswith("sbx-")
        child.stdin.write("go\n")
        child.stdin.flush()
        if delay == "hold":
            assert child.stdout.readline().strip() == "committing"
            assert [p.name[:5] for p in root.iterdir()] == [".tmp-"]  # mid-pause, on disk
        else:
            await asyncio.sleep(float(delay))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdin.close()
        child.stdout.close()
        door = _door(root)
        try:
            paused = await asyncio.to_thread(door.engine.persist.paused)
            removed = door.engine.persist.scan_report
            leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
            assert leftovers == []  # the scan removed anything half-written
            if delay == "hold":
                assert len(removed) == 1 and removed[0].startswith(".tmp-" + sid)
            if sid in paused:
                await door.connect("t", sid)
                assert await door.read_file("t", sid, "/home/user/mark") == sid
                assert len(await door.read_file("t", sid, "/home/user/data")) == 200000
                outcomes.append(f"new@{delay}")
            else:
                assert not (root / sid).exists()
                outcomes.append(f"old@{delay}" + ("+scan" if removed else ""))
        finally:
            await _close(door)
        await asyncio.to_thread(runtime_for("container").sweep)  # the crashed child's cgroup
    print("outcomes:", outcomes)
    assert any(o.startswith("new") for o in outcomes)  # late kills found a complete pause


async def _wait_state(door: FrontDoor, sid: str, want: str, within: float) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        states = {i.sandbox_id: i.state for i in await door.list_sandboxes(T, state=None)}
        if states.get(sid) == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{sid} not {want} within {within}s: {states.get(sid)}")


async def test_boot_id_is_the_sandboxs_own_and_new_after_a_filesystem_only_resume(
    door: FrontDoor,
) -> None:
    """The host's boot id identifies the host (invariant 1): each sandbox shows its own,
    stable while it runs; a filesystem-only resume is a new boot (E2B: "reboots")."""
    path = "/proc/sys/kernel/random/boot_id"
    host = Path(path).read_text().strip()
    sid, other = await _create(door), await _create(door)
    first = (await door.read_file(T, sid, path)).strip()
    assert first and first != host  # positive control: a boot id was read at all
    assert (await _run(door, sid, f"print(open('{path}').read().strip())")).strip() == first
    assert (await door.read_file(T, other, path)).strip() not in (first, host)
    await door.pause(T, sid, memory=False)
    await door.connect(T, sid)
    again = (await door.read_file(T, sid, path)).strip()
    assert again and again not in (first, host)


async def test_on_timeout_pause_then_connect_resumes(door: FrontDoor) -> None:
    sid = await _create(door, timeout=2, on_timeout="pause")
    await door.write_file(T, sid, "/home/user/f", "kept at timeout")
    await _wait_state(door, sid, "paused", 10)
    assert (_root(door) / sid / "record.json").is_file()
    info, resumed = await door.connect(T, sid, timeout=60)
    assert resumed and info.state == "running"
    assert await door.read_file(T, sid, "/home/user/f") == "kept at timeout"


async def test_idle_timeout_pauses_an_idle_sandbox_only(door: FrontDoor) -> None:
    busy = await _create(door, timeout=120, idle_timeout=2, on_timeout="pause")
    idle = await _create(door, timeout=120, idle_timeout=2, on_timeout="pause")
    # output every 0.3 s for 5 s keeps `busy` active; `idle` gets no call at all
    stream = await door.start_command(T, busy, "for i in $(seq 17); do echo $i; sleep 0.3; done")
    await _wait_state(door, idle, "paused", 8)
    assert await door.is_running(T, busy)
    await _drain(stream.events())
    await _wait_state(door, busy, "paused", 8)  # idle from the command's end


async def test_idle_timeout_kill(door: FrontDoor) -> None:
    sid = await _create(door, timeout=120, idle_timeout=1)
    await _wait_state(door, sid, "ended", 8)
    assert list(_root(door).iterdir()) == []  # a kill keeps nothing


async def test_resumed_sandbox_trusts_its_new_gateway_ca(door: FrontDoor) -> None:
    """moat's CA bundle in /tmp/.moat is the new gateway's after a resume (written again on
    resume, not taken from the archive); the new gateway took the old one's CA over
    (moat.egress.identity), so it is the same bundle the sandbox's processes trusted."""
    sid = await _create(door, network={"allow_out": ["example.com"]})
    path = "/tmp/.moat/ca-bundle.pem"
    before = await door.read_file(T, sid, path)
    await door.pause(T, sid)
    await door.connect(T, sid)
    gateway = door.engine.get(sid).gateway  # type: ignore[union-attr]
    assert gateway is not None
    after = await door.read_file(T, sid, path)
    assert isinstance(after, str)
    assert after.endswith(gateway.ca_cert_pem().decode()) and after == before


async def test_a_kill_does_not_wait_for_a_pause_in_progress(door: FrontDoor) -> None:
    """A kill ends the sandbox at once, even while its pause archives (a hostile sandbox
    could stretch that up to its timeout); the pause then fails, and nothing is kept."""
    sid = await _create(door, limits={"memory_mb": 1024, "disk_mb": 2048})
    # incompressible files: the archive step takes seconds
    await _run(door, sid, "import os\nfor i in range(6):\n"
               "    open(f'/home/user/r{i}', 'wb').write(os.urandom(40 << 20))")  # fmt: skip
    order: list[str] = []

    async def pause() -> None:
        try:
            await door.pause(T, sid)
            order.append("paused")
        except SandboxError:
            order.append("pause failed")

    task = asyncio.create_task(pause())
    await asyncio.sleep(0.5)  # the archive is under way (it holds the pause lock)
    assert not task.done()
    assert await door.kill(T, sid)
    order.append("killed")
    await task
    # The kill ended the sandbox mid-archive: the pause failed (waiting for the pause's
    # lock first, as before, let the pause complete and the kill then delete its state).
    assert sorted(order) == ["killed", "pause failed"], order
    assert not await door.is_running(T, sid)
    assert await door.list_sandboxes(T, state="paused") == []
    assert not _root(door).exists() or list(_root(door).iterdir()) == []  # nothing kept


async def test_concurrent_pauses_of_one_tenant_share_its_quota(tmp_path: Path) -> None:
    """Two pauses at once each saw the whole room under snapshot_mb and together overran it;
    a tenant's pauses and snapshots now check and fill it one at a time."""
    require_tier("container")
    door = _door(
        tmp_path / "paused",
        f"version = 1\n[tenants.{T}]\nquotas = {{ snapshot_mb = 4 }}\n",
    )
    try:
        sids = [await _create(door) for _ in range(2)]
        for sid in sids:  # 3 MiB each, incompressible: one fits under 4 MiB, two don't
            code = "import os; print(open('/home/user/big','wb').write(os.urandom(3<<20)))"
            assert await _run(door, sid, code) == f"{3 << 20}\n"
        got = await asyncio.gather(*(door.pause(T, s) for s in sids), return_exceptions=True)
        assert sorted(type(g).__name__ for g in got) == ["QuotaExceededError", "SandboxInfo"]
        kept = sum(f.stat().st_size for f in (tmp_path / "paused").rglob("*") if f.is_file())
        assert kept <= 4 << 20
        refused = sids[[isinstance(g, QuotaExceededError) for g in got].index(True)]
        assert await door.is_running(T, refused)  # the refused one runs on
    finally:
        await _close(door)
