"""The light user-namespace holder (``unshare --user cat``, no fork of the engine: userns.py).

It maps the ids it was given, and a holder that cannot start or dies before it echoes fails
closed with a typed error and leaves no process behind (checked from the host). That nothing
inside can make a user namespace (``max_user_namespaces`` 0, written by ``userns.enter``) is
checked in a real sandbox by test_users_container's root probes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.conftest import require_tier

from moat.errors import IsolationUnavailableError
from moat.runtime.container import userns
from moat.runtime.container.driver import SANDBOX_HOST_GID, UID_BASE

ROOT_ID, USER_ID = UID_BASE + 4711, UID_BASE + 4712


def _kids() -> set[int]:
    me = str(os.getpid())
    out = set()
    for d in Path("/proc").iterdir():
        try:
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                out.add(int(d.name))
        except (OSError, IndexError):
            continue
    return out


def test_the_light_holder_maps_the_ids() -> None:
    require_tier("container")
    h = userns.Holder((), [(0, ROOT_ID, 1), (1000, USER_ID, 1)], [(0, ROOT_ID, 1)])
    try:
        pid = h.popen.pid
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "cat"
        uid_map = Path(f"/proc/{pid}/uid_map").read_text().split()
        assert uid_map == ["0", str(ROOT_ID), "1", "1000", str(USER_ID), "1"]
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        assert h.fd >= 0
    finally:
        h.close()
    assert h.popen.returncode is not None and pid not in _kids()


@pytest.mark.parametrize("fault", ["no-unshare", "no-echo", "maps"])
def test_a_holder_that_fails_fails_closed(fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tier("container")
    gids = [(0, ROOT_ID, 1), (1000, SANDBOX_HOST_GID, 1)]
    uids = [(0, ROOT_ID, 1), (1000, USER_ID, 1)]
    if fault == "no-unshare":
        monkeypatch.setattr(userns, "_UNSHARE", "/nonexistent/unshare")
    elif fault == "no-echo":
        monkeypatch.setattr(userns, "_CAT", "/bin/true")  # exits without echoing
    else:
        uids = [(0, ROOT_ID, 1), (1000, ROOT_ID, 1)]  # overlapping: the kernel refuses
    before = _kids()
    with pytest.raises(IsolationUnavailableError) as err:
        userns.Holder((), uids, gids)
    assert "/nonexistent" not in str(err.value)  # invariant 8
    assert _kids() - before == set()
