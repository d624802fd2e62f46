"""A build step's disk use is capped by the kernel while it runs (issue 12, invariant 10).

Each step writes into a sparse ext4 image sized to what the template's size cap leaves it
(an overlay over its parent layer, ``moat.runtime.container.buildfs``). These tests run real
steps in real build sandboxes and look from outside: how much the step's files took on the
host while it ran, the host's free space, the error, and that no mount, loop device, image
or temp directory of the build is left, whatever way the step ended.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.template_store import LAYERS, build, builder
from tests.test_templates_build import _procs_with, start_build_step

from moat.errors import TemplateBuildError
from moat.runtime import cgroups
from moat.runtime.container import buildfs
from moat.templates.define import Base, Step, TemplateDef
from moat.templates.store import Store

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1200)]

MiB = 1 << 20


def _fill(files: int, mib: int, tag: str) -> TemplateDef:
    """A step writing ``files`` files of ``mib`` MiB each, ignoring every error and exiting 0
    (a hostile script does not stop when told the disk is full)."""
    script = (
        f"# {tag}\n"
        f"for i in $(seq 1 {files}); do head -c {mib * MiB} /dev/zero > /fill-$i"
        " || echo refused-at-$i; done; echo fill-done; exit 0"
    )
    return TemplateDef(Base("template", "t-base"), (Step("run", (script,)),))


def _base_mb(s: Store) -> int:
    return int((s.meta(s.names()["t-base"]) or {})["bytes"]) >> 20


def _ours(pid: int) -> str:
    return f"{LAYERS}/.tmp-{pid}-"


def leftovers(pid: int) -> dict[str, list[str]]:
    """Everything of ``pid``'s builds still on the host: temp directories in the layer
    cache, mounts below them, loop devices backed by their images."""
    prefix = _ours(pid)
    mounts = [str(p) for p in buildfs.mounts_under(LAYERS) if str(p).startswith(prefix)]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    return {
        "dirs": [str(p) for p in LAYERS.iterdir() if str(p).startswith(prefix)],
        "mounts": mounts,
        "loops": [line for line in loops.splitlines() if prefix in line],
    }


NOTHING: dict[str, list[str]] = {"dirs": [], "mounts": [], "loops": []}


class HostWatch:
    """Polls, from outside, the host disk taken by this process's build temp directories
    (files on the layer cache's own file system only: never through a step's mounts) and
    the layer cache file system's free space."""

    def __init__(self) -> None:
        self.dev = os.stat(LAYERS).st_dev
        self.free0 = self._free()
        self.max_taken = 0
        self.min_free = self.free0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _free(self) -> int:
        st = os.statvfs(LAYERS)
        return st.f_bavail * st.f_frsize

    def _taken(self) -> int:
        total = 0
        for d in LAYERS.iterdir():
            if not str(d).startswith(_ours(os.getpid())):
                continue
            for dirpath, dirnames, filenames in os.walk(d):
                for name in filenames + dirnames:
                    try:
                        st = os.lstat(os.path.join(dirpath, name))
                    except OSError:
                        continue
                    if st.st_dev == self.dev:
                        total += st.st_blocks * 512
                # never into a mount (the step's file system, the parent under the overlay)
                dirnames[:] = [n for n in dirnames if not os.path.ismount(os.path.join(dirpath, n))]
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.max_taken = max(self.max_taken, self._taken())
            except OSError:
                pass
            self.min_free = min(self.min_free, self._free())
            time.sleep(0.05)

    def __enter__(self) -> HostWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


@pytest.fixture(autouse=True)
def nothing_left() -> Iterator[None]:
    yield
    assert leftovers(os.getpid()) == NOTHING


def test_capped_file_system_refuses_past_its_budget_and_goes(tmp_path: Path) -> None:
    """The mechanism alone, no sandbox: bytes and inodes both run out at the budget, and
    removing it releases the mount and the loop device."""
    work = LAYERS / f".tmp-{os.getpid()}-unit{os.urandom(3).hex()}"
    work.mkdir(mode=0o700)
    try:
        fs = buildfs.make(work, 8 * MiB, None)
        assert leftovers(os.getpid())["loops"], "a loop device backs it"
        written = 0
        with pytest.raises(OSError, match="No space"), open(fs.disk / "big", "wb") as f:
            while written < 64 * MiB:
                written += f.write(b"\0" * MiB)
                f.flush()
                os.fsync(f.fileno())
        assert 7 * MiB <= written <= 10 * MiB, written
        assert fs.full()
        os.unlink(fs.disk / "big")
        assert not fs.full()
        with pytest.raises(OSError, match="No space"):
            for i in range(100_000):
                (fs.disk / f"e{i}").touch()
        assert buildfs.inodes_for(8 * MiB) // 2 < i <= buildfs.inodes_for(8 * MiB) * 2, i
        assert fs.full()
        allocated = os.stat(work / buildfs.IMAGE).st_blocks * 512
        assert allocated <= buildfs.image_bytes(8 * MiB), allocated
        buildfs.remove(fs)
        assert sorted(os.listdir(work)) == []
    finally:
        os.rmdir(work)


def test_sweep_unmounts_a_dead_builds_file_system_and_keeps_a_live_ones(tmp_path: Path) -> None:
    s = Store(tmp_path / "templates", tmp_path / "layers")
    s.prepare()
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = s.layers / f".tmp-{dead.pid}-abc"
    live = s.tmpdir(s.layers)  # this process: its build may be running
    for d in (gone, live):
        d.mkdir(exist_ok=True)
        buildfs.make(d, 4 * MiB, None)
    assert len(buildfs.mounts_under(s.layers)) == 2
    held = asyncio.run(s.building())  # gc waits for builds; a sweep runs beside them
    try:
        assert s.sweep() == 1
    finally:
        os.close(held)
    assert not gone.exists() and [p.parent for p in buildfs.mounts_under(s.layers)] == [live]
    buildfs.remove(buildfs.StepFs(live, 4 * MiB, 0, False))
    assert buildfs.mounts_under(s.layers) == []
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in loops


def test_many_files_past_the_cap_are_stopped_while_the_step_runs(store: Store) -> None:
    """A step writing 16 files of 8 MiB (and ignoring every error) under a cap that leaves
    it 64 MiB: the kernel refuses the writes past the budget while it runs; the build fails
    naming the step and the cap; the host never held more than the capped image."""
    cap = _base_mb(store) + 64
    defn = _fill(16, 8, f"over {time.monotonic_ns()}")
    b, log = builder(store, size_cap_mb=cap)
    with HostWatch() as watch, pytest.raises(TemplateBuildError) as info:
        asyncio.run(b.build(defn))
    # from outside: what the step's writes took on the host never passed the image's size
    assert 0 < watch.max_taken <= buildfs.image_bytes(64 * MiB), watch.max_taken >> 20
    assert watch.free0 - watch.min_free < 512 * MiB, (watch.free0, watch.min_free)
    err = info.value
    assert err.step.startswith("2/2 run:"), err.step
    assert f"size cap of {cap} MiB" in str(err), str(err)
    assert err.exit_code is None  # the cap, not the step's own status (it exited 0)
    out = log.data.decode()
    assert "No space left on device" in out and "refused-at-" in out, out[-2000:]
    assert "fill-done" in out  # it ran to its end: refused, not killed


def test_positive_control_the_same_step_under_a_larger_cap_succeeds(store: Store) -> None:
    cap = _base_mb(store) + 256
    defn = _fill(16, 8, f"under {time.monotonic_ns()}")
    b, log = builder(store, size_cap_mb=cap)
    ref = asyncio.run(b.build(defn))
    out = log.data.decode()
    assert "refused-at-" not in out and "fill-done" in out, out[-2000:]
    root = ref.rootfs
    sizes = [os.path.getsize(root / f"fill-{i}") for i in range(1, 17)]
    assert sizes == [8 * MiB] * 16
    assert (root / "usr/bin/jq").exists()  # the parent's files, through the overlay


def test_inode_exhaustion_stops_the_step(store: Store) -> None:
    """Empty files take no blocks: the inode count bounds them (one per 4 KiB of budget)."""
    cap = _base_mb(store) + 64
    script = (
        f"# inodes {time.monotonic_ns()}\n"
        "mkdir /many && cd /many && python3 -c '\n"
        "import os\n"
        "n = 0\n"
        "try:\n"
        "    for n in range(1000000):\n"
        '        open(str(n), "w").close()\n'
        "except OSError as e:\n"
        '    print("stopped-at", n, e.strerror)\n\''
    )
    defn = TemplateDef(Base("template", "t-base"), (Step("run", (script,)),))
    b, log = builder(store, size_cap_mb=cap)
    t0 = time.perf_counter()
    with pytest.raises(TemplateBuildError, match=f"size cap of {cap} MiB") as info:
        asyncio.run(b.build(defn))
    assert time.perf_counter() - t0 < 300
    out = log.data.decode()
    assert "stopped-at" in out and "No space left on device" in out, out[-2000:]
    stopped = int(out.split("stopped-at ")[1].split()[0])
    assert stopped <= 2 * buildfs.inodes_for(64 * MiB), stopped
    assert info.value.step.startswith("2/2 run:")


def test_cancelled_step_leaves_no_mount_loop_or_image(store: Store) -> None:
    marker = f"cancel-{time.monotonic_ns()}"
    defn = TemplateDef(
        Base("template", "t-base"),
        (Step("run", (f"head -c 1000000 /dev/zero > /x; echo {marker}; sleep 300",)),),
    )
    b, log = builder(store)

    async def go() -> None:
        task = asyncio.create_task(b.build(defn))
        while marker.encode() + b"\n" not in log.data:
            assert not task.done()
            await asyncio.sleep(0.1)
        mid = leftovers(os.getpid())
        assert mid["mounts"] and mid["loops"], mid  # positive control: it was mounted
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    # the autouse fixture checks that nothing is left


def test_timed_out_step_leaves_no_mount_loop_or_image(store: Store) -> None:
    defn = TemplateDef(
        Base("template", "t-base"), (Step("run", (f"echo {time.monotonic_ns()}; sleep 300",)),)
    )
    with pytest.raises(TemplateBuildError, match="limit"):
        build(store, defn, step_timeout=3.0)
    # the autouse fixture checks that nothing is left


def test_killed_build_leaves_mounts_that_the_next_build_sweeps(
    store: Store,
    tmp_path: Path,
) -> None:
    """SIGKILL (a crash) in the middle of a step leaves its mounts and loop device; the next
    build's sweep (or gc) unmounts them, which frees the loop device, and removes the rest."""
    marker = f"crash-{os.getpid()}-{time.monotonic_ns()}"
    proc, _, _ = start_build_step(tmp_path, marker)
    assert proc.stdout is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    left = leftovers(proc.pid)
    assert left["mounts"] and left["loops"] and left["dirs"], left  # what a crash leaves
    deadline = time.monotonic() + 30
    while _procs_with(marker) and time.monotonic() < deadline:  # --die-with-parent
        time.sleep(0.1)
    assert store.sweep() >= 1
    assert leftovers(proc.pid) == NOTHING
    cgroups.detect().sweep()  # the step's cgroup: the container tier's start-up sweep
