"""Staging files from a local build context (COPY) and images (OCI) for a build step.

Trust domain: host engine, reading the caller's directory. Nothing outside the context is
read: every component of a source path is checked with ``lstat`` (no symlink is followed),
symlinks inside a copied directory are copied as links and refused if their target leaves
the context. The staged copy is what gets hashed and what the step sees (read-only), so the
template id always matches the files used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

from moat.errors import TemplateDefinitionError

MAX_CONTEXT_BYTES = 4 << 30


def _err(message: str, line: int | None) -> TemplateDefinitionError:
    return TemplateDefinitionError(message, field="copy.src", line=line)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def resolve_source(context: Path, rel: str, line: int | None = None) -> Path:
    """``context/rel`` after checking that no component is a symlink or missing."""
    path = context
    for part in [p for p in rel.split("/") if p not in ("", ".")]:
        path = path / part
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise _err(f"{rel!r} is not in the build context", line) from exc
        if stat.S_ISLNK(st.st_mode):
            raise _err(f"{rel!r} goes through a symlink (not allowed in a source path)", line)
    return path


def _link_ok(rel_dir: str, target: str) -> bool:
    """Whether a symlink at ``rel_dir/...`` pointing to ``target`` stays in the context."""
    if target.startswith("/"):
        return False
    depth = [p for p in rel_dir.split("/") if p not in ("", ".")]
    for part in target.split("/"):
        if part == "..":
            if not depth:
                return False
            depth.pop()
        elif part not in ("", "."):
            depth.append(part)
    return True


def stage(
    context: Path, rel: str, dest: Path, line: int | None = None
) -> tuple[tuple[str, str, str], ...]:
    """Copy ``rel`` from ``context`` to ``dest``; the staged entries as
    ``(relative path, kind, sha256 | link target | "")``, kind f/x/l/d."""
    src = resolve_source(context, rel, line)
    entries: list[tuple[str, str, str]] = []
    total = 0
    st = os.lstat(src)
    if stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, dest, follow_symlinks=False)
        exe = bool(st.st_mode & 0o111)
        os.chmod(dest, 0o755 if exe else 0o644)
        return (("", "x" if exe else "f", _sha256(dest)),)
    if not stat.S_ISDIR(st.st_mode):
        raise _err(f"{rel!r} is not a file or directory", line)
    dest.mkdir(mode=0o755)
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        rd = os.path.relpath(dirpath, src)
        rd = "" if rd == "." else rd
        for name in sorted(dirnames + filenames):
            s = Path(dirpath) / name
            relp = f"{rd}/{name}" if rd else name
            d = dest / relp
            est = os.lstat(s)
            if stat.S_ISLNK(est.st_mode):
                target = os.readlink(s)
                if not _link_ok(f"{rel}/{rd}", target):
                    raise _err(f"symlink {relp!r} points outside the build context", line)
                os.symlink(target, d)
                entries.append((relp, "l", target))
            elif stat.S_ISDIR(est.st_mode):
                d.mkdir(mode=0o755)
                entries.append((relp, "d", ""))
            elif stat.S_ISREG(est.st_mode):
                total += est.st_size
                if total > MAX_CONTEXT_BYTES:
                    raise _err("the copied files are too large", line)
                shutil.copyfile(s, d, follow_symlinks=False)
                exe = bool(est.st_mode & 0o111)
                os.chmod(d, 0o755 if exe else 0o644)
                entries.append((relp, "x" if exe else "f", _sha256(d)))
            else:
                raise _err(f"{relp!r} is not a regular file, directory or symlink", line)
    return tuple(sorted(entries))


def stage_image(context: Path, rel: str, dest: Path, line: int | None = None) -> str:
    """Copy an OCI image (a tar file or an OCI layout directory) to ``dest``; its hash."""
    src = resolve_source(context, rel, line)
    if src.is_file():
        shutil.copyfile(src, dest / "image.tar", follow_symlinks=False)
        os.chmod(dest / "image.tar", 0o644)
        return _sha256(dest / "image.tar")
    if not (src / "oci-layout").is_file():
        raise TemplateDefinitionError(
            "an OCI image must be a tar file or an OCI layout directory", field="base", line=line
        )
    files = stage(context, rel, dest / "image", line)
    h = hashlib.sha256()
    for entry in files:
        h.update("\0".join(entry).encode() + b"\n")
    return h.hexdigest()
