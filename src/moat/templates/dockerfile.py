"""A Dockerfile subset as a template definition, parsed with ``dockerfile-parse``.

Supported: one ``FROM`` (``debian:bookworm``, or a built moat template by name), ``RUN``
(shell or JSON form; it may reach the Debian, PyPI and npm sources, nothing else), ``COPY``
and ``ADD`` of local files (no ``--from``/``--chown``/``--chmod``, no URLs, no archive
unpacking), ``ENV``, ``ARG`` (with ``build_args``), ``WORKDIR``, ``USER``, ``CMD``. Every
other instruction is an error naming its line. ``RUN`` always runs as root of the build
sandbox; ``USER`` sets the user sandboxes of the template run as.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import shlex
from collections.abc import Mapping

from dockerfile_parse import DockerfileParser

from moat.errors import TemplateDefinitionError
from moat.templates.define import SOURCES, Base, Step, TemplateDef

_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_ARCHIVE = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")


def _err(message: str, instruction: str, line: int) -> TemplateDefinitionError:
    return TemplateDefinitionError(message, field=instruction, line=line)


def _subst(text: str, values: Mapping[str, str]) -> str:
    return _VAR.sub(lambda m: values.get(m.group(1) or m.group(2), ""), text)


def _words(value: str, instruction: str, line: int) -> list[str]:
    """JSON array form, or whitespace-separated words (with shell quoting)."""
    stripped = value.strip()
    if stripped.startswith("["):
        try:
            words = json.loads(stripped)
        except ValueError as exc:
            raise _err("bad JSON array", instruction, line) from exc
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise _err("must be a JSON array of strings", instruction, line)
        return words
    try:
        return shlex.split(stripped)
    except ValueError as exc:
        raise _err(f"bad quoting: {exc}", instruction, line) from exc


def _pairs(value: str, instruction: str, line: int) -> list[tuple[str, str]]:
    """``K=V K2="v 2"`` or the legacy ``K value with spaces``."""
    words = _words(value, instruction, line)
    if words and "=" not in words[0]:
        key, _, rest = value.strip().partition(" ")
        return [(key, rest.strip())]
    out = []
    for w in words:
        key, sep, val = w.partition("=")
        if not sep:
            raise _err("expected NAME=value", instruction, line)
        out.append((key, val))
    return out


def parse(text: str, build_args: Mapping[str, str] | None = None) -> TemplateDef:
    """The definition in Dockerfile ``text``."""
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()), env_replace=False)
    try:
        structure = parser.structure
    except Exception as exc:  # the parser's own errors, whatever their type
        raise TemplateDefinitionError(f"not a Dockerfile: {type(exc).__name__}") from exc
    base: Base | None = None
    steps: list[Step] = []
    env: dict[str, str] = {}
    args: dict[str, str] = {}
    settings: dict[str, str] = {}
    every = tuple(SOURCES)
    for item in structure:
        ins = str(item["instruction"]).upper()
        line = int(item["startline"]) + 1
        raw = str(item["value"])
        if ins == "COMMENT":
            continue
        if base is None and ins not in ("FROM", "ARG"):
            raise _err("must come after FROM", ins, line)
        values = {**args, **env}
        if ins == "FROM":
            if base is not None:
                raise _err("only one FROM (no multi-stage builds)", ins, line)
            words = _subst(raw, args).split()
            if len(words) != 1 or words[0].startswith("--"):
                raise _err("FROM takes one image (no AS, no --platform)", ins, line)
            base = _base(words[0], line)
        elif ins == "ARG":
            for key, val in _pairs(raw if "=" in raw else raw + "=", ins, line):
                args[key] = (build_args or {}).get(key, val)
        elif ins == "ENV":
            for key, val in _pairs(raw, ins, line):
                env[key] = _subst(val, values)
        elif ins == "RUN":
            cmd = raw.strip()
            if cmd.startswith("["):
                cmd = shlex.join(_words(cmd, ins, line))
            # build-time values as the shell would see them (ARG and ENV)
            prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(values.items()))
            cmd = f"export {prefix}; {cmd}" if prefix else cmd
            steps.append(Step("run", (cmd,), network=every, line=line))
        elif ins in ("COPY", "ADD"):
            steps += _copies(ins, _subst(raw, values), line, settings.get("workdir", "/"))
        elif ins == "WORKDIR":
            path = _subst(raw.strip(), values)
            settings["workdir"] = posixpath.normpath(
                posixpath.join(settings.get("workdir", "/"), path)
            )
        elif ins == "USER":
            settings["user"] = _subst(raw.strip(), values).partition(":")[0]
        elif ins == "CMD":
            words = _words(raw, ins, line)
            settings["start_cmd"] = (
                shlex.join(words) if raw.strip().startswith("[") else raw.strip()
            )
        else:
            raise _err("not supported by moat templates", ins, line)
    if base is None:
        raise TemplateDefinitionError("no FROM", field="FROM", line=1)
    try:
        return TemplateDef(
            base=base, steps=tuple(steps), env=tuple(sorted(env.items())), **settings
        )
    except TemplateDefinitionError as exc:
        raise TemplateDefinitionError(
            str(exc), field=exc.field, line=_last_line(structure, exc.field)
        ) from exc


def _last_line(structure: list[dict[str, object]], fld: str | None) -> int | None:
    names = {"workdir": "WORKDIR", "user": "USER", "start_cmd": "CMD"}
    want = names.get((fld or "").split(".")[0], "ENV")
    lines = [int(str(s["startline"])) + 1 for s in structure if s["instruction"] == want]
    return lines[-1] if lines else None


def _base(image: str, line: int) -> Base:
    if image.startswith("debian:"):
        return Base.parse(image, line)
    name = image.removeprefix("moat/")
    if ":" in name or "/" in name:
        raise _err(
            "unknown base image (use debian:bookworm, a built moat template, or import an"
            " OCI image with `moat template build IMAGE.tar`)",
            "FROM",
            line,
        )
    return Base.parse(f"template:{name}", line)


def _copies(ins: str, raw: str, line: int, workdir: str) -> list[Step]:
    words = _words(raw, ins, line)
    if any(w.startswith("--") for w in words):
        raise _err("flags (--from, --chown, --chmod, ...) are not supported", ins, line)
    if len(words) < 2:
        raise _err("needs a source and a destination", ins, line)
    *srcs, dest = words
    dest = posixpath.join(workdir, dest) if not dest.startswith("/") else dest
    if len(srcs) > 1 and not dest.endswith("/"):
        raise _err("with several sources the destination must end with /", ins, line)
    for src in srcs:
        if "://" in src:
            raise _err("only local files can be copied (no URLs)", ins, line)
        if ins == "ADD" and src.endswith(_ARCHIVE):
            raise _err("ADD does not unpack archives here: COPY it and RUN tar", ins, line)
        if any(c in src for c in "*?["):
            raise _err("wildcards are not supported", ins, line)
    return [Step("copy", (src, dest), line=line) for src in srcs]
