"""Template builds (issue 12): real mmdebstrap, apt, pip and umoci in real build sandboxes.

The Debian base (mmdebstrap) and a small test base on it (``jq``, ``python3-pip``) are built
once per machine into the layer cache under /var/cache/moat-test/layers (keyed by content
hash, so later runs reuse them); every test builds small layers on top, into a store of its
own. Checks look at the built roots from the host, and run commands in a read-only build
sandbox on them.

On this machine the package registries are reached through a site mirror (the names resolve
to a reserved address, TLS re-signed by a site CA); the tests pass the same two admin knobs
an operator would (``unsafe_allow_networks``, ``ca_file``: docs/templates.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import require_tier
from tests.killcheck import cgroup_dirs
from tests.oci_image import docker_archive
from tests.site_env import site_env
from tests.template_store import LAYERS, build, builder

from moat.egress import Gateway
from moat.errors import CapacityError, TemplateBuildError
from moat.runtime.container import build as sandbox
from moat.store import AuditLog
from moat.templates import dockerfile, toml_def
from moat.templates.build import Builder
from moat.templates.define import Base, Step, TemplateDef
from moat.templates.load import load
from moat.templates.store import Store, remove_tree

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1200)]

HELLO = "hello from the build context\n"


def run_in(root: Path, command: str) -> tuple[int, str]:
    """A command in a read-only build sandbox on ``root`` (no network)."""
    spec = sandbox.BuildSpec(
        step_id=sandbox.step_id(), root=root, command=("/bin/sh", "-c", command), read_only=True
    )

    async def go() -> tuple[int, bytes]:
        gw = Gateway(spec.step_id)
        try:
            return await sandbox.run_step(spec, gw.handle_connection)
        finally:
            await gw.close()

    code, out = asyncio.run(go())
    return code, out.decode()


@contextlib.contextmanager
def open_dir() -> Iterator[Path]:
    """A directory the build ids can reach (pytest's own temp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="moat-test-templates-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        remove_tree(d)


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    (tmp_path / "hello.txt").write_text(HELLO)
    return tmp_path


SMALL_TOML = """\
base = "template:t-base"
pip = ["six==1.17.0"]
env = { GREETING = "hi" }

[[copy]]
src = "hello.txt"
dest = "/opt/hello.txt"
"""

SMALL_DOCKERFILE = """\
FROM t-base
RUN python3 -m pip install --no-cache-dir --break-system-packages six==1.17.0
COPY hello.txt /opt/hello.txt
ENV GREETING=hi
"""

CHECK = (
    "jq --version && python3 -c 'import six; print(\"six\", six.__version__, six.__file__)'"
    " && cat /opt/hello.txt"
)


def _no_privileged_files(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)), name
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), name
            assert (st.st_uid, st.st_gid) == (0, 0), name


def test_toml_template_has_the_package_the_pip_package_and_the_file(
    store: Store, ctx: Path
) -> None:
    (ctx / "moat.toml").write_text(SMALL_TOML)
    defn, _, context = load(ctx / "moat.toml")
    ref, _ = build(store, defn, "small", context)
    root = ref.rootfs
    # from the host, by path
    assert (root / "usr/bin/jq").is_file()
    assert (root / "usr/local/lib/python3.11/dist-packages/six.py").is_file()
    assert (root / "opt/hello.txt").read_text() == HELLO
    assert dict(ref.env) == {"GREETING": "hi"} and ref.name == "small"
    assert (store.templates / "names" / "small").is_symlink()
    _no_privileged_files(root)
    # the minimal base had setuid programs (mount, passwd): stripped, still there
    assert (root / "usr/bin/passwd").is_file()
    # from inside a sandbox on it
    code, out = run_in(root, CHECK)
    assert code == 0, out
    assert "jq-1.6" in out and "six 1.17.0 /usr/local/lib/python3.11" in out and HELLO in out
    # the host's /usr is not what it sees: a file only the host has
    assert Path("/usr/bin/bwrap").exists()
    code, out = run_in(root, "test -e /usr/bin/bwrap && echo host-usr || echo own-usr")
    assert out.strip() == "own-usr"


def test_unchanged_rebuild_is_a_cache_hit_and_a_changed_last_step_rebuilds_only_it(
    store: Store, ctx: Path
) -> None:
    (ctx / "moat.toml").write_text(SMALL_TOML)
    defn, _, context = load(ctx / "moat.toml")
    build(store, defn, "small", context)
    t0 = time.perf_counter()
    ref, b = build(store, defn, "small", context)
    took = time.perf_counter() - t0
    assert b.ran == [], b.ran
    assert took < 5, took
    print(f"cached rebuild: {took * 1000:.0f} ms")
    changed = f"changed {time.time_ns()}\n"  # never built before: not in the machine's cache
    (ctx / "hello.txt").write_text(changed)
    defn2, _, _ = load(ctx / "moat.toml")
    ref2, b2 = build(store, defn2, "small", context)
    assert [r.split(" ", 1)[1] for r in b2.ran] == ["copy: hello.txt /opt/hello.txt"]
    assert ref2.id != ref.id
    assert (ref2.rootfs / "opt/hello.txt").read_text() == changed
    assert (store.templates / "names" / "small").readlink().name == ref2.id


def test_dockerfile_form_gives_the_same_root(store: Store, ctx: Path) -> None:
    toml_ref, _ = build(store, toml_def.parse(SMALL_TOML)[0], None, ctx)
    docker_ref, _ = build(store, dockerfile.parse(SMALL_DOCKERFILE), None, ctx)
    a, b = toml_ref.rootfs, docker_ref.rootfs
    for rel in ("usr/bin/jq", "opt/hello.txt", "usr/local/lib/python3.11/dist-packages/six.py"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert dict(toml_ref.env) == dict(docker_ref.env)
    outs = {run_in(r, CHECK) for r in (a, b)}
    assert len(outs) == 1 and next(iter(outs))[0] == 0, outs


def _docker_archive(path: Path) -> None:
    busybox = Path("/bin/busybox").read_bytes()
    docker_archive(
        path,
        [
            [
                ("bin", "d", b""), ("bin/busybox", "x", busybox), ("bin/sh", "l", b"busybox"),
                ("a", "d", b""), ("a/keep", "f", b"keep\n"), ("a/gone", "f", b"gone\n"),
                ("a/old", "d", b""), ("a/old/x", "f", b"x\n"),
            ],
            [
                ("a/.wh.gone", "f", b""), ("a/old/.wh..wh..opq", "f", b""),
                ("a/old/y", "f", b"y\n"), ("b", "d", b""), ("b/new", "f", b"new\n"),
            ],
        ],
    )  # fmt: skip


def test_oci_tarball_import_with_whiteouts_and_a_step_on_top(tmp_path: Path) -> None:
    require_tier("container")
    _docker_archive(tmp_path / "image.tar")
    (tmp_path / "moat.toml").write_text(
        'base = "oci:image.tar"\n[[run]]\ncmd = "echo ran > /b/ran"\n'
    )
    with open_dir() as d:
        _oci_checks(Store(d / "templates", d / "layers"), tmp_path)


def _oci_checks(own: Store, tmp_path: Path) -> None:
    defn, _, context = load(tmp_path / "moat.toml")
    ref, _ = build(own, defn, "img", context)
    root = ref.rootfs
    assert (root / "a/keep").read_text() == "keep\n"
    assert not (root / "a/gone").exists()  # whiteout
    assert sorted(p.name for p in (root / "a/old").iterdir()) == ["y"]  # opaque directory
    assert (root / "b/new").read_text() == "new\n" and (root / "b/ran").read_text() == "ran\n"
    assert not list(root.rglob(".wh.*"))
    _no_privileged_files(root)
    # the image alone, from `moat template build IMAGE.tar`
    defn2, _, context2 = load(tmp_path / "image.tar")
    ref2, _ = build(own, defn2, "img-only", context2)
    assert (ref2.rootfs / "a/keep").is_file() and not (ref2.rootfs / "b/ran").exists()
    # rm and gc: the names go, then the templates, then their layers
    own.remove("img")
    own.remove("img-only")
    assert own.list() == []
    removed = own.gc()
    assert removed["layers"] == 2 and not [p for p in own.layers.iterdir() if len(p.name) == 64]


def test_failing_step_reports_step_exit_code_and_output(store: Store) -> None:
    defn = TemplateDef(
        Base("template", "t-base"),
        (Step("run", ("echo about-to-fail-4242; echo to-stderr >&2; exit 7",)),),
    )

    def made() -> set[Path]:  # layers and temp directories (lock files stay, gc's to remove)
        return {p for p in store.layers.iterdir() if not p.name.endswith(".lock")}

    before = made()
    with pytest.raises(TemplateBuildError) as info:
        build(store, defn)
    err = info.value
    assert err.exit_code == 7
    assert err.step.startswith("2/2 run:")
    assert "about-to-fail-4242" in err.output and "to-stderr" in err.output
    assert "exit code 7" in str(err)
    assert made() == before  # no layer, no temp directory left


def test_step_past_its_time_limit_is_killed_and_reported(store: Store) -> None:
    marker = f"slow-{time.monotonic_ns()}"
    defn = TemplateDef(Base("template", "t-base"), (Step("run", (f"echo {marker}; sleep 300",)),))
    t0 = time.perf_counter()
    with pytest.raises(TemplateBuildError, match="limit") as info:
        build(store, defn, step_timeout=3.0)
    assert time.perf_counter() - t0 < 60
    assert info.value.step.startswith("2/2 run:") and info.value.exit_code is None
    assert not _procs_with(marker)


def test_step_egress_outside_its_sources_is_refused_and_audited(store: Store) -> None:
    script = (
        f"# run {time.monotonic_ns()}: a fresh step, never a cache hit\n"
        + r"""
import socket, urllib.request
def get(url):
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return f"reached {r.status}"
    except Exception as e:
        return f"refused {getattr(e, 'code', '')} {type(e).__name__}"
print("http-other", get("http://example.com/"))
print("https-other", get("https://example.com/"))
print("pypi", get("https://pypi.org/simple/six/"))
try:
    socket.create_connection(("1.1.1.1", 80), timeout=5)
    print("direct reached")
except OSError as e:
    print("direct refused", e.errno)
"""
    )
    defn = TemplateDef(
        Base("template", "t-base"),
        (Step("run", (f"python3 - <<'EOF'\n{script}\nEOF",), network=("pypi",)),),
    )
    b, log = builder(store)
    asyncio.run(b.build(defn))
    out = log.data.decode()
    assert "http-other refused 403" in out, out
    assert "https-other refused" in out and "https-other reached" not in out, out
    assert "pypi reached 200" in out, out  # positive control: its own source works
    assert "direct refused 101" in out, out  # ENETUNREACH: no route but the gateway's
    (step_id,) = b.step_ids.values()
    rows = AuditLog().query(sandbox_id=step_id, kind="egress")
    denied = {(r["host"], r["reason"]) for r in rows if r["result"] == "deny"}
    assert ("example.com", "not_allowed") in denied, rows
    assert any(r["host"] == "pypi.org" and r["result"] == "allow" for r in rows), rows
    life = AuditLog().query(sandbox_id=step_id, kind="sandbox")
    assert {(r["result"], r["tier"]) for r in life} == {("created", "build"), ("ended", "build")}


def test_cancelled_build_leaves_nothing(store: Store, tmp_path: Path) -> None:
    """SIGTERM to `moat template build` in the middle of a step: the step's processes,
    cgroup and temp directories are gone, and the exit says so."""
    marker = f"started-{os.getpid()}-{time.monotonic_ns()}"
    proc, state, seen = start_build_step(tmp_path, marker)
    assert _procs_with(marker), "the step is running"
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + rest
    assert b"cancelled" in rest
    assert not _procs_with(marker)
    assert not [p for p in LAYERS.iterdir() if p.name.startswith(f".tmp-{proc.pid}-")]
    templates = state / "templates"
    assert not [p for p in templates.iterdir() if p.name.startswith(".tmp-")]
    assert not [p for p in templates.iterdir() if len(p.name) == 64]
    assert not _cgroups_of(proc.pid)


def start_build_step(tmp_path: Path, marker: str) -> tuple[subprocess.Popen[bytes], Path, bytes]:
    """``moat template build`` in a child, of a template whose one step prints ``marker``
    and sleeps: returned once the step runs (its own output seen), with its state dir and
    the output so far."""
    (tmp_path / "moat.toml").write_text(
        f'base = "debian:bookworm"\n[[run]]\ncmd = "echo {marker}; sleep 300"\n'
    )
    state = tmp_path / "state"
    env = {
        **os.environ,
        **site_env(),
        "MOAT_STATE_DIR": str(state),
        "MOAT_TEMPLATE_LAYERS": str(LAYERS),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "moat.cli", "template", "build", str(tmp_path / "moat.toml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line
        if not line or line == f"{marker}\n".encode():  # the step's own output: it runs
            break
    assert f"\n{marker}\n".encode() in seen, seen[-2000:]
    return proc, state, seen


def _procs_with(marker: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
            except OSError:
                continue
    return [pid for pid in out if pid != os.getpid()]


def _cgroups_of(pid: int) -> list[str]:
    return [p.name for p in cgroup_dirs(lambda n: n.startswith("sbx-bld-") and f".{pid}." in n)]


def test_size_cap_fails_clearly(store: Store) -> None:
    defn = TemplateDef(
        Base("template", "t-base"), (Step("run", ("head -c 80000000 /dev/urandom > /big",)),)
    )
    base_mb = (store.meta(store.names()["t-base"]) or {})["bytes"] >> 20
    with pytest.raises(TemplateBuildError, match="size cap") as info:
        build(store, defn, size_cap_mb=base_mb + 40)
    assert "MiB" in str(info.value) and info.value.exit_code is None


def test_concurrent_builds_of_one_template_build_it_once(store: Store) -> None:
    defn = TemplateDef(
        Base("template", "t-base"),
        (Step("run", (f"sleep 2; echo {time.monotonic_ns()} > /stamp",)),),
    )

    async def both() -> list[Builder]:
        bs = [builder(store)[0] for _ in range(2)]
        refs = await asyncio.gather(*(b.build(defn) for b in bs))
        assert refs[0].id == refs[1].id
        return bs

    bs = asyncio.run(both())
    assert sorted(len(b.ran) for b in bs) == [0, 1]


def test_finalize_neutralises_a_root_and_never_follows_a_symlink(tmp_path: Path) -> None:
    from moat.templates.build import finalize

    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/su").write_text("x")
    os.chmod(root / "usr/bin/su", 0o4755)
    (root / "usr/bin/wall").write_text("x")
    os.chmod(root / "usr/bin/wall", 0o2755)
    os.chown(root / "usr/bin/wall", 1234, 5678)
    os.mknod(root / "kmem", 0o600 | stat.S_IFCHR, os.makedev(1, 2))
    os.mkfifo(root / "fifo")
    outside = tmp_path / "outside"
    outside.write_text("host")
    os.chown(outside, 4321, 4321)
    os.symlink(str(outside), root / "link")
    finalize(root)
    assert stat.S_IMODE(os.lstat(root / "usr/bin/su").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(root / "usr/bin/wall").st_mode) == 0o755
    assert os.lstat(root / "usr/bin/wall").st_uid == 0
    assert not (root / "kmem").exists() and not (root / "fifo").exists()
    assert os.lstat(root / "link").st_uid == 0 and os.stat(outside).st_uid == 4321  # lchown
    # a root that is a symlink (a hostile unpack) is refused, its target untouched
    os.symlink(str(tmp_path / "victim"), tmp_path / "evil")
    (tmp_path / "victim").mkdir(mode=0o700)
    with pytest.raises(TemplateBuildError):
        finalize(tmp_path / "evil")
    assert stat.S_IMODE(os.stat(tmp_path / "victim").st_mode) == 0o700


def test_gc_removes_what_dead_builds_left_and_keeps_live_ones(tmp_path: Path) -> None:
    s = Store(tmp_path / "templates", tmp_path / "layers")
    s.prepare()
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = [s.layers / f".tmp-{dead.pid}-abc", s.templates / f".tmp-{dead.pid}-def"]
    live = s.tmpdir(s.layers)  # this process is alive: its build may be running
    for d in left:
        (d / "root").mkdir(parents=True)
    (s.layers / ("e" * 64)).mkdir()  # a layer no template refers to
    assert s.gc() == {"templates": 0, "layers": 1, "temp": 2}
    assert not any(d.exists() for d in left) and live.is_dir()


def test_gc_is_refused_while_a_build_runs(tmp_path: Path) -> None:
    """A build's finished layers are named by no template until it publishes: gc, which
    removes such layers, runs only while no build does (the store's build lock)."""
    s = Store(tmp_path / "templates", tmp_path / "layers")
    s.prepare()
    (s.layers / ("e" * 64)).mkdir()  # a layer no template refers to (yet)
    held = asyncio.run(s.building())
    try:
        with pytest.raises(CapacityError, match="builds are running"):
            s.gc()
        assert (s.layers / ("e" * 64)).is_dir()
    finally:
        os.close(held)
    assert s.gc()["layers"] == 1  # positive control: no build, gc runs
    assert (s.layers / "builds.lock").exists()  # never unlinked: its inode is the lock


def test_a_running_build_holds_the_store_build_lock(store: Store) -> None:
    defn = TemplateDef(
        Base("template", "t-base"), (Step("run", (f"echo {os.urandom(4).hex()}; sleep 3",)),)
    )
    b, _ = builder(store)

    def gc_lock_free() -> bool:
        fd = os.open(store.layers / "builds.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    async def go() -> None:
        task = asyncio.create_task(b.build(defn))
        await asyncio.sleep(1.5)  # the step runs
        assert not task.done() and not gc_lock_free()
        await task

    asyncio.run(go())
