"""The I/O half of :mod:`moat.runtime.rootlayout`: list a template root's directories that
hold a moat-owned path, and plan the sandbox's ``/`` from them (cached per root).

Trust domain: host engine. The template's root was checked by the engine before use
(:mod:`moat.templates.check`); an entry that is neither a directory, a regular file nor a
symlink is refused here again (invariant 7: never mounted, whatever the check missed).
"""

from __future__ import annotations

import functools
import os
import stat

from moat.errors import InvalidArgumentError
from moat.runtime.rootlayout import Entry, Op, ancestors, plan

__all__ = ["ops_for"]


def _entries(path: str) -> tuple[Entry, ...] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    out = []
    with os.scandir(path) as it:
        for e in it:
            if e.is_symlink():
                out.append(Entry(e.name, "link", os.readlink(e.path)))
            elif e.is_dir(follow_symlinks=False):
                out.append(Entry(e.name, "dir"))
            elif e.is_file(follow_symlinks=False):
                out.append(Entry(e.name, "file"))
            else:
                raise InvalidArgumentError("the template's root holds a device node or socket")
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _cached(rootfs: str, ident: tuple[int, int, int], owned: tuple[str, ...]) -> tuple[Op, ...]:
    del ident  # part of the cache key only: a root replaced in place is listed again
    listing = {}
    for rel in ancestors(owned):
        found = _entries(os.path.join(rootfs, rel) if rel else rootfs)
        if found is not None:
            listing[rel] = found
    return tuple(plan(listing, owned))


def ops_for(rootfs: str, owned: tuple[str, ...]) -> tuple[Op, ...]:
    """The operations that show the template root ``rootfs`` at ``/`` around ``owned``."""
    st = os.lstat(rootfs)
    return _cached(rootfs, (st.st_dev, st.st_ino, st.st_mtime_ns), tuple(sorted(owned)))
