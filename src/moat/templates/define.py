"""The definition of a template: a base and an ordered list of build steps, plus settings.

Pure and validated: every front end (TOML, Dockerfile, OCI image) produces a
:class:`TemplateDef`; :mod:`moat.templates.build` turns it into a root. Names that reach a
command line (packages, paths) are checked against strict patterns here, so no value can
become an option of apt, pip or npm. Errors are :class:`TemplateDefinitionError` naming the
field and, where a front end knows it, the line.

Identity: :meth:`TemplateDef.template_id` is the SHA-256 of the canonical JSON of the
definition, with every copied file's content hash in place of its path (the template id);
:meth:`TemplateDef.layer_keys` chains one hash per layer (parent key + step), the build
cache's keys.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from moat.errors import InvalidArgumentError, TemplateDefinitionError
from moat.model.validate import check_env

#: The hosts each kind of package source needs (the only egress a step gets).
SOURCES: dict[str, tuple[str, ...]] = {
    "debian": ("deb.debian.org",),
    "pypi": ("pypi.org", "files.pythonhosted.org"),
    "npm": ("registry.npmjs.org",),
}
#: The Debian releases a base can be built from (the host's keyring must know their keys).
DEBIAN_SUITES = ("bookworm",)
MAX_STEPS = 200
MAX_ITEMS = 500
MAX_COMMAND = 64 * 1024

_APT = re.compile(r"[a-z0-9][a-z0-9+.-]{0,99}(=[A-Za-z0-9.+~:-]{1,100})?")
_PIP = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}(\[[A-Za-z0-9._,-]{1,100}\])?"
    r"((==|>=|<=|~=|!=|<|>)[A-Za-z0-9.*+!-]{1,50}(,(==|>=|<=|~=|!=|<|>)[A-Za-z0-9.*+!-]{1,50})*)?"
)
_NPM = re.compile(
    r"(@[a-z0-9][a-z0-9._-]{0,100}/)?[a-z0-9][a-z0-9._-]{0,100}(@[A-Za-z0-9.^~<>=*+-]{1,50})?"
)
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_TEMPLATE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}|[0-9a-f]{64}")

StepKind = Literal["apt", "pip", "npm", "copy", "run"]


def _fail(message: str, fld: str, line: int | None) -> TemplateDefinitionError:
    return TemplateDefinitionError(message, field=fld, line=line)


def check_abs_path(value: object, fld: str, line: int | None = None) -> str:
    """An absolute, normalised path inside the template (no ``..``, no NUL)."""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > 4096:
        raise _fail("must be an absolute path", fld, line)
    parts = value.split("/")
    if "\0" in value or any(p in (".", "..") for p in parts):
        raise _fail("must not contain '.', '..' or NUL", fld, line)
    return value


def check_rel_path(value: object, fld: str, line: int | None = None) -> str:
    """A path relative to the build context that stays inside it."""
    if not isinstance(value, str) or not value or len(value) > 4096 or "\0" in value:
        raise _fail("must be a path relative to the build context", fld, line)
    if value.startswith("/"):
        raise _fail("must be relative to the build context, not absolute", fld, line)
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _fail("must stay inside the build context (no '..')", fld, line)
    return "/".join(parts) or "."


@dataclass(frozen=True)
class Base:
    """Where the first layer comes from: ``debian`` (``ref`` a suite, built by mmdebstrap),
    ``template`` (``ref`` a built template's name or id) or ``oci`` (``ref`` an image path in
    the build context; ``digest`` its content hash, set when the image is staged)."""

    kind: Literal["debian", "template", "oci"]
    ref: str
    digest: str = ""
    line: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind == "debian" and self.ref not in DEBIAN_SUITES:
            raise _fail(
                f"unknown Debian suite (known: {', '.join(DEBIAN_SUITES)})", "base", self.line
            )
        if self.kind == "template" and not _TEMPLATE.fullmatch(self.ref):
            raise _fail("bad template name", "base", self.line)
        if self.kind == "oci":
            check_rel_path(self.ref, "base", self.line)

    @classmethod
    def parse(cls, value: str, line: int | None = None) -> Base:
        """``debian:bookworm``, ``template:NAME`` (or a bare template name), ``oci:PATH``."""
        if not isinstance(value, str):
            raise _fail("must be a string", "base", line)
        kind, sep, ref = value.partition(":")
        if sep and kind == "debian":
            return cls("debian", ref, line=line)
        if sep and kind == "oci":
            return cls("oci", ref, line=line)
        if sep and kind == "template":
            return cls("template", ref, line=line)
        if not sep:
            return cls("template", value, line=line)
        raise _fail("must be debian:SUITE, template:NAME or oci:PATH", "base", line)

    def identity(self) -> dict[str, str]:
        if self.kind in ("oci", "template"):
            if not self.digest:
                raise InvalidArgumentError(f"the base {self.kind} was not resolved")
            return {"kind": self.kind, "digest": self.digest}
        return {"kind": self.kind, "ref": self.ref}


@dataclass(frozen=True)
class Step:
    """One build step. ``args``: packages (apt, pip, npm), ``(src, dest)`` (copy) or
    ``(command,)`` run by ``/bin/sh -c`` (run). ``network``: the sources a run step may reach.
    ``files``: the copied files' ``(relative path, kind, sha256 or link target)``, set when
    the build context is staged."""

    kind: StepKind
    args: tuple[str, ...]
    network: tuple[str, ...] = ()
    files: tuple[tuple[str, str, str], ...] = ()
    line: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        fld, line = self.kind, self.line
        if not self.args or len(self.args) > MAX_ITEMS:
            raise _fail(f"needs 1 to {MAX_ITEMS} items", fld, line)
        pattern = {"apt": _APT, "pip": _PIP, "npm": _NPM}.get(self.kind)
        if pattern is not None:
            for a in self.args:
                if not isinstance(a, str) or not pattern.fullmatch(a):
                    raise _fail(f"bad package name {str(a)[:80]!r}", fld, line)
        elif self.kind == "copy":
            if len(self.args) != 2:
                raise _fail("needs a source and a destination", fld, line)
            check_rel_path(self.args[0], "copy.src", line)
            check_abs_path(self.args[1].rstrip("/") or "/", "copy.dest", line)
        elif self.kind == "run":
            cmd = self.args[0]
            if len(self.args) != 1 or not isinstance(cmd, str) or not cmd.strip():
                raise _fail("needs one command string", fld, line)
            if len(cmd) > MAX_COMMAND or "\0" in cmd:
                raise _fail("command too long or contains NUL", fld, line)
        else:
            raise _fail("unknown step kind", "step", line)
        for n in self.network:
            if n not in SOURCES:
                raise _fail(f"unknown source {n!r} (known: {', '.join(SOURCES)})", "network", line)

    def allow_out(self) -> tuple[str, ...]:
        """The hosts this step may reach through the gateway (nothing else)."""
        names = {"apt": ("debian",), "pip": ("pypi",), "npm": ("npm",)}.get(self.kind, ())
        hosts: list[str] = []
        for n in (*names, *self.network):
            hosts += [h for h in SOURCES[n] if h not in hosts]
        return tuple(hosts)

    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "args": list(self.args)}
        if self.network:
            out["network"] = sorted(self.network)
        if self.kind == "copy":
            out["files"] = [list(f) for f in self.files]
        return out

    def describe(self) -> str:
        text = " ".join(self.args)
        return f"{self.kind}: {text[:60]}{'…' if len(text) > 60 else ''}"


@dataclass(frozen=True)
class TemplateDef:
    """A whole template: base, steps and the settings a sandbox of it starts with."""

    base: Base
    steps: tuple[Step, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/home/user"
    user: str = "user"
    start_cmd: str | None = None
    ready_cmd: str | None = None

    def __post_init__(self) -> None:
        if len(self.steps) > MAX_STEPS:
            raise _fail(f"at most {MAX_STEPS} steps", "steps", None)
        for k, v in self.env:
            try:
                check_env(k, v)
            except InvalidArgumentError as exc:
                raise _fail(str(exc), f"env.{k}"[:60], None) from exc
        check_abs_path(self.workdir, "workdir")
        if not _USER.fullmatch(self.user):
            raise _fail("bad user name", "user", None)
        for name in ("start_cmd", "ready_cmd"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or len(v) > MAX_COMMAND or "\0" in v):
                raise _fail("must be a command string", name, None)

    def layer_keys(self) -> list[str]:
        """One cache key per layer: the base's, then hash(parent key, step) for each step."""
        if self.base.kind == "template":  # its last layer is our first
            keys = [self.base.identity()["digest"]]
        else:
            keys = [_digest({"moat-layer": 1, "base": self.base.identity()})]
        for step in self.steps:
            keys.append(_digest({"parent": keys[-1], "step": step.identity()}))
        return keys

    def settings(self) -> dict[str, Any]:
        """What ``template.json`` records besides the name (see moat.templates.ref)."""
        return {
            "env": dict(self.env),
            "workdir": self.workdir,
            "user": self.user,
            "start_cmd": self.start_cmd,
            "ready_cmd": self.ready_cmd,
        }

    def template_id(self) -> str:
        """The template's id: the hash of its layers and its settings (64 hex)."""
        return _digest({"moat-template": 1, "root": self.layer_keys()[-1], **self.settings()})


def _digest(obj: object) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
