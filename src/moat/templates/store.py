"""Built templates and the layer cache on disk: publish, list, remove, collect garbage.

Trust domain: host engine. Layouts (``moat.templates.ref`` for published templates)::

    <templates>/<id>/rootfs, <id>/template.json (last), names/<name> -> ../<id>
    <layers>/<key>/root        one cached build layer, owned by the build id range
    <layers>/<key>/layer.json  written before the directory is renamed into place
    <layers>/<key>.lock        held while that layer is built (concurrent builds build once)
    .tmp-<pid>-<random>        work in progress in either directory (gc removes a dead pid's)
    .tmp-…/disk.img, disk/, merged/  a running step's capped file system (runtime.container.
                               buildfs): mounted while it runs; ``sweep`` unmounts a dead one's

Every directory appears by an atomic rename, so a crash or a cancelled build leaves only
``.tmp-*`` directories behind, never a half-made layer or template (invariant 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moat.errors import CapacityError, InvalidArgumentError, NotFoundError
from moat.runtime.container import buildfs
from moat.templates import ref

_ID_LEN = 64
#: In the layers directory: held shared by every build, exclusively by gc (Store.building).
_BUILDS_LOCK = "builds.lock"


@dataclass(frozen=True)
class Store:
    """Where templates are published and where build layers are cached."""

    templates: Path
    layers: Path

    @classmethod
    def default(cls) -> Store:
        base = ref.root()
        env = os.environ.get("MOAT_TEMPLATE_LAYERS")
        return cls(base, Path(env) if env else base / "layers")

    def prepare(self) -> None:
        for d in (self.templates, self.templates / "names"):
            d.mkdir(parents=True, exist_ok=True, mode=0o755)
            os.chmod(d, 0o755)  # noqa: S103 - sandboxes read published roots from here
        # layers hold unchecked build output: each layer and temp directory is 0700 and
        # owned by the build ids (runtime.container.build.own_dir); this one only lets them
        # (and root) pass through to theirs
        self.layers.mkdir(parents=True, exist_ok=True, mode=0o711)
        os.chmod(self.layers, 0o711)  # noqa: S103 - traverse only, see above

    # -- temp dirs ------------------------------------------------------------------------

    def tmpdir(self, parent: Path) -> Path:
        path = parent / f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
        path.mkdir(mode=0o700)
        return path

    def sweep(self) -> int:
        """Remove what builds that died (a crash, SIGKILL) left in the layer cache: their
        steps' mounted file systems (and so their loop devices) first, then their temp
        directories with the images in them (invariant 5). A live process's are left alone,
        so this is safe beside running builds; two sweeps never remove one directory twice,
        and none runs beside gc (which removes the same)."""
        if not self.layers.is_dir():
            return 0
        fd = os.open(self.layers / _BUILDS_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # gc holds it: it removes these itself
            count = 0
            for p in list(self.layers.iterdir()):
                if not (p.name.startswith(".tmp-") and _dead(p.name)):
                    continue
                buildfs.unmount_under(p)
                claimed = self.layers / f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
                try:
                    os.rename(p, claimed)  # ours now: another sweep finds it gone
                except FileNotFoundError:
                    continue
                remove_tree(claimed)
                count += 1
            return count
        finally:
            os.close(fd)

    # -- layers ---------------------------------------------------------------------------

    def layer(self, key: str) -> Path | None:
        """The cached layer's root directory, or None."""
        d = self.layers / key
        return d / "root" if (d / "layer.json").is_file() else None

    def try_lock(self, key: str) -> int | None:
        """Take ``key``'s build lock without waiting: its fd (close it to release), or None."""
        fd = os.open(self.layers / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    async def building(self) -> int:
        """Take the store's build lock, shared, for a whole build (its fd: close it to
        release). ``gc`` takes it exclusively: a layer a build has finished but no template
        names yet is never removed under it."""
        fd = os.open(self.layers / _BUILDS_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_SH)  # waits out a running gc
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold ``key``'s build lock (blocking: a second build waits for the first)."""
        fd = os.open(self.layers / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def commit_layer(self, tmp: Path, key: str, info: dict[str, Any]) -> Path:
        (tmp / "layer.json").write_text(json.dumps(info, sort_keys=True))
        os.rename(tmp, self.layers / key)
        return self.layers / key / "root"

    # -- published templates ----------------------------------------------------------------

    def publish(self, tid: str, name: str | None, rootfs_tmp: Path, meta: dict[str, Any]) -> None:
        """Move a finished root into place as template ``tid`` and name it. The root moves
        first, ``template.json`` is written last, then the name (atomic renames)."""
        final = self.templates / tid
        if not (final / "template.json").is_file():
            if final.exists():  # an unfinished earlier attempt: never used, replace it
                remove_tree(final)
            os.rename(rootfs_tmp, final)
            _write_atomic(final / "template.json", json.dumps(meta, sort_keys=True, indent=1))
        elif rootfs_tmp.exists():
            remove_tree(rootfs_tmp)
        if name is not None:
            self.set_name(name, tid)

    def set_name(self, name: str, tid: str) -> None:
        ref.check_name(name)
        if len(name) == _ID_LEN:
            raise InvalidArgumentError("a template name can't look like a template id")
        link = self.templates / "names" / name
        tmp = link.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(6)}")
        os.symlink(f"../{tid}", tmp)
        os.replace(tmp, link)

    def meta(self, tid: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.templates / tid / "template.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def names(self) -> dict[str, str]:
        """name -> id of every named template."""
        out: dict[str, str] = {}
        d = self.templates / "names"
        for link in sorted(d.iterdir()) if d.is_dir() else []:
            if link.is_symlink() and not link.name.startswith("."):
                out[link.name] = Path(os.readlink(link)).name
        return out

    def ids(self) -> list[str]:
        if not self.templates.is_dir():
            return []
        return sorted(
            p.name
            for p in self.templates.iterdir()
            if len(p.name) == _ID_LEN and (p / "template.json").is_file()
        )

    def list(self) -> list[dict[str, Any]]:
        """One entry per built template: id, names, bytes, created."""
        by_id: dict[str, list[str]] = {}
        for name, tid in self.names().items():
            by_id.setdefault(tid, []).append(name)
        out = []
        for tid in self.ids():
            meta = self.meta(tid) or {}
            out.append(
                {
                    "id": tid,
                    "names": by_id.get(tid, []),
                    "bytes": int(meta.get("bytes", 0)),
                    "created": meta.get("created"),
                }
            )
        return out

    def remove(self, name: str) -> str:
        """Remove a name (and the template when no other name refers to it); its id."""
        ref.check_name(name)
        names = self.names()
        if name in names:
            tid = names[name]
            (self.templates / "names" / name).unlink()
        elif (self.templates / name / "template.json").is_file():
            tid = name
            for n, t in names.items():
                if t == tid:
                    (self.templates / "names" / n).unlink()
        else:
            raise NotFoundError("no such template")
        if tid not in self.names().values():
            self._drop(tid)
        return tid

    def _drop(self, tid: str) -> None:
        final = self.templates / tid
        if final.exists():
            doomed = self.tmpdir(self.templates)
            os.rename(final, doomed / "t")  # gone from view at once, then deleted
            remove_tree(doomed)

    def gc(self) -> dict[str, int]:
        """Remove unnamed templates, layers no template uses and dead builds' temp dirs.
        Refused (CapacityError) while a build runs: its finished layers are named by no
        template yet."""
        self.prepare()
        fd = os.open(self.layers / _BUILDS_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CapacityError(
                    "template builds are running: run gc again once they have ended"
                ) from None
            return self._gc()
        finally:
            os.close(fd)

    def _gc(self) -> dict[str, int]:
        from moat.templates.tenant import owned_ids  # it builds on this module

        removed = {"templates": 0, "layers": 0, "temp": 0}
        # a tenant's templates (built through the server) are named in its own area
        named = set(self.names().values()) | owned_ids(self.templates)
        for tid in self.ids():
            if tid not in named:
                self._drop(tid)
                removed["templates"] += 1
        for d in (self.templates, self.layers):
            for p in d.iterdir() if d.is_dir() else []:
                if p.name.startswith(".tmp-") and _dead(p.name):
                    buildfs.unmount_under(p)  # a step's file system, never rm'd through
                    remove_tree(p)
                    removed["temp"] += 1
        keep: set[str] = set()
        for tid in self.ids():
            keep.update(str(k) for k in (self.meta(tid) or {}).get("layers", []))
        for p in self.layers.iterdir() if self.layers.is_dir() else []:
            if len(p.name) == _ID_LEN and p.is_dir() and p.name not in keep:
                with self.lock(p.name):
                    remove_tree(p)
                removed["layers"] += 1
            elif (
                p.name.endswith(".lock")
                and p.name != _BUILDS_LOCK
                and p.name.removeprefix("publish-")[:-5] not in keep
            ):
                with contextlib.suppress(OSError):
                    if not (self.layers / p.name[:-5]).exists():
                        p.unlink()
        return removed


def _dead(tmpname: str) -> bool:
    """Whether the process that made ``.tmp-<pid>-...`` is gone."""
    try:
        pid = int(tmpname.split("-")[1])
        os.kill(pid, 0)
    except (ValueError, IndexError):
        return True
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def remove_tree(path: Path) -> None:
    """Delete ``path`` whatever the modes inside (a build may leave 0000 directories)."""

    def onerror(func: Any, p: str, exc: Any) -> None:
        with contextlib.suppress(OSError):
            parent = os.path.dirname(p)
            os.chmod(parent, stat.S_IRWXU)
            func(p)

    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    for _ in range(3):
        shutil.rmtree(path, onerror=onerror)
        if not path.exists():
            return
        time.sleep(0.05)
    if path.exists():
        raise OSError(errno.ENOTEMPTY, "could not remove a template directory")


def tree_bytes(root: Path) -> int:
    """Bytes under ``root``: allocated blocks, or a sparse file's apparent size where larger
    (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            # a sparse file counts at its apparent size: what a copy of it or a disk image
            # made from it (the microVM's) would take, not the blocks it holds here
            total += max(st.st_blocks * 512, st.st_size if stat.S_ISREG(st.st_mode) else 0)
    return total
