"""File metadata (``user.e2b.*`` extended attributes) on each tier's filesystem.

A tier whose sandbox filesystem stores user extended attributes round-trips metadata; one
that can't (the microVM guest's 6.1 tmpfs has no ``user.*`` attributes) refuses the write
with a PolicyError that says so, never a write that quietly drops it (invariant 7). Either
way a write without metadata works. Checked from outside: what the front door reads back.
"""

from __future__ import annotations

import pytest

from moat.engine.api import FrontDoor
from moat.engine.engine import DEFAULT_TENANT
from moat.errors import PolicyError

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

#: Tiers whose sandbox home is known to store user xattrs on this host's kernel (>= 6.6
#: tmpfs: container; gVisor's own tmpfs). The microVM guest kernel is 6.1.
_STORES = {"container": True, "gvisor": True, "microvm": False}


async def test_metadata_round_trips_or_is_refused_clearly(tier: str) -> None:
    door = FrontDoor()
    info = await door.create(DEFAULT_TENANT, door.resolve(isolation=tier, timeout=180))
    sid = info.sandbox_id
    try:
        plain = await door.write_file(DEFAULT_TENANT, sid, "plain.txt", b"p", metadata={})
        assert plain.metadata is None
        meta = {"author": "mish", "purpose": "test"}
        try:
            entry = await door.write_file(DEFAULT_TENANT, sid, "m.txt", b"m", metadata=meta)
        except PolicyError as exc:
            assert not _STORES[tier], f"{tier} refused metadata: {exc}"
            assert "extended attributes" in str(exc)
            return
        assert _STORES[tier], f"{tier} was expected to refuse metadata"
        assert entry.metadata == meta
        assert (await door.stat(DEFAULT_TENANT, sid, "m.txt")).metadata == meta
        moved = await door.move(DEFAULT_TENANT, sid, "m.txt", "n.txt")
        assert moved.metadata == meta
        cleared = await door.write_file(DEFAULT_TENANT, sid, "n.txt", b"again", metadata={})
        assert cleared.metadata is None
        await door.write_file(DEFAULT_TENANT, sid, "n.txt", b"y", metadata=meta)
        kept = await door.write_file(DEFAULT_TENANT, sid, "n.txt", b"x", metadata=None)
        assert kept.metadata == meta  # None: the file's metadata is left as it is
    finally:
        await door.kill(DEFAULT_TENANT, sid)
