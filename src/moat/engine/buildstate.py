"""Template builds' status on disk, so that it outlives the server process (issue 12).

Trust domain: host engine. One JSON file per started build in the tenant's own area
(``<templates>/tenants/<tkey>/builds/<buildID>.json``, :mod:`moat.templates.tenant`; another
tenant's build is never read, invariant 11), written atomically when the build starts and
when it ends, with its server process's identity (pid and start time). A record that still
says ``waiting`` or ``building`` while that process is gone belonged to a server that died:
it reads as failed, "interrupted by a restart" (another live server's build is left alone).
The log entries kept are the build's last ``KEEP_ENTRIES`` (already guarded when recorded).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moat.templates.tenant import TenantTemplates

__all__ = [
    "INTERRUPTED",
    "KEEP_ENTRIES",
    "KEEP_PER_TENANT",
    "load",
    "orphaned",
    "owner",
    "save",
    "unfinished",
]

#: Log entries kept on disk per build (the last ones: the failing step's output is there).
KEEP_ENTRIES = 1000
#: Finished builds' records kept per tenant (the oldest go).
KEEP_PER_TENANT = 200
#: A build whose server died under it.
INTERRUPTED = "the build was interrupted by a restart of the server"
_BUILD_ID = re.compile(r"bld-[0-9a-f]{24}")
_MAX_FILE = 16 << 20


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22: starttime
    except (OSError, IndexError):
        return None


def owner() -> str:
    """This process, as a record names it: ``pid:starttime``."""
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def orphaned(record: dict[str, Any]) -> bool:
    """Whether ``record`` is unfinished and the process that ran it is gone."""
    if record.get("status") not in ("waiting", "building"):
        return False
    pid, _, started = str(record.get("owner", "")).partition(":")
    if not pid.isdigit():
        return True
    return _start_time(int(pid)) != started


def _dir(tenant: TenantTemplates) -> Path:
    d = tenant.root / "builds"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def save(tenant: TenantTemplates, record: dict[str, Any]) -> None:
    """Write ``record`` (``buildID``, ``templateID``, ``status``, …; ``entries`` trimmed to
    the last ``KEEP_ENTRIES``, ``first`` the index of the first one kept)."""
    build_id = str(record["buildID"])
    if not _BUILD_ID.fullmatch(build_id):
        raise ValueError("bad build id")
    entries = list(record.get("entries") or [])
    cut = max(0, len(entries) - KEEP_ENTRIES)
    data = {
        **record,
        "entries": entries[cut:],
        "first": int(record.get("first", 0)) + cut,
        "owner": owner(),
    }
    d = _dir(tenant)
    path = d / f"{build_id}.json"
    tmp = d / f".{build_id}.{secrets.token_hex(4)}"
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)
    if data.get("status") in ("ready", "error"):
        _prune(d)


def _prune(d: Path) -> None:
    files = sorted(d.glob("bld-*.json"), key=lambda p: p.stat().st_mtime_ns)
    for old in files[: max(0, len(files) - KEEP_PER_TENANT)]:
        with contextlib.suppress(OSError):
            old.unlink()


def load(tenant: TenantTemplates, build_id: str) -> dict[str, Any] | None:
    """The record of the tenant's build ``build_id`` as saved, or None (unknown, unreadable
    or not this tenant's: another tenant's area is never looked in)."""
    if not isinstance(build_id, str) or not _BUILD_ID.fullmatch(build_id):
        return None
    path = tenant.root / "builds" / f"{build_id}.json"
    try:
        if path.stat().st_size > _MAX_FILE:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("buildID") != build_id:
        return None
    return data


def unfinished(tenants: Path) -> Iterator[dict[str, Any]]:
    """Every record under ``tenants`` (``<templates>/tenants``) still ``waiting`` or
    ``building`` whose server process is gone (:func:`orphaned`)."""
    for path in sorted(tenants.glob("*/builds/bld-*.json")):
        try:
            if path.stat().st_size > _MAX_FILE:
                continue
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and orphaned(data) and data.get("buildID") == path.stem:
            yield data
