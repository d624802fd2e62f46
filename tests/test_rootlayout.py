"""The pure planner of a template's root around moat's own paths, the root checks, and the
microVM image cache (issue 12)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Final

import pytest

from moat.errors import InvalidArgumentError
from moat.runtime.container import bwrap
from moat.runtime.microvm import rootimage
from moat.runtime.rootlayout import Entry, Op, ancestors, plan
from moat.runtime.spec import SandboxSpec
from moat.templates.check import check_root

D: Final = "dir"
F: Final = "file"
LISTING = {
    "": (
        Entry("usr", D), Entry("bin", "link", "usr/bin"), Entry("etc", D), Entry("home", D),
        Entry("tmp", D), Entry("proc", D), Entry("dev", D), Entry("opt", D), Entry("var", D),
    ),
    "etc": (Entry("passwd", F), Entry("os-release", F), Entry("ssl", D)),
    "home": (),
    "opt": (Entry("tool", D),),
}  # fmt: skip
OWNED = ("proc", "dev", "tmp", "/home/user", "/opt/moat", "etc/passwd", "etc/ssh/ssh_config")


def test_plan_binds_the_template_around_moats_paths() -> None:
    assert ancestors(OWNED) == ["", "etc", "etc/ssh", "home", "opt"]
    assert plan(LISTING, OWNED) == [
        Op("link", "bin", "link", "usr/bin"),
        Op("dir", "etc"),
        Op("bind", "etc/os-release", F),
        Op("bind", "etc/ssl", D),  # etc/passwd: moat's own, never the template's
        Op("dir", "home"),
        Op("dir", "opt"),
        Op("bind", "opt/tool", D),
        Op("bind", "usr", D),
        Op("bind", "var", D),
    ]  # proc, dev, tmp: moat mounts its own


def test_plan_refuses_a_symlink_where_moat_needs_a_directory() -> None:
    listing = {"": (Entry("etc", "link", "/elsewhere"),)}
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        plan(listing, ("etc/passwd",))
    with pytest.raises(InvalidArgumentError):
        plan({"": (Entry("../x", D),)}, ())


def test_bwrap_binds_the_template_root_not_the_hosts_usr() -> None:
    spec = SandboxSpec(
        sandbox_id="sbx-0000", tier="container", rootfs="/t/rootfs", template_id="a" * 64
    )
    host = bwrap.HostLayout(
        agent_dir="/A", etc_dir="/E", seccomp_fd=9, root_ops=tuple(plan(LISTING, OWNED))
    )
    argv = bwrap.build_argv(spec, host, ["agent"])
    joined = " ".join(argv)
    assert "--ro-bind /usr /usr" not in joined  # positive control below: host mode has it
    assert "--ro-bind /t/rootfs/usr /usr" in joined
    assert "--symlink usr/bin /bin" in joined
    assert "--ro-bind /etc/ld.so.cache" not in joined  # no host /etc entry on a template
    assert "--ro-bind /E/passwd /etc/passwd" in joined
    host_argv = " ".join(bwrap.build_argv(spec.__class__("sbx-0000", "container"), host, ["a"]))
    assert "--ro-bind /usr /usr" in host_argv and "/t/rootfs" not in host_argv


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python3.11").write_text("")
    os.symlink("python3.11", root / "usr/bin/python3")
    os.symlink("usr/bin", root / "bin")
    return root


def test_check_root(tmp_path: Path) -> None:
    root = _root(tmp_path)
    check_root(root, "t")  # python3 -> python3.11, resolved inside the root
    (root / "usr/bin/python3").unlink()
    os.symlink("/usr/bin/python3.11", root / "usr/bin/python3")  # absolute: inside too
    check_root(root, "t")
    (root / "usr/bin/python3").unlink()
    os.symlink("../../../../../../usr/bin/nope", root / "usr/bin/python3")
    with pytest.raises(InvalidArgumentError, match="no /usr/bin/python3"):
        check_root(root, "t")
    (root / "usr/bin/python3").unlink()
    os.symlink("python3.11", root / "usr/bin/python3")
    (root / "usr/bin/python3.9").write_text("")
    (root / "usr/bin/python3").unlink()
    os.symlink("python3.9", root / "usr/bin/python3")
    with pytest.raises(InvalidArgumentError, match=r"has Python 3\.9; .* needs 3\.11"):
        check_root(root, "t")
    (root / "usr/bin/python3").unlink()
    os.symlink("python3.11", root / "usr/bin/python3")
    os.mkfifo(root / "usr/fifo")
    with pytest.raises(InvalidArgumentError, match="at /usr/fifo"):
        check_root(root, "t")
    os.unlink(root / "usr/fifo")
    os.mknod(root / "dev0", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    with pytest.raises(InvalidArgumentError, match="device node"):
        check_root(root, "t")


def test_microvm_image_is_built_once_under_concurrent_first_use(tmp_path: Path) -> None:
    root = _root(tmp_path)
    (root / "usr/share").mkdir()
    (root / "usr/share/f").write_text("x" * 10000)
    results: list[tuple[Path, str]] = []
    threads = [
        threading.Thread(target=lambda: results.append(rootimage.ensure(root))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # one build: mke2fs writes a random UUID, so two builds would give two digests
    assert len(results) == 4 and len(set(results)) == 1
    image, digest = results[0]
    assert image == tmp_path / rootimage.IMAGE and len(digest) == 64
    inode = image.stat().st_ino
    assert rootimage.ensure(root) == (image, digest) and image.stat().st_ino == inode  # cached
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []  # atomic


def test_sweep_removes_what_a_crashed_build_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOAT_STATE_DIR", str(tmp_path))
    tdir = tmp_path / "templates" / ("a" * 64)
    (tdir / rootimage.SNAPSHOTS).mkdir(parents=True)
    dead = 2**22 + 12345  # above pid_max's default: no such process
    left = [
        tdir / f".{rootimage.IMAGE}.tmp-{dead}",
        tdir / rootimage.SNAPSHOTS / f".tmp-{dead}-k.bin",
    ]
    mine = tdir / f".{rootimage.IMAGE}.tmp-{os.getpid()}"  # a live build: kept
    kept = tdir / rootimage.IMAGE
    for p in [*left, mine, kept]:
        p.write_bytes(b"x")
    assert rootimage.sweep() == 2
    assert not any(p.exists() for p in left) and mine.exists() and kept.exists()
