"""A small real Debian root, built once per machine with mmdebstrap, installed as a template.

The root is cached under ``/var/cache/moat-test/rootfs-<hash>`` (``$MOAT_TEST_ROOTFS_CACHE``):
built from deb.debian.org when missing (about 30 s and 170 MB), under a lock so concurrent
test processes build it once, atomically renamed into place. :func:`install` copies it (hard
links where the file system allows) into ``<state dir>/templates/<id>/rootfs`` with the
layout of :mod:`moat.templates.ref`, plants a marker file, writes ``template.json`` last and
points ``names/<name>`` at it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from moat.templates import ref

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3",)
#: What the root is built with: its hash names the cache entry (change it to rebuild).
RECIPE = {
    "variant": "apt",
    "suite": SUITE,
    "mirror": MIRROR,
    "include": PACKAGES,
    "version": 1,
}
CACHE = Path(os.environ.get("MOAT_TEST_ROOTFS_CACHE", "/var/cache/moat-test"))


def _digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def debian_root() -> Path:
    """The cached Debian root (built now if missing). Device nodes, the build host's
    hostname and resolv.conf are removed: a template holds none of them."""
    CACHE.mkdir(parents=True, exist_ok=True, mode=0o755)
    out = CACHE / f"rootfs-{_digest(RECIPE)[:16]}"
    if (out / "usr/bin/python3").exists():
        return out
    with _locked(CACHE / f".{out.name}.lock"):
        if (out / "usr/bin/python3").exists():
            return out
        tmp = CACHE / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        hook = 'find "$1/dev" -mindepth 1 -delete; rm -f "$1/etc/hostname" "$1/etc/resolv.conf"'
        argv = [
            "mmdebstrap", f"--variant={RECIPE['variant']}", "--mode=root",
            f"--include={','.join(PACKAGES)}",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            f"--customize-hook={hook}",
            SUITE, str(tmp), MIRROR,
        ]  # fmt: skip
        try:
            subprocess.run(argv, check=True, capture_output=True, timeout=1800)
            os.rename(tmp, out)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"mmdebstrap failed: {exc.stderr.decode()[-2000:]}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _copy_tree(src: Path, dst: Path) -> None:
    """``cp -a`` with hard links where possible (the cache and the state dir share a disk)."""
    r = subprocess.run(["cp", "-al", str(src), str(dst)], capture_output=True, check=False)
    if r.returncode != 0:
        shutil.rmtree(dst, ignore_errors=True)
        subprocess.run(["cp", "-a", str(src), str(dst)], check=True, capture_output=True)


def install(
    name: str,
    *,
    env: dict[str, str] | None = None,
    workdir: str = "/home/user",
    files: dict[str, str] | None = None,
    user: str = "user",
    src: Path | None = None,
    start_cmd: str | None = None,
    ready_cmd: str | None = None,
) -> ref.TemplateRef:
    """Install the Debian root (or ``src``) as template ``name`` plus ``files`` (path inside
    -> text), replacing an older one of that name. Returns its lookup."""
    src = src or debian_root()
    settings: dict[str, object] = {"name": name, "env": env or {}, "workdir": workdir, "user": user}
    if start_cmd is not None or ready_cmd is not None:
        settings.update(start_cmd=start_cmd, ready_cmd=ready_cmd)
    tid = _digest({"src": str(src), "settings": settings, "files": files or {}})
    base = ref.root()
    tdir = base / tid
    if not (tdir / "template.json").exists():
        shutil.rmtree(tdir, ignore_errors=True)
        tdir.mkdir(parents=True, mode=0o755)
        _copy_tree(src, tdir / "rootfs")
        for path, text in (files or {}).items():
            target = tdir / "rootfs" / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            target.unlink(missing_ok=True)  # a hard link into the cache: never write through
            target.write_text(text)
            target.chmod(0o644)
        (tdir / "template.json").write_text(json.dumps(settings))
    for d in (base, tdir):
        d.chmod(0o755)
    names = base / "names"
    names.mkdir(exist_ok=True, mode=0o755)
    link = names / name
    tmp = names / f".{name}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(f"../{tid}")
    os.replace(tmp, link)
    found = ref.find(name)
    assert found is not None and found.id == tid
    return found
