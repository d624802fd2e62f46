"""What a built template is on disk, and how the engine finds one by name or id (issue 12).

Layout under ``<state dir>/templates/``::

    <id>/template.json     settings (TemplateRef fields but ``rootfs``), written last
    <id>/rootfs/           the root filesystem, read-only in every sandbox
    names/<name>           a symlink to ``../<id>``

``<id>`` is the content hash of the template's definition (hex, 64 characters). A directory
without ``template.json`` is an unfinished build and is never used. ``host`` is not on disk: it
names today's behaviour (the host's ``/usr`` read-only) and only when asked for explicitly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from moat.errors import InvalidArgumentError
from moat.paths import state_dir

#: The template that is the host's own ``/usr`` (the behaviour before templates).
HOST = "host"

_ID = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


@dataclass(frozen=True)
class TemplateRef:
    """A built template: where its root is and how a sandbox of it starts."""

    id: str
    name: str
    rootfs: Path
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/home/user"
    user: str = "user"
    start_cmd: str | None = None
    ready_cmd: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


def root() -> Path:
    """The templates directory."""
    return state_dir() / "templates"


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid template name or id, else raise InvalidArgumentError."""
    if not isinstance(name, str) or not (_NAME.fullmatch(name) or _ID.fullmatch(name)):
        raise InvalidArgumentError("bad template name")
    return name


def find(name: str, base: Path | None = None) -> TemplateRef | None:
    """The built template called ``name`` (a name or an id), or None if there is none."""
    check_name(name)
    base = base or root()
    if _ID.fullmatch(name):
        tid = name
    else:
        link = base / "names" / name
        if not link.is_symlink():
            return None
        tid = Path(link.readlink()).name
        if not _ID.fullmatch(tid):
            return None
    meta = base / tid / "template.json"
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    return TemplateRef(
        id=tid,
        name=str(data.get("name", name)),
        rootfs=base / tid / "rootfs",
        env=tuple((str(k), str(v)) for k, v in dict(data.get("env", {})).items()),
        workdir=str(data.get("workdir", "/home/user")),
        user=str(data.get("user", "user")),
        start_cmd=data.get("start_cmd"),
        ready_cmd=data.get("ready_cmd"),
        labels={str(k): str(v) for k, v in dict(data.get("labels", {})).items()},
    )
