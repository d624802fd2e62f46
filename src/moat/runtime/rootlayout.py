"""Pure planner: a template's root as the sandbox's ``/``, around the paths moat mounts itself.

Trust domain: host engine. No I/O: the driver lists the few template directories that hold a
path moat owns (``/``, ``/etc``, ``/home``...) and passes them in. The result is the list of
operations a tier performs on an otherwise empty, read-only root (bwrap's tmpfs ``/``, gVisor's
skeleton): bind each template entry read-only at the same path, recreate its symlinks, and
make a directory where a template directory holds a moat-owned path below it. Paths moat owns
(``/proc``, ``/dev``, ``/tmp``, ``/home/user``, the agent, the synthetic ``/etc`` files...) are
never taken from the template: moat's own always win (invariant 1: a template cannot replace
the sandbox's passwd, hosts, resolv.conf or ssh_config, nor cover moat's machinery).
Golden-tested (``tests/test_rootlayout.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from moat.errors import InvalidArgumentError

__all__ = ["Entry", "Op", "ancestors", "plan"]

Kind = Literal["dir", "file", "link"]


@dataclass(frozen=True)
class Entry:
    """One directory entry of the template's root (``target``: a symlink's)."""

    name: str
    kind: Kind
    target: str = ""


@dataclass(frozen=True)
class Op:
    """``bind``: the template's ``path`` read-only at ``/path``; ``link``: a symlink to
    ``target``; ``dir``: an empty directory (moat mounts something below it)."""

    op: Literal["bind", "link", "dir"]
    path: str  # relative to /, no leading slash
    kind: Kind = "dir"
    target: str = ""


def _norm(path: str) -> str:
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise InvalidArgumentError("bad sandbox path")
    return "/".join(parts)


def ancestors(owned: Iterable[str]) -> list[str]:
    """The directories (relative; ``""`` is ``/``) whose listing :func:`plan` needs."""
    out: set[str] = {""}
    for path in owned:
        parts = _norm(path).split("/")
        out.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(out)


def plan(listing: Mapping[str, tuple[Entry, ...]], owned: Iterable[str]) -> list[Op]:
    """The operations that show the template's root, minus ``owned`` paths, at ``/``.

    ``listing`` maps each of :func:`ancestors` that exists in the template as a real directory
    to its entries. A template symlink where moat needs a directory (``/etc`` -> elsewhere)
    is refused: moat's paths must be where moat puts them.
    """
    mine = {_norm(p) for p in owned}
    ops: list[Op] = []

    def walk(top: str) -> None:
        for e in sorted(listing.get(top, ()), key=lambda x: x.name):
            if "/" in e.name or e.name in ("", ".", ".."):
                raise InvalidArgumentError("bad entry in the template's root")
            path = f"{top}/{e.name}" if top else e.name
            if path in mine:
                continue  # moat mounts its own thing here
            if not any(o.startswith(path + "/") for o in mine):
                if e.kind == "link":
                    ops.append(Op("link", path, "link", e.target))
                else:
                    ops.append(Op("bind", path, e.kind))
                continue
            if e.kind != "dir":
                raise InvalidArgumentError(
                    f"the template's /{path[:200]} is not a directory; moat mounts below it"
                )
            ops.append(Op("dir", path))
            walk(path)

    walk("")
    return ops
