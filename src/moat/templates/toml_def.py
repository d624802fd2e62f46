"""The TOML template file (``moat.toml``): a :class:`TemplateDef` from text.

::

    base = "debian:bookworm"          # or "template:NAME" (a built one), or "oci:image.tar"
    apt = ["jq"]                      # Debian packages (step 1)
    pip = ["six==1.16.0"]             # then Python packages
    npm = ["left-pad"]                # then npm packages (global)
    env = { GREETING = "hi" }
    workdir = "/home/user"
    user = "user"
    start_cmd = "python3 -m http.server 8000"
    ready_cmd = "curl -sf localhost:8000"

    [[copy]]                          # then files from the build context, in order
    src = "app/"
    dest = "/opt/app"

    [[run]]                           # then commands (``/bin/sh -c``), in order
    cmd = "python3 -m compileall /opt/app"
    network = []                      # sources it may reach: debian, pypi, npm

Steps run in that order: apt, pip, npm, copy, run. Unknown keys are errors.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

from moat.errors import TemplateDefinitionError
from moat.templates.define import Base, Step, TemplateDef

_KEYS = {
    "name", "base", "apt", "pip", "npm", "copy", "run", "env", "workdir", "user",
    "start_cmd", "ready_cmd",
}  # fmt: skip


def _line(text: str, key: str, nth: int = 0) -> int | None:
    """The line of ``key = ...`` (or the ``nth`` ``[[key]]`` table) in ``text``, 1-based."""
    pattern = re.compile(rf"^[ \t]*(\[\[\s*{re.escape(key)}\s*\]\]|{re.escape(key)}\s*=)", re.M)
    found = list(pattern.finditer(text))
    if len(found) <= nth:
        return None
    return text.count("\n", 0, found[nth].start()) + 1


def _strings(value: Any, fld: str, line: int | None) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TemplateDefinitionError("must be a list of strings", field=fld, line=line)
    return tuple(value)


def parse(text: str) -> tuple[TemplateDef, str | None]:
    """The definition in ``text`` and its ``name`` (None if it has none)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TemplateDefinitionError(f"not valid TOML: {exc}") from exc
    for key in data:
        if key not in _KEYS:
            raise TemplateDefinitionError("unknown setting", field=key, line=_line(text, key))
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise TemplateDefinitionError("must be a string", field="name", line=_line(text, "name"))
    base = Base.parse(data.get("base", "debian:bookworm"), _line(text, "base"))
    steps: list[Step] = []
    for kind in ("apt", "pip", "npm"):
        if kind in data:
            line = _line(text, kind)
            pkgs = _strings(data[kind], kind, line)
            if pkgs:
                steps.append(Step(kind, pkgs, line=line))
    for table in ("copy", "run"):
        items = data.get(table, [])
        if not isinstance(items, list):
            raise TemplateDefinitionError(
                f"must be [[{table}]] tables", field=table, line=_line(text, table)
            )
        for n, item in enumerate(items):
            line = _line(text, table, n)
            steps.append(_table_step(table, item, line))
    env = data.get("env", {})
    if not isinstance(env, dict):
        raise TemplateDefinitionError("must be a table", field="env", line=_line(text, "env"))
    settings: dict[str, Any] = {}
    for key in ("workdir", "user", "start_cmd", "ready_cmd"):
        if key in data:
            settings[key] = data[key]
            if not isinstance(data[key], str):
                raise TemplateDefinitionError("must be a string", field=key, line=_line(text, key))
    try:
        defn = TemplateDef(
            base=base, steps=tuple(steps), env=tuple(sorted(env.items())), **settings
        )
    except TemplateDefinitionError as exc:
        if exc.line is None and exc.field:
            raise TemplateDefinitionError(
                str(exc).split(": ", 1)[-1],
                field=exc.field,
                line=_line(text, exc.field.split(".")[0]),
            ) from exc
        raise
    return defn, name


def _table_step(table: str, item: Any, line: int | None) -> Step:
    if not isinstance(item, dict):
        raise TemplateDefinitionError("must be a table", field=table, line=line)
    allowed = {"copy": {"src", "dest"}, "run": {"cmd", "network"}}[table]
    for key in item:
        if key not in allowed:
            raise TemplateDefinitionError("unknown setting", field=f"{table}.{key}", line=line)
    if table == "copy":
        src, dest = item.get("src"), item.get("dest")
        if not isinstance(src, str) or not isinstance(dest, str):
            raise TemplateDefinitionError("needs src and dest strings", field="copy", line=line)
        return Step("copy", (src, dest), line=line)
    cmd = item.get("cmd")
    if not isinstance(cmd, str):
        raise TemplateDefinitionError("needs a cmd string", field="run", line=line)
    network = _strings(item.get("network", []), "run.network", line)
    return Step("run", (cmd,), network=network, line=line)
