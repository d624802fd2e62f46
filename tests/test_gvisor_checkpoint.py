"""gVisor checkpoint/restore with memory (issue 11), driver level, real runsc and the real agent.

State is planted inside, checked from inside after a restore (files, a Python variable in the
default kernel, a background ``http.server``); leftovers are listed from the host (processes,
cgroups, work dir, mounts); randomness is compared between two restores of one checkpoint,
with the shared ``random`` state as the positive control that they really share memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from tests.conftest import require
from tests.killcheck import cannot_run, eventually
from tests.raw_agent import Client as RawClient

from moat.errors import DiskFullError, InvalidArgumentError, PolicyError, SandboxDiedError
from moat.paths import state_dir
from moat.protocol import MsgType
from moat.runtime.base import Checkpointable
from moat.runtime.gvisor import GvisorRuntime, GvisorSandbox
from moat.runtime.gvisor.checkpoint import IMAGE, MANIFEST
from moat.runtime.gvisor.hostcg import CGROUP_ROOT, HostCgroup
from moat.runtime.gvisor.oci import CGROUP_PREFIX
from moat.runtime.spec import Limits, Mount, SandboxSpec

RUNTIME = GvisorRuntime()
_REASON = RUNTIME.probe()
pytestmark = [pytest.mark.gvisor, pytest.mark.timeout(180)]
_LIMITS = Limits(memory_mb=256, pids=64, disk_mb=64)
_PORT = 8765


@pytest.fixture(autouse=True)
def _prerequisite() -> None:
    require(_REASON, "the gvisor tier")


class Client(RawClient):
    def __init__(self, sb: GvisorSandbox) -> None:
        super().__init__(sb, timeout=30)

    async def py(self, code: str) -> str:
        """Run ``code`` in the default kernel; its stdout (a failure fails the test)."""
        out, err, f = await self.request(
            MsgType.EXEC, context="default", language="python", code=code
        )
        assert f.type is MsgType.DONE and not err, (f, err)
        return out.decode()


def _spec(sandbox_id: str | None = None, **kw: object) -> SandboxSpec:
    sid = sandbox_id or "c-" + uuid.uuid4().hex[:12]
    kw.setdefault("limits", _LIMITS)
    return SandboxSpec(sandbox_id=sid, tier="gvisor", **kw)  # type: ignore[arg-type]


def _leftovers(sandbox_id: str) -> list[str]:
    """Everything of one sandbox visible from the host: processes, cgroups, files, mounts."""
    workdir = state_dir() / "gvisor" / sandbox_id
    found: list[str] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(workdir).encode() in cmd:
                found.append(f"process {entry.name}")
    for hierarchy in CGROUP_ROOT.iterdir():
        if (hierarchy / (CGROUP_PREFIX + sandbox_id)).exists():
            found.append(f"cgroup {hierarchy.name}")
    if workdir.exists():
        found.append("workdir")
    if str(workdir) in Path("/proc/self/mountinfo").read_text():
        found.append("mount")
    return found


async def _started(spec: SandboxSpec) -> tuple[GvisorSandbox, Client]:
    sb = await RUNTIME.start(spec)
    client = Client(sb)
    assert (await client.frame()).type is MsgType.READY
    return sb, client


async def _restored(spec: SandboxSpec, src: Path) -> tuple[GvisorSandbox, Client]:
    sb = await RUNTIME.restore(spec, src)
    client = Client(sb)  # no READY: the restored agent carries on reading
    _, _, done = await client.request(MsgType.PING)
    assert done.type is MsgType.DONE
    return sb, client


async def _serve(client: Client) -> None:
    """A background http.server, answering before this returns."""
    out, code = await client.sh(
        f"cd /tmp && (python3 -m http.server {_PORT} --bind 127.0.0.1 >/dev/null 2>&1 &)"
    )
    assert code == 0, out
    for _ in range(100):
        if (await _fetch(client)) == "200":
            return
        await asyncio.sleep(0.1)
    raise AssertionError("http.server did not come up")


async def _fetch(client: Client) -> str:
    out, _ = await client.sh(
        'python3 -c "import urllib.request as u; '
        f"print(u.urlopen('http://127.0.0.1:{_PORT}/', timeout=5).status)\" 2>&1 | tail -1"
    )
    return out.strip()


async def _plant(client: Client, token: str) -> None:
    out, code = await client.sh(f"echo keep-{token} > /home/user/kept.txt")
    assert code == 0, out
    await client.py(f"kept = 'var-{token}'\nn = 0")
    await _serve(client)


async def _check_planted(client: Client, token: str) -> None:
    out, code = await client.sh("cat /home/user/kept.txt")
    assert (out, code) == (f"keep-{token}\n", 0)
    assert await client.py("print(kept)") == f"var-{token}\n"
    assert await _fetch(client) == "200"


@pytest_asyncio.fixture
async def ckdir(tmp_path: Path) -> AsyncIterator[Path]:
    dest = tmp_path / "ck"
    dest.mkdir()
    yield dest


def _listing(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()}


def test_the_tier_declares_checkpoints_with_memory() -> None:
    assert isinstance(RUNTIME, Checkpointable)
    assert RUNTIME.keeps_memory is True


@pytest.mark.asyncio
async def test_pause_and_resume_keep_files_variables_and_a_server(ckdir: Path) -> None:
    spec, token = _spec(), uuid.uuid4().hex[:8]
    sb, client = await _started(spec)
    try:
        await _plant(client, token)
        await RUNTIME.checkpoint(sb, ckdir, memory=True, leave_running=False)
        assert not sb.alive()
    finally:
        await sb.kill()
    # A paused sandbox's kill removes everything at once: the same id restores right after.
    assert _leftovers(spec.sandbox_id) == []
    assert sorted(p.name for p in ckdir.iterdir()) == [IMAGE, MANIFEST]
    manifest = json.loads((ckdir / MANIFEST).read_text())
    assert manifest["runsc"].startswith("runsc version") and manifest["memory"] is True
    # per-sandbox paths blanked: a fork's config compares equal
    assert spec.sandbox_id not in json.dumps(manifest["config"])
    before = _listing(ckdir)
    sb2, client2 = await _restored(spec, ckdir)
    try:
        await _check_planted(client2, token)
    finally:
        await sb2.kill()
    assert _listing(ckdir) == before  # the checkpoint is left unchanged, reusable


@pytest.mark.asyncio
async def test_kill_of_a_restored_sandbox_is_bounded_and_leaves_nothing(ckdir: Path) -> None:
    spec = _spec()
    sb, client = await _started(spec)
    await client.sh("sleep 300 & python3 -c 'import time; time.sleep(300)' &")
    await RUNTIME.checkpoint(sb, ckdir, memory=True, leave_running=False)
    await sb.kill()
    fork = _spec()
    sb2, client2 = await _restored(fork, ckdir)
    out, _ = await client2.sh("cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
    assert "sleep 300" in out and "time.sleep(300)" in out  # restored with the sandbox
    during = _leftovers(fork.sandbox_id)
    # positive control: the listing sees the restored sandbox while it runs
    assert any(x.startswith("process") for x in during) and "workdir" in during
    assert any(x.startswith("cgroup") for x in during)
    pids = HostCgroup(CGROUP_PREFIX + fork.sandbox_id).pids()
    t0 = time.monotonic()
    await sb2.kill()
    took = time.monotonic() - t0
    assert took < 0.5, took  # runsc delete of a restored sandbox hung: never waited for
    assert not sb2.alive()
    assert pids and all(cannot_run(p) for p in pids)
    assert await asyncio.to_thread(eventually, lambda: not _leftovers(fork.sandbox_id))


@pytest.mark.asyncio
async def test_five_cycles_of_one_sandbox_grow_nothing(tmp_path: Path) -> None:
    spec, token = _spec(), uuid.uuid4().hex[:8]
    sb, client = await _started(spec)
    await _plant(client, token)
    sizes: list[int] = []
    fds: list[int] = []
    inside: list[str] = []
    tasks: list[int] = []
    try:
        for cycle in range(5):
            dest = tmp_path / f"ck{cycle}"
            dest.mkdir()
            await RUNTIME.checkpoint(sb, dest, memory=True, leave_running=False)
            await sb.kill()
            assert _leftovers(spec.sandbox_id) == []
            sizes.append((dest / IMAGE).stat().st_size)
            sb, client = await _restored(spec, dest)
            await _check_planted(client, token)
            assert await client.py("n += 1\nprint(n)") == f"{cycle + 1}\n"
            out, _ = await client.sh("ls /proc | grep -c '^[0-9]'; ls /proc/1/fd | wc -l")
            inside.append(out.strip().replace("\n", " "))
            tasks.append(sb.stats()["host_tasks"])
            fds.append(len(os.listdir("/proc/self/fd")))
    finally:
        await sb.kill()
    print(f"image bytes {sizes}, engine fds {fds}, in-sandbox procs/agent fds {inside}")
    print(f"host tasks {tasks}")
    # ~150 bytes a cycle when idle; the commands run each cycle add their traces (~15 KiB)
    assert max(sizes) - min(sizes) < 512 << 10, sizes
    assert fds[-1] <= fds[0], fds  # the engine's own fds do not pile up
    assert len(set(inside)) == 1, inside  # same processes and agent fds every time
    assert max(tasks) <= 2 * min(tasks), tasks


@pytest.mark.asyncio
async def test_two_restores_of_one_checkpoint_do_not_share_randomness(ckdir: Path) -> None:
    sb, client = await _started(_spec())
    await client.py("import os, random, uuid")
    await RUNTIME.checkpoint(sb, ckdir, memory=True, leave_running=False)
    await sb.kill()
    seen: list[dict[str, str]] = []
    for _ in range(2):
        sb2, c2 = await _restored(_spec(), ckdir)
        try:
            kernel = await c2.py(
                "print(os.urandom(16).hex(), uuid.uuid4().hex, random.random(), sep='|')"
            )
            fresh, _ = await c2.sh("python3 -c 'import os; print(os.urandom(16).hex())'")
            kuuid, _ = await c2.sh("cat /proc/sys/kernel/random/uuid 2>/dev/null || echo none")
        finally:
            await sb2.kill()
        urandom, uuid4, rnd = kernel.strip().split("|")
        seen.append(
            {"urandom": urandom, "uuid4": uuid4, "random": rnd, "fresh": fresh, "kuuid": kuuid}
        )
    a, b = seen
    # The sentry draws from the host's RNG on every getrandom/urandom read: no state to share.
    assert a["urandom"] != b["urandom"] and a["uuid4"] != b["uuid4"]
    assert a["fresh"] != b["fresh"]
    assert a["kuuid"] == b["kuuid"] == "none\n" or a["kuuid"] != b["kuuid"]
    # Positive control: both restores really run the one checkpointed interpreter, whose
    # `random` state they share until the engine reseeds it (the pause helper's operation).
    assert a["random"] == b["random"]


@pytest.mark.asyncio
async def test_leave_running_keeps_the_source_serving_on_its_own_stream(ckdir: Path) -> None:
    spec, token = _spec(), uuid.uuid4().hex[:8]
    sb, client = await _started(spec)
    fork_spec = _spec()
    try:
        await _plant(client, token)
        # A request in flight while the sandbox is saved: its bytes wait in the pipe.
        client.sb.writer.write(_ping_frame(99))
        await RUNTIME.checkpoint(sb, ckdir, memory=True, leave_running=True)
        assert sb.alive()
        done = await client.frame()
        assert (done.type, done.id) == (MsgType.DONE, 99)
        await _check_planted(client, token)  # the same client, the same stream
        # The snapshot starts a fork of its own; the two no longer share anything.
        fork, fclient = await _restored(fork_spec, ckdir)
        try:
            await _check_planted(fclient, token)
            await fclient.sh("echo fork > /home/user/only-fork.txt")
            out, _ = await client.sh("cat /home/user/only-fork.txt 2>&1 || true")
            assert "No such file" in out
        finally:
            await fork.kill()
        # And the source can be snapshotted again.
        again = ckdir.parent / "again"
        again.mkdir()
        await RUNTIME.checkpoint(sb, again, memory=True, leave_running=True)
        await _check_planted(client, token)
    finally:
        await sb.kill()
    assert await asyncio.to_thread(eventually, lambda: not _leftovers(spec.sandbox_id))
    assert await asyncio.to_thread(eventually, lambda: not _leftovers(fork_spec.sandbox_id))


def _ping_frame(rid: int) -> bytes:
    from moat.protocol import Frame, encode

    return encode(Frame(MsgType.PING, rid, {}))


@pytest.mark.asyncio
async def test_refusals_leave_the_sandbox_serving(ckdir: Path) -> None:
    sb, client = await _started(_spec())
    try:
        (ckdir / "junk").write_text("x")
        with pytest.raises(InvalidArgumentError):
            await RUNTIME.checkpoint(sb, ckdir, memory=True, leave_running=False)
        (ckdir / "junk").unlink()
        assert list(ckdir.iterdir()) == []
        assert sb.alive()
        assert (await client.request(MsgType.PING))[2].type is MsgType.DONE
    finally:
        await sb.kill()


@pytest.mark.asyncio
async def test_a_full_disk_refuses_the_checkpoint_and_leaves_the_sandbox_running(
    tmp_path: Path,
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    sb, client = await _started(_spec())
    try:
        dest = small / "ck"
        dest.mkdir()
        with pytest.raises(DiskFullError):
            await RUNTIME.checkpoint(sb, dest, memory=True, leave_running=False)
        assert list(dest.iterdir()) == []
        assert sb.alive()
        assert (await client.request(MsgType.PING))[2].type is MsgType.DONE
    finally:
        await sb.kill()
        subprocess.run(["umount", str(small)], check=True)


async def _paused(ckdir: Path) -> SandboxSpec:
    spec = _spec()
    sb, _ = await _started(spec)
    await RUNTIME.checkpoint(sb, ckdir, memory=True, leave_running=False)
    await sb.kill()
    return spec


async def _refused(spec: SandboxSpec, ckdir: Path, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        await RUNTIME.restore(spec, ckdir)
    assert str(state_dir()) not in str(info.value) and "/tmp" not in str(info.value)
    assert await asyncio.to_thread(eventually, lambda: not _leftovers(spec.sandbox_id))


@pytest.mark.asyncio
async def test_restore_refuses_what_does_not_match_and_leaves_nothing(ckdir: Path) -> None:
    spec = await _paused(ckdir)
    manifest = json.loads((ckdir / MANIFEST).read_text())
    # Another configuration: the image's rlimits, tmpfs sizes and env would not be the spec's.
    await _refused(_spec(limits=Limits(memory_mb=512, pids=64, disk_mb=64)), ckdir, PolicyError)
    await _refused(_spec(envs=(("A", "b"),)), ckdir, PolicyError)
    # Another runsc (or platform) took it.
    (ckdir / MANIFEST).write_text(json.dumps({**manifest, "runsc": "runsc version 0.0~1"}))
    await _refused(_spec(), ckdir, PolicyError)
    (ckdir / MANIFEST).write_text(json.dumps({**manifest, "platform": "kvm"}))
    await _refused(_spec(), ckdir, PolicyError)
    # A truncated image; no manifest at all.
    (ckdir / MANIFEST).write_text(json.dumps(manifest))
    with (ckdir / IMAGE).open("r+b") as f:
        f.truncate(manifest["image_bytes"] // 2)
    await _refused(_spec(), ckdir, InvalidArgumentError)
    (ckdir / MANIFEST).unlink()
    await _refused(_spec(), ckdir, InvalidArgumentError)
    # positive control: the same spec (a new id) restores from an intact checkpoint
    ok = ckdir.parent / "ok"
    ok.mkdir()
    spec2 = await _paused(ok)
    sb, _ = await _restored(_spec(limits=spec2.limits), ok)
    await sb.kill()
    assert spec.limits == spec2.limits


@pytest.mark.asyncio
async def test_a_corrupt_image_fails_the_restore_and_leaves_nothing(ckdir: Path) -> None:
    await _paused(ckdir)
    size = (ckdir / IMAGE).stat().st_size
    with (ckdir / IMAGE).open("r+b") as f:  # same size, garbage in the middle
        f.seek(size // 2)
        f.write(os.urandom(min(65536, size // 4)))
    await _refused(_spec(), ckdir, SandboxDiedError)


@pytest.mark.asyncio
async def test_checkpoint_of_a_killed_sandbox_is_refused(ckdir: Path) -> None:
    sb, _ = await _started(_spec())
    await sb.kill()
    with pytest.raises(SandboxDiedError):
        await RUNTIME.checkpoint(sb, ckdir, memory=True, leave_running=False)
    assert list(ckdir.iterdir()) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("delay", [0.0, 0.15, 0.4])
async def test_kill_during_a_snapshot_leaves_nothing(ckdir: Path, delay: float) -> None:
    """kill() never waits for a checkpoint in flight (runsc checkpoint or the restore in
    place): whichever step it hits, the snapshot fails and nothing of the sandbox remains."""
    spec = _spec()
    sb, client = await _started(spec)
    await client.py("x = 1")
    snap = asyncio.create_task(RUNTIME.checkpoint(sb, ckdir, memory=True, leave_running=True))
    await asyncio.sleep(delay)
    t0 = time.monotonic()
    await sb.kill()
    assert time.monotonic() - t0 < 0.5
    try:
        await asyncio.wait_for(snap, 60)
        outcome = "saved"
    except SandboxDiedError as exc:  # killed before or during the swap
        outcome = str(exc)
    print(f"kill after {delay} s: {outcome}, wrote {sorted(p.name for p in ckdir.iterdir())}")
    assert not sb.alive()
    assert await asyncio.to_thread(eventually, lambda: not _leftovers(spec.sandbox_id))


@pytest.mark.asyncio
async def test_host_mounts_work_after_a_restore(tmp_path: Path, ckdir: Path) -> None:
    """The gofer serves the spec's mounts afresh: read-only data and writes to a writable
    mount reach the host after a restore, as before it."""
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir(mode=0o755)
    rw.mkdir()
    os.chmod(rw, 0o777)
    (ro / "in.txt").write_text("host-data\n")
    os.chmod(ro / "in.txt", 0o644)
    spec = _spec(
        mounts=(
            Mount(host_path=str(ro), sandbox_path="/mnt/ro"),
            Mount(host_path=str(rw), sandbox_path="/mnt/rw", read_only=False),
        )
    )
    sb, client = await _started(spec)
    # 0666: a file of uid 1000 that gives its owner more than others is refused at every
    # start and restore on this tier (moat.runtime.mounts.check_owners)
    out, code = await client.sh(
        "cat /mnt/ro/in.txt && echo before > /mnt/rw/a.txt && chmod 666 /mnt/rw/a.txt"
    )
    assert (out, code) == ("host-data\n", 0)
    await RUNTIME.checkpoint(sb, ckdir, memory=True, leave_running=False)
    await sb.kill()
    sb2, client2 = await _restored(spec, ckdir)
    try:
        out, code = await client2.sh("cat /mnt/ro/in.txt /mnt/rw/a.txt && echo after > /mnt/rw/b")
        assert (out, code) == ("host-data\nbefore\n", 0)
        assert (rw / "b").read_text() == "after\n"  # seen from the host
    finally:
        await sb2.kill()


@pytest.mark.asyncio
async def test_five_snapshots_of_one_sandbox_grow_nothing(tmp_path: Path) -> None:
    """leave_running swaps the runsc process behind one stream: nothing piles up per swap."""
    spec, token = _spec(), uuid.uuid4().hex[:8]
    sb, client = await _started(spec)
    fds: list[int] = []
    tasks: list[int] = []
    try:
        await _plant(client, token)
        for cycle in range(5):
            dest = tmp_path / f"snap{cycle}"
            dest.mkdir()
            await RUNTIME.checkpoint(sb, dest, memory=True, leave_running=True)
            await _check_planted(client, token)
            assert await client.py("n += 1\nprint(n)") == f"{cycle + 1}\n"
            fds.append(len(os.listdir("/proc/self/fd")))
            tasks.append(len(asyncio.all_tasks()))
        log = (sb.workdir / "runsc.log").stat().st_size
    finally:
        await sb.kill()
    print(f"engine fds {fds}, asyncio tasks {tasks}, runsc log {log} bytes")
    assert fds[-1] <= fds[0] and tasks[-1] <= tasks[0], (fds, tasks)
    assert log < 1 << 20


@pytest.mark.asyncio
async def test_sweep_reaps_a_restored_sandbox_of_a_dead_engine(ckdir: Path) -> None:
    await _paused(ckdir)
    spec = _spec()
    sb, _ = await _restored(spec, ckdir)
    assert _leftovers(spec.sandbox_id)  # positive control
    (sb.workdir / "owner").write_text("999999999 0\n")  # its engine "crashed"
    assert RUNTIME.sweep() >= 1
    assert _leftovers(spec.sandbox_id) == []
    await sb.kill()


@pytest.mark.asyncio
async def test_a_files_only_pause_keeps_home_and_nothing_else(ckdir: Path) -> None:
    """memory=False: /home/user comes back (modes, links, nesting); processes, variables and
    /tmp start afresh, like after a reboot; the agent is new and says READY."""
    spec, token = _spec(), uuid.uuid4().hex[:8]
    sb, client = await _started(spec)
    try:
        await _plant(client, token)
        out, code = await client.sh(
            "mkdir -p /home/user/d/.e && echo s > /home/user/d/secret && chmod 600 "
            "/home/user/d/secret && ln -s d/secret /home/user/link && echo t > /tmp/t"
        )
        assert code == 0, out
        snap = ckdir.parent / "snap"
        snap.mkdir()
        await RUNTIME.checkpoint(sb, snap, memory=False, leave_running=True)
        assert sb.alive()  # a files-only snapshot leaves it serving
        assert await _fetch(client) == "200"
        await RUNTIME.checkpoint(sb, ckdir, memory=False, leave_running=False)
        assert not sb.alive()  # a pause stops it
    finally:
        await sb.kill()
    assert _leftovers(spec.sandbox_id) == []  # the id is free at once
    assert sorted(p.name for p in ckdir.iterdir()) == ["home.tar", MANIFEST]
    assert json.loads((ckdir / MANIFEST).read_text())["memory"] is False
    sb2 = await RUNTIME.restore(spec, ckdir)
    client2 = Client(sb2)
    try:
        assert (await client2.frame()).type is MsgType.READY  # a fresh agent
        out, code = await client2.sh(
            "cat /home/user/kept.txt /home/user/link; stat -c '%a %U' /home/user/d/secret; "
            "test -d /home/user/d/.e && echo dir; ls /tmp"
        )
        assert (out, code) == (f"keep-{token}\ns\n600 user\ndir\n", 0)
        assert await client2.py("print('kept' in globals())") == "False\n"
        assert await _fetch(client2) != "200"  # the server did not come back
    finally:
        await sb2.kill()
    assert await asyncio.to_thread(eventually, lambda: not _leftovers(spec.sandbox_id))


@pytest.mark.asyncio
async def test_a_files_only_pause_refuses_an_unreadable_home_and_keeps_running(
    ckdir: Path,
) -> None:
    sb, client = await _started(_spec())
    try:
        await client.sh("mkdir /home/user/locked && echo x > /home/user/locked/f")
        await client.sh("chmod 000 /home/user/locked")
        with pytest.raises(PolicyError) as info:
            await RUNTIME.checkpoint(sb, ckdir, memory=False, leave_running=False)
        assert str(state_dir()) not in str(info.value)
        assert list(ckdir.iterdir()) == []
        assert sb.alive()
        await client.sh("chmod 700 /home/user/locked")
        await RUNTIME.checkpoint(sb, ckdir, memory=False, leave_running=False)  # control
        assert (ckdir / "home.tar").stat().st_size > 0
    finally:
        await sb.kill()
