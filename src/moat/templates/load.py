"""``moat template build FILE|DIR``: which front end reads what.

* ``*.toml`` or a directory with ``moat.toml``: the TOML template file;
* ``Dockerfile*`` or a directory with a ``Dockerfile``: the Dockerfile subset;
* ``*.tar`` (``docker save`` or an OCI archive) or an OCI layout directory (``oci-layout``):
  the image, imported as is.

The build context is the file's directory (or the directory itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from moat.errors import TemplateDefinitionError
from moat.templates import dockerfile, toml_def
from moat.templates.define import Base, TemplateDef

MAX_FILE = 1 << 20


def _read(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_FILE:
            raise TemplateDefinitionError("the template file is too large")
        return path.read_text()
    except (OSError, UnicodeError) as exc:
        raise TemplateDefinitionError("the template file can't be read") from exc


def load(
    path: Path, build_args: Mapping[str, str] | None = None
) -> tuple[TemplateDef, str | None, Path]:
    """The definition at ``path``, the name it gives itself (or None) and its context."""
    if path.is_dir():
        if (path / "oci-layout").is_file():
            return TemplateDef(base=Base("oci", path.name)), None, path.parent
        for candidate in ("moat.toml", "Dockerfile"):
            if (path / candidate).is_file():
                return load(path / candidate, build_args)
        raise TemplateDefinitionError("no moat.toml, Dockerfile or OCI layout in the directory")
    if not path.is_file():
        raise TemplateDefinitionError("no such template file")
    if path.suffix == ".toml":
        defn, name = toml_def.parse(_read(path))
        return defn, name, path.parent
    if path.name.startswith("Dockerfile") or path.suffix == ".dockerfile":
        return dockerfile.parse(_read(path), build_args), None, path.parent
    if path.suffix == ".tar":
        return TemplateDef(base=Base("oci", path.name)), None, path.parent
    raise TemplateDefinitionError("unknown template file (.toml, Dockerfile, .tar)")
