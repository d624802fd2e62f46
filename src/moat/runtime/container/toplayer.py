"""Pure planner: the small layer moat lays over a template's root (container tier, issue 12).

Trust domain: host engine. No I/O. A template's root reaches bubblewrap as ONE read-only
overlay at ``/`` (``mountns.Staged.enter`` mounts it in the spawn's child): its upper lower
layer is this plan, written on the child's staging tmpfs; the template's root is beneath. It
replaces a bind per template entry (~100 ``--ro-bind`` on the default template, each of which
makes bwrap re-read its mount table: ~22 ms CPU per create, measured).

The layer makes the same sandbox ``/`` as :func:`moat.runtime.rootlayout.plan` (which still
validates the template's layout first): paths moat owns are never the template's (invariant 1).

* ``opaque``: an empty directory that hides the template's one entirely (trusted.overlay.opaque
  on a lower layer: overlayfs then looks no deeper); moat mounts over it (``/proc``, ``/dev``,
  ``/tmp``, ``/home/user``);
* ``whiteout``: the template's entry is not there at all (``/sys``: never mounted);
* ``tree``: an opaque directory filled with one of moat's snapshots (the agent at
  ``AGENT_DIR``): nothing of the template's directory shows through to shadow a module;
* ``file``: one file of moat's ``etc`` snapshot (``/etc/passwd``...): the template's is hidden;
* ``point``: an empty file a caller's file mount lands on; ``dir``: a directory that merges
  with the template's (a parent of the above, or a caller's directory mount point).

Every entry is read-only (the overlay is mounted read-only, bwrap remounts ``/`` read-only).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from moat.errors import InvalidArgumentError
from moat.runtime.spec import AGENT_DIR, HOME

__all__ = ["TopOp", "plan_top"]

Kind = Literal["dir", "opaque", "whiteout", "tree", "file", "point"]


@dataclass(frozen=True)
class TopOp:
    """One entry of the layer at ``path`` (relative, no leading slash); ``src``: the snapshot
    (``tree``) or the entry of the ``etc`` snapshot (``file``) it is made from."""

    op: Kind
    path: str
    src: str = ""


#: Directories moat mounts over: none of the template's entries below them may show.
OPAQUE = ("proc", "dev", "tmp", HOME.strip("/"))
#: Not in the sandbox at all (as with the host's /usr).
ABSENT = ("sys",)
#: moat's synthetic /etc files: (sandbox path, entry of the ``etc`` snapshot); keep in step
#: with bwrap.SYNTHETIC_ETC and bwrap.OWNED.
FILES = (
    ("etc/passwd", "passwd"),
    ("etc/group", "group"),
    ("etc/hostname", "hostname"),
    ("etc/hosts", "hosts"),
    ("etc/resolv.conf", "resolv.conf"),
    ("etc/nsswitch.conf", "nsswitch.conf"),
    ("etc/ssh/ssh_config", "ssh_config"),
)
#: moat's trees: (sandbox path, snapshot name).
TREES = ((AGENT_DIR.strip("/"), "agent"),)


def _norm(path: str) -> str:
    parts = [p for p in path.split("/") if p and p != "."]
    if not parts or ".." in parts:
        raise InvalidArgumentError("bad sandbox path")
    return "/".join(parts)


@functools.lru_cache(maxsize=64)
def plan_top(mounts: tuple[tuple[str, bool], ...] = ()) -> tuple[TopOp, ...]:
    """The layer for a sandbox whose caller mounts ``(sandbox_path, is_dir)``: parents first,
    each path once. A mount point under a path moat owns is refused (its own check first:
    ``model.config.Mount`` refuses those already; this is the second layer, invariant 7)."""
    ops: list[TopOp] = []
    made: dict[str, Kind] = {}

    def parents(path: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            p = "/".join(parts[:i])
            kind = made.get(p)
            if kind is None:
                made[p] = "dir"
                ops.append(TopOp("dir", p))
            elif kind not in ("dir", "opaque"):
                raise InvalidArgumentError("a mount lands below a path moat owns")

    def add(op: TopOp) -> None:
        parents(op.path)
        if op.path in made:
            raise InvalidArgumentError("a mount lands on a path moat owns")
        made[op.path] = op.op
        ops.append(op)

    for path in OPAQUE:
        add(TopOp("opaque", path))
    for path in ABSENT:
        add(TopOp("whiteout", path))
    for path, src in TREES:
        add(TopOp("tree", path, src))
    for path, src in FILES:
        add(TopOp("file", path, src))
    for sandbox_path, is_dir in mounts:
        path = _norm(sandbox_path)
        if any(path == o or path.startswith(o + "/") for o in OPAQUE):
            # bwrap mounts a tmpfs there first and makes the point in it (writable, its own)
            continue
        if path in made and made[path] == "dir" and is_dir:
            continue  # already a parent of another mount: the same directory
        add(TopOp("dir" if is_dir else "point", path))
    return tuple(ops)
