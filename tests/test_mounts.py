"""Host mounts on every tier, as a new user makes them (issue 17 §6).

The common case when moat runs as root: the caller's project lives under a 0700 parent
(``/root/project``). The engine opens it as root; the sandbox reads it, cannot write it, and
the host copy is unchanged — all checked from outside. A source the sandbox cannot use is a
typed error naming only what the caller passed (invariants 7, 8).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from moat import InvalidArgumentError, Mount, PolicyError, Sandbox


def _tree(root: Path) -> dict[str, str]:
    """Every file below ``root`` with a digest of its contents (the host's view)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def private_project() -> Iterator[tuple[Path, str]]:
    """``<0700 parent>/project`` holding a canary file and a subdirectory, all writable by
    anyone: only the read-only mount can stop a write (EROFS, not EACCES)."""
    parent = Path(tempfile.mkdtemp(prefix="moat-private-", dir="/root"))
    os.chmod(parent, 0o700)
    project = parent / "project"
    (project / "sub").mkdir(parents=True)
    canary = "canary-" + secrets.token_hex(12)
    (project / "canary.txt").write_text(canary)
    (project / "sub" / "data.bin").write_bytes(secrets.token_bytes(3000))
    for d in (project, project / "sub"):
        os.chmod(d, 0o777)
    for f in (project / "canary.txt", project / "sub" / "data.bin"):
        os.chmod(f, 0o666)
    yield project, canary
    shutil.rmtree(parent)


def test_readonly_mount_under_a_0700_parent(tier: str, private_project: tuple[Path, str]) -> None:
    project, canary = private_project
    assert os.stat(project.parent).st_mode & 0o777 == 0o700  # the case being tested
    before = _tree(project)
    with Sandbox.create(
        isolation=tier, timeout=120, mounts=[Mount(str(project), "/data/project")]
    ) as s:
        assert s.files.read("/data/project/canary.txt") == canary
        size = s.commands.run("wc -c < /data/project/sub/data.bin").stdout.strip()
        assert size == "3000"
        # writes fail, whatever the way in: new file, overwrite, delete, mkdir
        probe = (
            "for c in 'echo x > /data/project/new.txt' 'echo x > /data/project/canary.txt'"
            " 'rm -f /data/project/sub/data.bin' 'mkdir /data/project/d'; do"
            ' sh -c "$c" 2>/dev/null && echo WROTE; done; echo checked'
        )
        out = s.commands.run(probe).stdout
        assert "checked" in out and "WROTE" not in out, out
        err = s.commands.run("touch /data/project/x 2>&1; true").stdout
        assert "Read-only file system" in err, err
        # positive control: the same write works on the sandbox's own disk
        assert s.commands.run("echo x > /home/user/new.txt && echo ok").stdout == "ok\n"
    assert _tree(project) == before  # the host copy is unchanged


def test_unusable_mount_sources_are_typed_errors(
    tier: str, private_project: tuple[Path, str]
) -> None:
    project, _ = private_project
    missing = str(project / "nope")
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        Sandbox.create(isolation=tier, timeout=60, mounts=[Mount(missing, "/data/x")])
    fifo = project / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidArgumentError, match="directory or a file"):
        Sandbox.create(isolation=tier, timeout=60, mounts=[Mount(str(fifo), "/data/x")])
    closed = project / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(PolicyError, match="not readable") as info:
        Sandbox.create(isolation=tier, timeout=60, mounts=[Mount(str(closed), "/data/x")])
    assert str(project.parent.parent) + "/" not in str(info.value).replace(str(closed), "")


@pytest.mark.microvm
def test_microvm_mounts_are_capped_copies(private_project: tuple[Path, str]) -> None:
    """The microVM copies a mount in at start: capped by disk_mb, read-only directories only,
    and no image of it is left on the host (it is unlinked before QEMU starts)."""
    from tests.conftest import require_tier

    from moat import Limits
    from moat.runtime.microvm import artifacts

    require_tier("microvm")
    project, canary = private_project
    (project / "big.bin").write_bytes(secrets.token_bytes(3 << 20))
    with pytest.raises(PolicyError, match="at most 2 MiB"):
        Sandbox.create(
            isolation="microvm", limits=Limits(disk_mb=2), mounts=[Mount(str(project), "/d")]
        )
    with pytest.raises(PolicyError, match="directories only"):
        Sandbox.create(isolation="microvm", mounts=[Mount(str(project / "canary.txt"), "/d")])
    with pytest.raises(PolicyError, match="read-only"):
        Sandbox.create(isolation="microvm", mounts=[Mount(str(project), "/d", read_only=False)])
    with Sandbox.create(isolation="microvm", mounts=[Mount(str(project), "/d")]) as s:
        assert s.files.read("/d/canary.txt") == canary  # positive control: under the cap
        images = artifacts.root() / "mounts"
        assert not [p for p in images.iterdir() if f"-{os.getpid()}-" in p.name]


def test_microvm_image_never_opens_a_guest_owned_secret(tmp_path: Path) -> None:
    """The image keeps host owners and the guest's user is uid/gid 1000: a host file of uid
    or gid 1000 that others may not read is refused, not copied in readable (built without a
    VM: the image is the whole question)."""
    import os

    from moat.errors import PolicyError
    from moat.model import Mount
    from moat.runtime.microvm import mountimg

    project = tmp_path / "proj"
    project.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(project, 0o755)
    secret = project / ".env"
    secret.write_text("TOKEN=host-only\n")
    os.chown(secret, 1000, 1000)
    mount = (Mount(str(project), "/data", read_only=True),)
    for mode in (0o600, 0o640):
        os.chmod(secret, mode)
        with pytest.raises(PolicyError, match=r"'\.env'"):
            mountimg.build(mount, 64)
    os.chmod(secret, 0o644)  # positive control: readable by others, so it is copied in
    for fd in mountimg.build(mount, 64):
        os.close(fd)


def test_host_uid_1000_entries_give_the_sandbox_no_more_than_others(
    tier: str, tmp_path: Path
) -> None:
    """gVisor's gofer and the microVM image keep host owners, and inside both the sandbox's
    user is uid/gid 1000: a host entry of uid or gid 1000 whose owner or group bits give more
    than "other" is refused there (one rule, ``moat.runtime.mounts.beyond_others``; on a
    writable mount the write bit counts too). The container tier maps its user to a random
    host uid, so only the "other" bits apply: the entry is mounted and stays unreadable.
    Canary checked from inside, host copy from outside; positive control: the same entry
    made readable by others is mounted and read on every tier."""
    project = tmp_path / "proj"
    project.mkdir()
    os.chmod(project, 0o755)
    (project / "pub.txt").write_text("public")
    os.chmod(project / "pub.txt", 0o644)
    canary = "canary-" + secrets.token_hex(12)
    secret = project / "secret.txt"
    secret.write_text(canary)
    keeps_owners = tier in ("gvisor", "microvm")
    for owner, mode in (((1000, 1000), 0o600), ((0, 1000), 0o640)):
        os.chown(secret, *owner)
        os.chmod(secret, mode)
        mount = Mount(str(project), "/data/proj")
        if keeps_owners:
            with pytest.raises(PolicyError, match=r"'secret\.txt'.*uid or gid 1000"):
                Sandbox.create(isolation=tier, timeout=60, mounts=[mount])
            continue
        with Sandbox.create(isolation=tier, timeout=60, mounts=[mount]) as s:
            assert s.files.read("/data/proj/pub.txt") == "public"
            out = s.commands.run("cat /data/proj/secret.txt 2>&1 || true").stdout
            assert canary not in out and "Permission denied" in out
    if tier == "gvisor":
        # writable: an entry others may read but only its owner (host uid 1000) may write
        os.chown(secret, 1000, 1000)
        os.chmod(secret, 0o644)
        rw = Mount(str(project), "/data/proj", read_only=False)
        with pytest.raises(PolicyError, match=r"'secret\.txt'.*write"):
            Sandbox.create(isolation=tier, timeout=60, mounts=[rw])
    # positive control: readable by others, the same entry is mounted and read (read-only)
    os.chown(secret, 1000, 1000)
    os.chmod(secret, 0o644)
    with Sandbox.create(
        isolation=tier, timeout=60, mounts=[Mount(str(project), "/data/proj")]
    ) as s:
        assert s.files.read("/data/proj/secret.txt") == canary
        s.commands.run("echo x >> /data/proj/secret.txt 2>/dev/null || true")
    assert secret.read_text() == canary  # unchanged on the host
