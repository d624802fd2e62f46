"""The default template's root skeleton for one gVisor sandbox (the I/O half of the bundle).

Trust domain: host engine. The skeleton is an empty directory tree with the merged-/usr
symlinks and a few synthetic /etc files; the host userland comes in as read-only binds
(:mod:`moat.runtime.gvisor.oci`). Never the host's /etc wholesale, /root, /home, /var or /run
(invariant 1): only the /etc entries in :data:`ETC_BINDS` that a Python userland needs, and only
those present on this host.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Final

from moat.runtime.gvisor.compat import SANDBOX_PATH
from moat.runtime.gvisor.oci import NODEV_FILE, SKELETON_DIRS, SKELETON_SYMLINKS
from moat.runtime.rootlayout import Op
from moat.runtime.spec import HOME, SANDBOX_GID, SANDBOX_UID, SSH_CONFIG

__all__ = ["ETC_BINDS", "OWNED", "etc_binds", "write_skeleton"]

#: Host /etc entries bound read-only when they exist: the dynamic linker's cache, Debian's
#: alternatives symlinks (libblas.so.3 for numpy), the CA bundle, matplotlib's config.
ETC_BINDS: Final = (
    "/etc/ld.so.cache",
    "/etc/alternatives",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/matplotlibrc",
)


def _synthetic_etc(hostname: str) -> dict[str, str]:
    return {
        "passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"user:x:{SANDBOX_UID}:{SANDBOX_GID}:user:{HOME}:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "group": f"root:x:0:\nuser:x:{SANDBOX_GID}:\nnogroup:x:65534:\n",
        "hostname": f"{hostname}\n",
        "hosts": f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n",
        "resolv.conf": "",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
        "ssh/ssh_config": SSH_CONFIG,
    }


def etc_binds() -> tuple[str, ...]:
    """The entries of :data:`ETC_BINDS` present on this host."""
    return tuple(p for p in ETC_BINDS if os.path.exists(p))


#: Paths moat puts in (or mounts on) the skeleton itself: never taken from a template's root
#: (issue 12; ``sys`` is gVisor's own sysfs).
OWNED: Final = (
    *(d for d in SKELETON_DIRS if d not in ("usr", "etc")),
    *(f"etc/{name}" for name in _synthetic_etc("sandbox")),
    "etc/ld.so.preload",
    SANDBOX_PATH.lstrip("/").split("/")[0],
)


def copied(op: Op) -> bool:
    """Whether a template entry is copied into the skeleton rather than bound: /etc's. Each
    bind is one more gofer mount, and /etc holds ~70 small entries (measured: +0.3 s per
    start when bound one by one); hard links make the copy ~2 ms."""
    return op.op == "bind" and op.path.startswith("etc/")


def _copy_in(src: Path, dst: Path, kind: str) -> None:
    """Copy a template entry (hard links where the file system allows; symlinks as symlinks,
    never followed; anything else left out: the root was checked before use)."""

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d, follow_symlinks=False)
        except OSError:
            shutil.copy2(s, d, follow_symlinks=False)

    if kind == "dir":
        shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
    elif kind == "file":
        link_or_copy(str(src), str(dst))


def write_skeleton(
    rootfs: Path,
    hostname: str,
    preload: Path | None = None,
    template: tuple[Op, ...] | None = None,
    source: str | None = None,
) -> None:
    """Create the read-only root skeleton at ``rootfs`` (which must not exist yet).

    ``preload``: a library copied to :data:`compat.SANDBOX_PATH` and named in
    ``/etc/ld.so.preload`` (the statx compatibility library). ``template``: the operations
    that lay a template's root out (runtime.templateroot): its directories and symlinks are
    made here, its binds get their mount points, except those :func:`copied` from the
    template's root ``source``; None is the host's /usr and a few /etc files.
    """
    rootfs.mkdir(mode=0o755)
    dirs = SKELETON_DIRS if template is None else tuple(d for d in SKELETON_DIRS if d != "usr")
    for d in dirs:
        (rootfs / d).mkdir(parents=True, mode=0o755, exist_ok=True)
    if template is None:
        for name, target in SKELETON_SYMLINKS:
            os.symlink(target, rootfs / name)
    for op in template or ():
        point = rootfs / op.path
        if op.op == "link":
            os.symlink(op.target, point)
        elif copied(op):
            _copy_in(Path(source or "/nonexistent") / op.path, point, op.kind)
        elif op.op == "dir" or op.kind == "dir":
            point.mkdir(mode=0o755, exist_ok=True)
        else:
            point.touch(mode=0o644)
    (rootfs / NODEV_FILE).touch(mode=0o000)  # bound over unwanted devices (oci.py)
    os.chmod(rootfs / NODEV_FILE, 0o000)
    etc = rootfs / "etc"
    for name, text in _synthetic_etc(hostname).items():
        (etc / name).parent.mkdir(mode=0o755, exist_ok=True)
        (etc / name).write_text(text)
        os.chmod(etc / name, 0o644)
    if preload is not None:
        inside = rootfs / SANDBOX_PATH.lstrip("/")
        inside.parent.mkdir(mode=0o755)
        shutil.copyfile(preload, inside)
        os.chmod(inside, 0o644)
        (etc / "ld.so.preload").write_text(SANDBOX_PATH + "\n")
        os.chmod(etc / "ld.so.preload", 0o644)
    # mount points of the /etc binds: a file or a directory, as on the host
    for path in etc_binds() if template is None else ():
        dest = rootfs / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if os.path.isdir(path):
            dest.mkdir(exist_ok=True, mode=0o755)
        else:
            dest.touch(mode=0o644)
