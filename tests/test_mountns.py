"""The container tier's copy of moat's own trees (mountns.snapshot / _write_tree), no sandbox.

The copy is what keeps the state dir's path out of a sandbox's mountinfo (issue 17 §4); the
sandbox-level check is ``test_containment.test_host_paths_are_hidden_from_mountinfo``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moat.errors import IsolationUnavailableError
from moat.runtime.container import mountns


def test_copy_keeps_content_modes_and_mtimes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg" / "__pycache__").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("x = 1\n")
    (src / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"\0" * 70_000)
    os.chmod(src / "pkg" / "a.py", 0o644)
    os.utime(src / "pkg" / "a.py", ns=(1, 1_600_000_000_123_456_789))
    old = os.umask(0o077)  # the copy must not depend on the engine's umask
    try:
        mountns._write_tree(str(tmp_path / "dst"), mountns.snapshot(str(src)))
    finally:
        os.umask(old)
    dst = tmp_path / "dst"
    assert (dst / "pkg" / "a.py").read_text() == "x = 1\n"
    assert (dst / "pkg" / "__pycache__" / "a.pyc").read_bytes() == b"\0" * 70_000
    # a .pyc is valid only for its source's mtime: a copy with a new one compiles every start
    assert (dst / "pkg" / "a.py").stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert (dst / "pkg" / "a.py").stat().st_mode & 0o777 == 0o644
    assert dst.stat().st_mode & 0o777 == 0o755
    assert (dst / "pkg").stat().st_mode & 0o777 == (src / "pkg").stat().st_mode & 0o777


def test_snapshot_refuses_what_is_not_a_file_or_dir(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/etc/shadow")
    with pytest.raises(IsolationUnavailableError) as err:
        mountns.snapshot(str(tmp_path))
    assert str(tmp_path) not in str(err.value)  # invariant 8
