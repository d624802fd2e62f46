"""Checks on a built template's root before any sandbox runs on it (issue 12).

Trust domain: host engine. A template's root was written by a build whose steps ran untrusted
code, so the engine checks it before every tier uses it: the agent's interpreter is there
(``/usr/bin/python3``: the agent is stdlib Python), the merged-/usr layout the tiers rely on,
and no device node, socket or fifo anywhere (every tier mounts it nodev anyway; a device node
in a template is a broken or hostile build, refused rather than hidden: invariant 7).
Messages name paths inside the template only, never the host's (invariant 8).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from moat.errors import InvalidArgumentError

__all__ = ["PYTHON", "check_root"]

#: The interpreter every tier starts the agent with.
PYTHON = "usr/bin/python3"
#: The oldest Python the agent runs on (pyproject's requires-python).
MIN_MINOR = 11
#: Entries scanned at most (a template root with more is refused: a bound on the check's cost).
MAX_ENTRIES = 2_000_000


def check_root(rootfs: Path, name: str) -> None:
    """Raise InvalidArgumentError saying what is wrong with the template root at ``rootfs``."""
    shown = name[:64]
    try:
        st = os.lstat(rootfs)
    except OSError:
        raise InvalidArgumentError(f"template {shown!r} has no root filesystem") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgumentError(f"template {shown!r}: its root is not a directory")
    # python3 is a symlink to python3.11 in Debian: resolve it inside the root, not the host's
    final = _file_inside(rootfs, PYTHON)
    if final is None:
        raise InvalidArgumentError(
            f"template {shown!r} has no /{PYTHON} (the sandbox agent needs Python 3)"
        )
    # Never run on the host (it is the template's code): its name tells the version Debian's
    # way (python3 -> python3.11); other names are let through and tried in the sandbox.
    version = re.fullmatch(r"python3\.(\d+)", final)
    if version and int(version.group(1)) < MIN_MINOR:
        raise InvalidArgumentError(
            f"template {shown!r} has Python 3.{version.group(1)}; the sandbox agent needs "
            f"3.{MIN_MINOR} or newer"
        )
    bad = _special_entry(rootfs)
    if bad is not None:
        raise InvalidArgumentError(
            f"template {shown!r} contains a device node, socket or fifo at /{bad}; "
            "templates may hold regular files, directories and symlinks only"
        )


def _file_inside(rootfs: Path, rel: str, hops: int = 16) -> str | None:
    """The name of the regular file ``rel`` resolves to, its symlinks resolved within
    ``rootfs`` (never the host's), or None if it is not one."""
    parts = [p for p in rel.split("/") if p]
    here: list[str] = []
    while parts and hops > 0:
        part = parts.pop(0)
        if part == "..":
            if here:
                here.pop()
            continue
        path = rootfs.joinpath(*here, part)
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            hops -= 1
            target = os.readlink(path)
            if target.startswith("/"):
                here = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        if parts and not stat.S_ISDIR(st.st_mode):
            return None
        if not parts:
            return part if stat.S_ISREG(st.st_mode) else None
        here.append(part)
    return None


def _special_entry(rootfs: Path) -> str | None:
    """The first device node, socket or fifo under ``rootfs`` (relative path), or None."""
    count = 0
    stack = [rootfs]
    while stack:
        top = stack.pop()
        with os.scandir(top) as it:
            for e in it:
                count += 1
                if count > MAX_ENTRIES:
                    raise InvalidArgumentError("template root has too many files to check")
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif not (e.is_file(follow_symlinks=False) or e.is_symlink()):
                    return os.path.relpath(e.path, rootfs)
    return None
