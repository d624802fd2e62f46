"""Build a template: each layer in a build sandbox, cached by content hash, then published.

Trust domain: host engine. Every step (the base's mmdebstrap, an image's unpacking, apt,
pip, npm, copies, commands) runs in :mod:`moat.runtime.container.build`'s sandbox with
egress only to the sources that step needs, through a gateway that audits every decision
under the step's id. The host only copies directories, checks and publishes the result:

* a layer is cached under ``hash(parent key, step)``: an unchanged rebuild runs nothing,
  changing the last step rebuilds only it; a layer is built under its lock, so concurrent
  builds of one template build it once;
* the published root is checked: device nodes, fifos and sockets removed, setuid/setgid
  bits stripped, everything owned by root (the sandbox user reads it, invariant 9: nothing
  in a template can raise privileges, it is also mounted nosuid);
* every layer and the whole template are under a size cap, which the kernel enforces while a
  step runs (:mod:`moat.runtime.container.buildfs`: bytes and inodes, ENOSPC past them);
* a failure or cancellation removes its temp directories (``gc`` removes a crash's).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moat.egress import Gateway, GatewayConfig, NetworkPolicy, SystemResolver
from moat.egress.addr import IPAddress
from moat.errors import InvalidArgumentError, NotFoundError, TemplateBuildError, TimeoutError
from moat.model.config import Limits
from moat.protocol.contract import SANDBOX_UID
from moat.runtime.container import build as sandbox
from moat.runtime.container import buildfs
from moat.store import AuditLog
from moat.templates import context as ctx
from moat.templates.define import SOURCES, Base, Step, TemplateDef
from moat.templates.ref import TemplateRef, find
from moat.templates.store import Store, remove_tree, tree_bytes

log = logging.getLogger("moat.templates")

MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEFAULT_SIZE_CAP_MB = 8192
#: Packages every Debian base has beyond ``minbase``: TLS roots for pip and npm.
BASE_PACKAGES = ("ca-certificates",)

Output = Callable[[bytes], None]


@dataclass(frozen=True)
class BuildOptions:
    """How a build runs. ``unsafe_allow_networks``: addresses a site's package mirror has
    that the gateway would otherwise never dial (private or reserved; warned at start)."""

    size_cap_mb: int = DEFAULT_SIZE_CAP_MB
    step_timeout: float = 1800.0
    unsafe_allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: a CA bundle build steps trust besides the root's own (a TLS-intercepting site proxy)
    ca_file: Path | None = None

    @classmethod
    def from_env(cls, **kw: Any) -> BuildOptions:
        """Read ``MOAT_UNSAFE_BUILD_NETWORKS`` (comma-separated CIDRs) and
        ``MOAT_BUILD_CA_FILE`` (a PEM bundle)."""
        raw = os.environ.get("MOAT_UNSAFE_BUILD_NETWORKS", "")
        try:
            nets = tuple(ipaddress.ip_network(n.strip()) for n in raw.split(",") if n.strip())
        except ValueError as exc:
            raise InvalidArgumentError("MOAT_UNSAFE_BUILD_NETWORKS: bad network") from exc
        ca = os.environ.get("MOAT_BUILD_CA_FILE")
        if ca and not Path(ca).is_file():
            raise InvalidArgumentError("MOAT_BUILD_CA_FILE is not a file")
        kw.setdefault("ca_file", Path(ca) if ca else None)
        return cls(unsafe_allow_networks=nets, **kw)


class _StepResolver:
    """The system resolver, retried on a transient failure and remembered for the step's
    life (apt asks for the same name for every package). The gateway still classifies
    every answer before dialling it (invariant 2)."""

    def __init__(self) -> None:
        self._inner = SystemResolver()
        self._known: dict[tuple[str, int], list[IPAddress]] = {}

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        key = (host, port)
        if key in self._known:
            return list(self._known[key])
        for attempt in range(4):
            try:
                answer = await self._inner.resolve(host, port)
            except OSError:
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if answer:
                self._known[key] = answer
                return list(answer)
        return []


class Builder:
    """Builds templates into a :class:`Store`."""

    def __init__(
        self,
        store: Store | None = None,
        options: BuildOptions | None = None,
        audit: AuditLog | None = None,
        on_output: Output | None = None,
    ) -> None:
        self.store = store or Store.default()
        self.options = options or BuildOptions.from_env()
        self.audit = audit
        self._out = on_output or (lambda b: None)
        #: the label of each step that ran (was not cached) in the last build
        self.ran: list[str] = []
        #: label -> the build sandbox's id (its audit rows' sandbox id), for the same steps
        self.step_ids: dict[str, str] = {}
        #: the keys of every layer this builder added to the cache (all builds)
        self.built: list[str] = []
        #: called with a build's template id before anything of it is published (a tenant's
        #: build claims the id first: moat.templates.tenant, invariant 11)
        self.on_template_id: Callable[[str], None] | None = None

    def say(self, text: str) -> None:
        self._out(f"==> {text}\n".encode())

    # -- public -----------------------------------------------------------------------------

    async def build(
        self, defn: TemplateDef, name: str | None = None, context_dir: Path | None = None
    ) -> TemplateRef:
        """Build ``defn`` (files and images come from ``context_dir``), publish it under its
        id and ``name``; the built template."""
        self.store.prepare()
        self.ran = []
        self.step_ids = {}
        building = await self.store.building()  # no gc while this build runs
        try:
            # what a crashed build left (mounts, images); gc is excluded by the lock above
            if n := await asyncio.to_thread(self.store.sweep):
                log.warning("removed what %d dead template build(s) left", n)
            staging = self.store.tmpdir(self.store.layers)
        except BaseException:
            os.close(building)
            raise
        try:
            defn, inputs = await asyncio.to_thread(self._stage, defn, context_dir, staging)
            keys = defn.layer_keys()
            tid = defn.template_id()
            if self.on_template_id is not None:
                self.on_template_id(tid)
            meta = self.store.meta(tid)
            if meta is None:
                top = await self._layers(defn, keys, inputs)
                await self._publish(defn, tid, name, keys, top)
            elif name is not None:
                self.store.set_name(name, tid)
            self.say(f"template {tid[:12]}{f' ({name})' if name else ''} ready")
        finally:
            await asyncio.to_thread(remove_tree, staging)
            os.close(building)
        found = find(tid, self.store.templates)
        if found is None:
            raise TemplateBuildError("publish", "the template was removed while it was built")
        return found

    # -- staging ----------------------------------------------------------------------------

    def _stage(
        self, defn: TemplateDef, context_dir: Path | None, staging: Path
    ) -> tuple[TemplateDef, dict[int, Path]]:
        """Copy context files and images into ``staging``; the definition with their hashes
        (and the base template's layer) filled in; step index -> its staged inputs."""
        sandbox.own_dir(staging)  # the build ids read the staged inputs
        inputs: dict[int, Path] = {}
        base = defn.base
        if base.kind == "template":
            base = replace(base, digest=self._base_layer(base.ref))
        elif base.kind == "oci":
            d = staging / "base"
            d.mkdir(mode=0o755)
            base = replace(base, digest=ctx.stage_image(self._context(context_dir), base.ref, d))
            inputs[0] = d
        steps = list(defn.steps)
        for i, step in enumerate(steps, start=1):
            if step.kind != "copy":
                continue
            d = staging / f"step{i}"
            d.mkdir(mode=0o755)
            files = ctx.stage(self._context(context_dir), step.args[0], d / "item", step.line)
            steps[i - 1] = replace(step, files=files)
            inputs[i] = d
        return replace(defn, base=base, steps=tuple(steps)), inputs

    @staticmethod
    def _context(context_dir: Path | None) -> Path:
        if context_dir is None:
            raise InvalidArgumentError("this template copies files but has no build context")
        return context_dir

    def _base_layer(self, name: str) -> str:
        ref = find(name, self.store.templates)
        if ref is None:
            raise NotFoundError(f"base template {name!r} is not built")
        layers = (self.store.meta(ref.id) or {}).get("layers") or []
        if not layers or self.store.layer(str(layers[-1])) is None:
            raise NotFoundError(
                f"base template {name!r} has no cached layers (removed by gc?): rebuild it"
            )
        return str(layers[-1])

    # -- layers -----------------------------------------------------------------------------

    async def _layers(self, defn: TemplateDef, keys: list[str], inputs: dict[int, Path]) -> Path:
        """Every layer, from the cache or built; the top layer's root."""
        total = len(defn.steps) + 1
        parent: Path | None = None
        for i, key in enumerate(keys):
            step = defn.steps[i - 1] if i else None
            label = f"{i + 1}/{total} " + (step.describe() if step else f"base {defn.base.ref}")
            cached = self.store.layer(key)
            if cached is None:
                fd = await self._lock(key, label)
                try:
                    cached = self.store.layer(key)  # built by a concurrent build meanwhile
                    if cached is None:
                        if i == 0 and defn.base.kind == "template":
                            raise NotFoundError("the base template's layers were removed")
                        self.say(f"step {label}")
                        cached = await self._build_layer(
                            key, label, parent, step, defn.base, inputs.get(i)
                        )
                finally:
                    os.close(fd)
            else:
                self.say(f"step {label} (cached)")
            parent = cached
        assert parent is not None
        return parent

    async def _lock(self, key: str, label: str) -> int:
        """``key``'s build lock, polled (a cancelled wait holds nothing)."""
        waited = False
        while (fd := self.store.try_lock(key)) is None:
            if not waited:
                self.say(f"step {label}: waiting for a concurrent build of it")
                waited = True
            await asyncio.sleep(0.25)
        return fd

    async def _build_layer(
        self,
        key: str,
        label: str,
        parent: Path | None,
        step: Step | None,
        base: Base,
        inputs: Path | None,
    ) -> Path:
        """One layer: the step runs on a file system the kernel caps (``buildfs``: the parent
        read-only under an overlay whose writes land in a sparse ext4 image of the room left
        under the size cap, inodes included; invariant 10); the result is measured, then
        copied into the cache and the file system removed, on every path (invariant 5)."""
        tmp = self.store.tmpdir(self.store.layers)
        sandbox.own_dir(tmp)
        try:
            root = tmp / "root"
            budget = await asyncio.to_thread(self._budget, label, parent)
            async with buildfs.step_fs(tmp, budget, parent) as fs:
                if step is None:
                    spec_root, command, allow = await self._base_spec(fs.disk, base)
                    host_root = True
                else:
                    spec_root, command, allow = fs.root, _command(step), step.allow_out()
                    host_root = False
                self.ran.append(label)
                spec = sandbox.BuildSpec(
                    step_id=sandbox.step_id(),
                    root=spec_root,
                    command=command,
                    inputs=inputs,
                    host_root=host_root,
                    ca_file=self.options.ca_file,
                    timeout=self.options.step_timeout,
                    limits=Limits(
                        cpus=2.0, memory_mb=2048, pids=1024, disk_mb=self.options.size_cap_mb
                    ),
                )
                self.step_ids[label] = spec.step_id
                try:
                    code, tail = await self._run(spec, allow, label)
                except TimeoutError as exc:  # moat's: the step ran past its limit
                    raise TemplateBuildError(label, str(exc)) from None
                if fs.full():  # its writes were refused (ENOSPC), whatever it exited with
                    raise TemplateBuildError(
                        label,
                        f"it filled the room under the template's size cap of"
                        f" {self.options.size_cap_mb} MiB ({budget >> 20} MiB and"
                        f" {fs.inodes} files for this step; it exited with {code})",
                        output=_text(tail),
                    )
                if code != 0:
                    raise TemplateBuildError(
                        label, f"exit code {code}", exit_code=code, output=_text(tail)
                    )
                made = spec_root if step is not None else fs.disk / "root"
                if base.kind == "oci" and step is None:
                    made = fs.disk / "target" / "root"
                    # made inside the sandbox: a directory, never a symlink to the host's files
                    if not stat.S_ISDIR(os.lstat(made).st_mode):
                        raise TemplateBuildError(label, "the image did not unpack to a directory")
                size = await asyncio.to_thread(tree_bytes, made)
                self._check_size(label, size)
                await asyncio.to_thread(_copy_tree, made, root)
            committed = self.store.commit_layer(tmp, key, {"step": label, "bytes": size})
            self.built.append(key)
            return committed
        finally:
            if tmp.exists():
                await asyncio.to_thread(remove_tree, tmp)

    def _budget(self, label: str, parent: Path | None) -> int:
        """Bytes a step may add: the size cap less what its parent layer already takes."""
        cap = self.options.size_cap_mb * 1024 * 1024
        used = 0
        if parent is not None:
            try:
                used = int(json.loads((parent.parent / "layer.json").read_text())["bytes"])
            except (OSError, ValueError, KeyError, TypeError):
                used = tree_bytes(parent)
        if used >= cap:
            raise TemplateBuildError(
                label,
                f"the layer it starts from is {used >> 20} MiB, over the template's size cap"
                f" of {self.options.size_cap_mb} MiB",
            )
        return cap - used

    def _check_size(self, label: str, size: int) -> None:
        cap = self.options.size_cap_mb * 1024 * 1024
        if size > cap:
            raise TemplateBuildError(
                label,
                f"the template's root is {size >> 20} MiB, over its size cap of"
                f" {self.options.size_cap_mb} MiB",
            )

    async def _base_spec(
        self, tmp: Path, base: Base
    ) -> tuple[Path, tuple[str, ...], tuple[str, ...]]:
        """The base's command and where it writes (``tmp``: the step's capped disk)."""
        if base.kind == "debian":
            root = tmp / "root"
            root.mkdir()
            sandbox.own_dir(root)
            hook = (
                f'chroot "$1" useradd --uid {SANDBOX_UID} --user-group --create-home'
                " --shell /bin/bash user"
            )
            command = (
                "mmdebstrap", "--mode=root", "--variant=minbase", "--skip=chroot/mount",
                f"--keyring={KEYRING}", f"--include={','.join(BASE_PACKAGES)}",
                f"--customize-hook={hook}", "--verbose", base.ref, "/target", MIRROR,
            )  # fmt: skip
            return root, command, SOURCES["debian"]
        if base.kind == "oci":
            target = tmp / "target"
            target.mkdir()
            sandbox.own_dir(target)
            return target, ("/bin/sh", "-ec", _UNPACK_OCI, "unpack"), ()
        raise InvalidArgumentError("unknown base")

    async def _run(
        self, spec: sandbox.BuildSpec, allow: tuple[str, ...], label: str
    ) -> tuple[int, bytes]:
        gateway = Gateway(
            spec.step_id,
            NetworkPolicy(allow_out=list(allow)),
            audit=self.audit,
            # apt fetches each package with its own plain-HTTP request: an installer's rate
            config=GatewayConfig(
                max_requests_per_second=500.0,
                request_burst=5000,
                unsafe_allow_networks=self.options.unsafe_allow_networks,
                resolver=_StepResolver(),
            ),
        )
        if self.audit is not None:  # the step's life beside its egress rows
            self.audit.record_sandbox(spec.step_id, "created", "build", reason=label)
        ended = "ended: died"
        try:
            code, tail = await sandbox.run_step(spec, gateway.handle_connection, self._out)
            ended = f"exit {code}"
            return code, tail
        except BaseException as exc:
            ended = f"ended: {type(exc).__name__}"
            raise
        finally:
            await gateway.close()
            if self.audit is not None:
                self.audit.record_sandbox(spec.step_id, "ended", "build", reason=ended)

    # -- publish ----------------------------------------------------------------------------

    async def _publish(
        self, defn: TemplateDef, tid: str, name: str | None, keys: list[str], top: Path
    ) -> None:
        self.say("checking and publishing the root")
        fd = await self._lock(f"publish-{tid}", "publish")
        tmp = self.store.tmpdir(self.store.templates)
        try:
            if self.store.meta(tid) is not None:  # a concurrent build published it
                if name is not None:
                    self.store.set_name(name, tid)
                return
            await asyncio.to_thread(_copy_tree, top, tmp / "rootfs")
            await asyncio.to_thread(finalize, tmp / "rootfs")
            os.chmod(tmp, 0o755)  # noqa: S103 - sandboxes read the root
            size = await asyncio.to_thread(tree_bytes, tmp / "rootfs")
            self._check_size("publish", size)
            meta = {
                "name": name or tid[:12],
                **defn.settings(),
                "layers": keys,
                "bytes": size,
                "created": time.time(),
                "labels": {},
            }
            await asyncio.to_thread(self.store.publish, tid, name, tmp, meta)
        finally:
            if self.store.meta(tid) is not None:  # published: whoever waits returns early
                with contextlib.suppress(OSError):
                    (self.store.layers / f"publish-{tid}.lock").unlink()
            os.close(fd)
            if tmp.exists():
                await asyncio.to_thread(remove_tree, tmp)


_UNPACK_OCI = f"""
I={sandbox.INPUT_DIR}
if [ -f "$I/image.tar" ]; then
  if tar -tf "$I/image.tar" oci-layout >/dev/null 2>&1; then
    mkdir /tmp/oci && tar -xf "$I/image.tar" -C /tmp/oci
  else
    skopeo --insecure-policy copy -q "docker-archive:$I/image.tar" oci:/tmp/oci:image
  fi
  layout=/tmp/oci
else
  layout="$I/image"
fi
tag=$(umoci ls --layout "$layout" | head -n 1)
[ -n "$tag" ] || {{ echo "the image has no tag"; exit 2; }}
umoci raw unpack --image "$layout:$tag" /target/root
"""


def _command(step: Step) -> tuple[str, ...]:
    if step.kind == "apt":
        script = (
            'apt-get update -q && apt-get install -y -q --no-install-recommends "$@"'
            " && apt-get clean && rm -rf /var/lib/apt/lists/*"
        )
        return ("/bin/sh", "-c", script, "apt", *step.args)
    if step.kind == "pip":
        return (
            "python3", "-m", "pip", "install", "--no-cache-dir", "--break-system-packages",
            "--root-user-action=ignore", "--progress-bar", "off", *step.args,
        )  # fmt: skip
    if step.kind == "npm":
        return (
            "npm",
            "install",
            "-g",
            "--no-audit",
            "--no-fund",
            "--no-update-notifier",
            *step.args,
        )
    if step.kind == "copy":
        dest = step.args[1]
        if dest.endswith("/"):
            dest += step.args[0].rstrip("/").rsplit("/", 1)[-1]
        script = (
            'mkdir -p -- "$(dirname -- "$2")"'
            ' && cp -rT --preserve=mode,timestamps,links -- "$1" "$2"'
        )
        return ("/bin/sh", "-c", script, "copy", f"{sandbox.INPUT_DIR}/item", dest)
    return ("/bin/sh", "-c", step.args[0])


def _copy_tree(src: Path, dest: Path) -> None:
    """``cp -a`` (reflinks where the file system has them): ownership, modes, links kept."""
    try:
        subprocess.run(
            ["cp", "-a", "--reflink=auto", "--", str(src), str(dest)],
            check=True,
            capture_output=True,
            timeout=3600,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        log.warning("copying a template layer failed: %s", exc)
        raise TemplateBuildError("copy", "copying a layer failed (is the disk full?)") from None


def finalize(root: Path) -> None:
    """Make a built root safe to share read-only: no device nodes, fifos or sockets, no
    setuid/setgid bits, everything owned by root. Never follows a symlink."""
    if not stat.S_ISDIR(os.lstat(root).st_mode):
        raise TemplateBuildError("publish", "the built root is not a directory")
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            mode = st.st_mode
            if (
                stat.S_ISCHR(mode)
                or stat.S_ISBLK(mode)
                or stat.S_ISFIFO(mode)
                or stat.S_ISSOCK(mode)
            ):
                os.unlink(path)
                continue
            os.lchown(path, 0, 0)
            if not stat.S_ISLNK(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID))
    os.chown(root, 0, 0)
    os.chmod(root, 0o755)  # noqa: S103 - a root directory's usual mode


def _text(tail: bytes) -> str:
    return tail.decode("utf-8", "replace")[-4000:]
