"""gVisor sandboxes of one template share one root skeleton, built once (issue 12, rootcache).

Real runsc, a real Debian template root (tests/template_support.py). Checked from outside:
concurrent starts build exactly one skeleton and leave no temporary; each sandbox's bundle
names it; nothing in it is writable by anyone but root on the host. Containment: root inside
one sandbox tries to change the shared skeleton (write, create, remove, chmod) and fails; the
tree is byte-for-byte what it was and a later sandbox sees none of it. Positive control: a
file planted in the skeleton from the host IS seen by a new sandbox (the check can fail). A
pause and resume finds its root again; a dead build's temporary is swept, a live one's kept;
a sandbox with caller mounts keeps a skeleton of its own.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tests import template_support
from tests.conftest import require_tier

from moat import Mount, Sandbox
from moat.paths import state_dir
from moat.runtime.gvisor import GvisorRuntime, rootcache

pytestmark = [pytest.mark.gvisor, pytest.mark.timeout(300)]
NAME = "gvrc-debian"
MARKER = "/usr/share/moat-test/gvrc.txt"


@pytest.fixture(scope="module")
def roots() -> Path:
    """A template of its own (so the cache starts empty here): its ``gvisor-roots``."""
    require_tier("gvisor")
    found = template_support.install(NAME, files={MARKER: "gvrc-" + secrets.token_hex(6)})
    folder = found.rootfs.parent / rootcache.ROOTS
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    return folder


def _snapshot(tree: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every entry under ``tree``: mode, owner, size and content (or link target) digest."""
    out: dict[str, tuple[int, int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            elif stat.S_ISREG(st.st_mode) and st.st_mode & 0o444:
                body = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                body = ""
            out[str(p.relative_to(tree))] = (st.st_mode, st.st_uid, st.st_size, body)
    return out


def _workdir(s: Sandbox) -> Path:
    return state_dir() / "gvisor" / s.sandbox_id


def test_concurrent_starts_build_one_skeleton_and_share_it(roots: Path) -> None:
    def start(_: int) -> Sandbox:
        return Sandbox.create(template=NAME, isolation="gvisor", timeout=120)

    with ThreadPoolExecutor(3) as pool:
        boxes = list(pool.map(start, range(3)))
    try:
        built = sorted(roots.iterdir())
        assert len(built) == 1 and not built[0].name.startswith("."), built
        for s in boxes:
            link = _workdir(s) / "bundle" / "rootfs"
            assert link.is_symlink() and link.resolve() == built[0].resolve()
            assert s.commands.run(f"cat {MARKER}").stdout.startswith("gvrc-")
        # shared, so nothing in it may be writable by anyone but root on the host
        for rel, (mode, uid, _, _) in _snapshot(built[0]).items():
            assert uid == 0, rel
            assert stat.S_ISLNK(mode) or not mode & (stat.S_IWGRP | stat.S_IWOTH), rel
    finally:
        for s in boxes:
            s.kill()


HOSTILE = r"""
set +e
echo pwned > /etc/gvrc-canary 2>/dev/null && echo created
echo pwned >> /etc/passwd 2>/dev/null && echo appended
rm -f /etc/hostname 2>/dev/null; test -e /etc/hostname || echo removed
mkdir /gvrc-dir 2>/dev/null && echo mkdir
chmod 777 /etc 2>/dev/null && echo chmod
ln -s /tmp /etc/gvrc-link 2>/dev/null && echo linked
mount -t tmpfs none /etc 2>/dev/null && echo mounted
echo done
"""


def test_root_in_one_sandbox_cannot_change_what_the_next_one_sees(roots: Path) -> None:
    with Sandbox.create(template=NAME, isolation="gvisor", timeout=120) as first:
        shared = (_workdir(first) / "bundle" / "rootfs").resolve()
        before = _snapshot(shared)
        r = first.commands.run(HOSTILE, user="root")
        assert r.stdout.split() == ["done"], r.stdout  # every change refused
        assert first.commands.run("whoami", user="root").stdout.strip() == "root"
    assert _snapshot(shared) == before  # from outside: the tree is what it was
    probe = (
        "(test -e /etc/gvrc-canary || test -e /gvrc-dir || grep -q pwned /etc/passwd) "
        "&& echo seen || echo unseen"
    )
    with Sandbox.create(template=NAME, isolation="gvisor", timeout=120) as later:
        assert (_workdir(later) / "bundle" / "rootfs").resolve() == shared
        assert later.commands.run(probe).stdout == "unseen\n"
        # positive control: what is in the shared skeleton does reach a new sandbox
        planted = shared / "etc" / "gvrc-canary"
        planted.write_text("planted from the host\n")
        planted.chmod(0o644)
        try:
            with Sandbox.create(template=NAME, isolation="gvisor", timeout=120) as seen:
                assert seen.commands.run(probe).stdout == "seen\n"
        finally:
            planted.unlink()


def test_pause_and_resume_find_the_shared_root(roots: Path) -> None:
    s = Sandbox.create(template=NAME, isolation="gvisor", timeout=120)
    try:
        s.files.write("/home/user/kept.txt", "kept")
        s.pause()
        back = Sandbox.connect(s.sandbox_id)
        assert back.files.read("/home/user/kept.txt") == "kept"
        assert back.commands.run(f"cat {MARKER}").stdout.startswith("gvrc-")
        assert (_workdir(back) / "bundle" / "rootfs").is_symlink()
    finally:
        s.kill()


def test_a_sandbox_with_mounts_has_a_skeleton_of_its_own(roots: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("data")
    os.chmod(tmp_path, 0o755)
    os.chmod(tmp_path / "f", 0o644)
    mounts = [Mount(str(tmp_path), "/data")]
    with Sandbox.create(template=NAME, isolation="gvisor", timeout=120, mounts=mounts) as s:
        own = _workdir(s) / "bundle" / "rootfs"
        assert own.is_dir() and not own.is_symlink()
        assert s.commands.run("cat /data/f").stdout == "data"
    assert not any(p.name == "data" for r in roots.iterdir() for p in r.iterdir())


def test_sweep_removes_a_dead_builds_temporary_and_keeps_a_live_one(roots: Path) -> None:
    roots.mkdir(exist_ok=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    gone = roots / f".tmp-{dead}-deadbeef"
    live = roots / f".tmp-{os.getpid()}-cafecafe"
    for d in (gone, live):
        (d / "root" / "etc").mkdir(parents=True)
        (d / "root" / "etc" / "passwd").write_text("x")
    try:
        GvisorRuntime().sweep()
        assert not gone.exists()
        assert live.is_dir()  # a build in flight is not another engine's to remove
    finally:
        subprocess.run(["rm", "-rf", str(gone), str(live)], check=True)
