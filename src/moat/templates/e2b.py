"""E2B's template build request (``TemplateBuildStartV2``) mapped onto moat's definition.

Trust domain: host engine, reading a remote caller's request and uploaded archives (untrusted
input). What maps (docs/templates.md, "Over the server"):

- ``fromImage``: ``debian:bookworm`` (``debian:12``) -> moat's Debian base; ``e2bdev/base``
  (the SDK's default) -> the host's ``base`` template; ``fromTemplate`` -> the tenant's own
  template or a host-wide one (the caller resolves it: ``resolve_base``);
- ``RUN cmd [user]`` -> a run step as that user (default: the current ``USER``, ``user`` at
  first, as E2B's), in the current ``WORKDIR`` with the ``ENV`` set so far, reaching only the
  Debian, PyPI and npm sources; ``COPY src dest`` -> a copy step of the uploaded archive's
  files (Docker's rules: a directory's contents go into ``dest``); ``ENV``, ``WORKDIR``,
  ``USER`` -> the template's settings (the last ones win) and the later steps' context.

Everything else is refused with an :class:`InvalidArgumentError` naming it (registry images,
other bases, ``force``/``skip_cache``, start and ready commands, a copy's owner or mode, glob
sources), never done differently. Archives are extracted by :func:`extract` with every path
checked (no absolute path, ``..``, device, or path through a symlink: invariant 1) and the
files hash E2B's SDK computed checked against what was extracted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shlex
import shutil
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from moat.errors import InvalidArgumentError, TemplateDefinitionError
from moat.templates.define import Base, Step, TemplateDef, check_abs_path

__all__ = ["Copy", "Plan", "extract", "plan"]

#: The Debian images a base maps to (suite: moat's Debian base is bookworm).
DEBIAN_IMAGES = {"debian:bookworm": "bookworm", "debian:12": "bookworm"}
#: E2B's default base image: moat's ``base`` template stands for it.
E2B_BASE_IMAGE = "e2bdev/base"
MAX_MEMBERS = 100_000
MAX_EXTRACTED = 1 << 30
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_GLOB = re.compile(r"[*?\[\]{}]")
_HASH = re.compile(r"[0-9a-f]{64}")
#: the sources a RUN step may reach (what moat's Dockerfile RUN gets)
RUN_SOURCES = ("debian", "pypi", "npm")


def _bad(message: str, step: int | None = None) -> InvalidArgumentError:
    where = f"step {step}: " if step is not None else ""
    return InvalidArgumentError(f"{where}{message}")


@dataclass(frozen=True)
class Copy:
    """One COPY: its step number, E2B's ``src``/``dest`` (as hashed) and files hash."""

    index: int
    src: str
    dest: str
    files_hash: str

    @property
    def subdir(self) -> str:
        return f"s{self.index}"


@dataclass(frozen=True)
class Plan:
    """The moat definition of a request, and the archives its copy steps need."""

    defn: TemplateDef
    copies: tuple[Copy, ...]
    #: E2B step number (1-based, "base" is 0) of each moat step, for the status's ``step``
    step_numbers: tuple[int, ...]


def _str_list(value: Any, step: int) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise _bad("args must be a list of strings", step)
    return value


def _src(value: str, step: int) -> str:
    if not value or "\0" in value or value.startswith("/") or len(value) > 4096:
        raise _bad("COPY source must be a path relative to the build context", step)
    if _GLOB.search(value):
        raise _bad("COPY sources with glob patterns are not supported by moat", step)
    norm = os.path.normpath(value)
    if norm == ".." or norm.startswith("../"):
        raise _bad("COPY source must stay inside the build context", step)
    return norm


def _run(command: str, user: str, workdir: str, env: dict[str, str]) -> str:
    """The shell command of a RUN step: in ``workdir`` (made if missing, as Docker's WORKDIR
    does), with ``env`` exported, as ``user`` (setpriv: no PAM, no setuid binary)."""
    q = shlex.quote
    lines = [f"mkdir -p {q(workdir)}"]
    lines += [f"export {k}={q(v)}" for k, v in env.items()]
    if user == "root":
        lines.append(f"cd {q(workdir)} && exec /bin/sh -c {q(command)}")
    else:
        home = f"$(getent passwd {q(user)} | cut -d: -f6)"
        lines.append(
            f'h={home}; [ -n "$h" ] || {{ echo "USER {user}: no such user" >&2; exit 1; }}'
        )
        lines.append(
            f'cd {q(workdir)} && HOME="$h" USER={q(user)} LOGNAME={q(user)} exec setpriv'
            f" --reuid={q(user)} --regid={q(user)} --init-groups /bin/sh -c {q(command)}"
        )
    return "\n".join(lines)


def plan(body: dict[str, Any], resolve_base: Callable[[str], str | None]) -> Plan:
    """The moat definition of E2B's build body (already shape-checked by the wire model).
    ``resolve_base(name)``: the template id the caller may build on, or None."""
    if body.get("fromImageRegistry"):
        raise _bad("fromImageRegistry: moat does not pull from registries")
    steps_in = body.get("steps") or []
    # a COPY's force_upload marks its step forced too (the SDK's): the files are uploaded
    # again and checked by hash; its layer's key is their content, so nothing else differs
    forced = [s for s in steps_in if s.get("force") and not (
        s.get("type") == "COPY" and s.get("forceUpload"))]  # fmt: skip
    if body.get("force") or forced:
        raise _bad(
            "skip_cache/force is not supported: moat caches each step by content hash "
            "(change a step to rebuild it)"
        )
    image, template = body.get("fromImage"), body.get("fromTemplate")
    if image and template:
        raise _bad("give fromImage or fromTemplate, not both")
    if template:
        tid = resolve_base(template)
        if tid is None:
            raise InvalidArgumentError(f"base template {template[:64]!r} was not found")
        base = Base("template", tid)
    elif image in DEBIAN_IMAGES:
        base = Base("debian", DEBIAN_IMAGES[image])
    elif image == E2B_BASE_IMAGE or not image:
        tid = resolve_base("base")
        if tid is None:
            raise InvalidArgumentError(
                "the base image e2bdev/base maps to moat's 'base' template, which this host "
                "has not built (moat template build --defaults)"
            )
        base = Base("template", tid)
    else:
        raise _bad(
            f"fromImage {str(image)[:80]!r}: moat builds from {', '.join(DEBIAN_IMAGES)}, "
            f"{E2B_BASE_IMAGE} (moat's base template) or a template (from_template); "
            "registry images are not pulled"
        )
    user, workdir = "user", "/home/user"
    env: dict[str, str] = {}
    steps: list[Step] = []
    numbers: list[int] = []
    copies: list[Copy] = []
    for i, raw in enumerate(body.get("steps") or [], start=1):
        kind, args = raw.get("type"), _str_list(raw.get("args") or [], i)
        if kind == "RUN":
            if not 1 <= len(args) <= 2 or not args[0].strip():
                raise _bad("RUN needs a command and an optional user", i)
            as_user = args[1] if len(args) == 2 and args[1] else user
            if not _USER.fullmatch(as_user):
                raise _bad("RUN: bad user name", i)
            cmd = _run(args[0], as_user, workdir, env)
            steps.append(Step("run", (cmd,), network=RUN_SOURCES))
            numbers.append(i)
        elif kind == "COPY":
            if len(args) not in (2, 3, 4):
                raise _bad("COPY needs a source and a destination", i)
            owner, mode = [*args, "", ""][2:4]
            if owner or mode:
                raise _bad(
                    "COPY with a user or mode is not supported by moat (files in a template "
                    "are owned by root and keep the uploaded modes)",
                    i,
                )
            src = _src(args[0], i)
            files_hash = raw.get("filesHash")
            if not isinstance(files_hash, str) or not _HASH.fullmatch(files_hash):
                raise _bad("COPY needs the filesHash of its upload", i)
            dest = args[1]
            if not dest.startswith("/"):  # relative to the working directory, as Docker's
                dest = f"{workdir.rstrip('/')}/{dest}"
            try:
                check_abs_path(dest.rstrip("/") or "/", "COPY destination")
            except TemplateDefinitionError as exc:
                raise _bad(str(exc), i) from None
            copy = Copy(i, args[0], args[1], files_hash)
            copies.append(copy)
            inner = copy.subdir if src == "." else f"{copy.subdir}/{src}"
            steps.append(Step("copy", (inner, dest)))
            numbers.append(i)
        elif kind == "ENV":
            if not args or len(args) % 2:
                raise _bad("ENV needs key, value pairs", i)
            for k, v in zip(args[::2], args[1::2], strict=True):
                if not _ENV_KEY.fullmatch(k):
                    raise _bad(f"ENV: bad variable name {k[:64]!r}", i)
                env[k] = v
        elif kind == "WORKDIR":
            if len(args) != 1:
                raise _bad("WORKDIR needs one path", i)
            path = args[0] if args[0].startswith("/") else f"{workdir.rstrip('/')}/{args[0]}"
            try:
                workdir = check_abs_path(os.path.normpath(path), "WORKDIR")
            except TemplateDefinitionError as exc:
                raise _bad(str(exc), i) from None
        elif kind == "USER":
            if len(args) != 1 or not _USER.fullmatch(args[0]):
                raise _bad("USER needs one user name", i)
            user = args[0]
        else:
            raise _bad(f"step type {str(kind)[:32]!r} is not supported by moat", i)
    try:
        defn = TemplateDef(
            base=base, steps=tuple(steps), env=tuple(sorted(env.items())), workdir=workdir,
            user=user,
            # run when each sandbox of it starts (moat.engine.startcmd)
            start_cmd=body.get("startCmd") or None, ready_cmd=body.get("readyCmd") or None,
        )  # fmt: skip
    except TemplateDefinitionError as exc:
        raise InvalidArgumentError(str(exc)) from None
    return Plan(defn, tuple(copies), tuple(numbers))


def adjust_copy_dest(plan_: Plan, context: Path) -> Plan:
    """Docker's rule for a directory source: its contents go *into* ``dest`` (moat's copy
    step would put the directory itself under a ``dest`` ending in ``/``)."""
    steps = list(plan_.defn.steps)
    for n, step in enumerate(steps):
        if step.kind != "copy":
            continue
        src = context / step.args[0]
        if stat.S_ISDIR(os.lstat(src).st_mode) and step.args[1].endswith("/"):
            steps[n] = Step("copy", (step.args[0], step.args[1].rstrip("/") or "/"))
    defn = dataclasses.replace(plan_.defn, steps=tuple(steps))
    return Plan(defn, plan_.copies, plan_.step_numbers)


# -- archives --------------------------------------------------------------------------------


def _member_name(name: str) -> list[str]:
    if not name or "\0" in name or name.startswith("/") or len(name) > 4096:
        raise InvalidArgumentError("the uploaded archive has a bad path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgumentError("the uploaded archive has a path outside its root ('..')")
    return parts


def _link_inside(parts: list[str], target: str) -> bool:
    if not target or target.startswith("/") or "\0" in target:
        return False
    depth = list(parts[:-1])
    for p in target.split("/"):
        if p == "..":
            if not depth:
                return False
            depth.pop()
        elif p not in ("", "."):
            depth.append(p)
    return True


def extract(archive: Path, dest: Path, copy: Copy) -> None:
    """Unpack ``archive`` (E2B's upload: a tar, gzipped or not) into the empty directory
    ``dest``, checking every path, and check E2B's files hash of ``copy`` against it.
    Raises InvalidArgumentError."""
    h = hashlib.sha256(f"COPY {copy.src} {copy.dest}".encode())
    kinds: dict[tuple[str, ...], str] = {(): "d"}  # path parts -> d(ir) f(ile) l(ink)
    total = 0
    count = 0
    try:
        with archive.open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                count += 1
                if count > MAX_MEMBERS:
                    raise InvalidArgumentError("the uploaded archive has too many entries")
                parts = _member_name(m.name)
                key = tuple(parts)
                for n in range(1, len(parts)):  # every parent: a directory we made
                    kind = kinds.get(key[:n])
                    if kind is None:
                        os.mkdir(dest.joinpath(*parts[:n]), 0o755)
                        kinds[key[:n]] = "d"
                    elif kind != "d":
                        raise InvalidArgumentError(
                            "the uploaded archive has a path through a file or symlink"
                        )
                target = dest.joinpath(*parts) if parts else dest
                perm = m.mode & 0o777
                if m.isdir():
                    if kinds.get(key, "d") != "d":
                        raise InvalidArgumentError("the uploaded archive repeats a path")
                    if key not in kinds:
                        os.mkdir(target, 0o755)
                    kinds[key] = "d"
                    h.update(m.name.encode())
                    h.update(str(stat.S_IFDIR | perm).encode())
                    continue
                if key in kinds:
                    raise InvalidArgumentError("the uploaded archive repeats a path")
                if m.issym():
                    if not _link_inside(parts, m.linkname):
                        raise InvalidArgumentError(
                            "the uploaded archive has a symlink pointing outside it"
                        )
                    os.symlink(m.linkname, target)
                    kinds[key] = "l"
                    h.update(m.name.encode())
                    h.update(str(stat.S_IFLNK | perm).encode())
                    h.update(str(len(os.fsencode(m.linkname))).encode())
                    h.update(m.linkname.encode())
                    continue
                if m.islnk():  # a hard link to a file of the archive: copied
                    src_parts = tuple(_member_name(m.linkname))
                    if kinds.get(src_parts) != "f":
                        raise InvalidArgumentError("the uploaded archive has a bad hard link")
                    source = dest.joinpath(*src_parts)
                    size = os.lstat(source).st_size
                    total += size
                    if total > MAX_EXTRACTED:
                        raise InvalidArgumentError("the uploaded files are too large")
                    shutil.copyfile(source, target, follow_symlinks=False)
                    os.chmod(target, _file_mode(perm))
                    kinds[key] = "f"
                    h.update(m.name.encode())
                    h.update(str(stat.S_IFREG | perm).encode())
                    h.update(str(size).encode())
                    with source.open("rb") as data:
                        while chunk := data.read(1 << 20):
                            h.update(chunk)
                    continue
                if not m.isreg():
                    raise InvalidArgumentError(
                        "the uploaded archive may hold only files, directories and symlinks"
                    )
                total += m.size
                if total > MAX_EXTRACTED:
                    raise InvalidArgumentError("the uploaded files are too large")
                h.update(m.name.encode())
                h.update(str(stat.S_IFREG | perm).encode())
                h.update(str(m.size).encode())
                src = tar.extractfile(m)
                assert src is not None  # a regular member always has data
                _write(src, target, _file_mode(perm), h)
                kinds[key] = "f"
    except (tarfile.TarError, EOFError, OSError, UnicodeError) as exc:
        if isinstance(exc, FileExistsError):
            raise InvalidArgumentError("the uploaded archive repeats a path") from None
        raise InvalidArgumentError("the uploaded archive is not a valid tar file") from None
    if h.hexdigest() != copy.files_hash:
        raise InvalidArgumentError(
            f"step {copy.index}: the uploaded files do not match their filesHash"
        )
    wanted = dest.joinpath(*_member_name(os.path.normpath(copy.src)))
    if not os.path.lexists(wanted):
        raise InvalidArgumentError(f"step {copy.index}: the upload does not hold {copy.src!r}")


def _file_mode(perm: int) -> int:
    return 0o755 if perm & 0o111 else 0o644


def _write(src: IO[bytes], target: Path, mode: int, h: Any) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(1 << 20):
            h.update(chunk)
            out.write(chunk)
