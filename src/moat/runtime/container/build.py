"""The build sandbox: one template build step in a container-tier sandbox with a writable root.

Trust domain: host engine. What runs inside (a package's install scripts, a template's
commands) is hostile, like any sandboxed code. This reuses the container tier's machinery
(bubblewrap, its seccomp filter, a cgroup with limits, the egress gateway) without changing
how normal sandboxes start. It differs in three ways, all needed by apt and dpkg:

* the root is writable (one layer being built: :mod:`.buildfs` puts it on a file system
  the kernel caps), not the host's ``/usr``;
* the user namespace maps 65,536 ids (root inside = :data:`BUILD_UID_BASE` on the host),
  so packages can own files by other users; a fixed, otherwise unused host range that owns
  nothing outside the (root-only) layer store. Processes still hold no capability outside
  their namespaces, run under ``no_new_privs`` and the seccomp filter (invariant 9);
* the network is loopback only, as everywhere (invariant 2): the host binds a listening
  socket inside the sandbox's network namespace and hands each connection to the caller's
  egress gateway (:mod:`moat.templates` allows only the hosts the step needs, audited).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ctypes
import json
import logging
import os
import resource
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from moat.errors import IsolationUnavailableError, TimeoutError
from moat.model.config import Limits
from moat.runtime import cgroups, seccomp
from moat.runtime.container import bwrap, userns
from moat.runtime.container.driver import UID_BASE, UID_SPAN
from moat.runtime.offthread import owned, settle

log = logging.getLogger("moat.runtime.container.build")

#: Host uid (and gid) of root inside every build sandbox; the next 65,535 ids follow it.
#: Beyond the per-sandbox range of the container tier (driver.UID_BASE .. + UID_SPAN).
BUILD_UID_BASE = UID_BASE + UID_SPAN
BUILD_ID_COUNT = 65536
#: The proxy port inside a build sandbox (``http_proxy=http://127.0.0.1:PROXY_PORT``).
PROXY_PORT = 3128
#: Where a step sees its read-only inputs (build context files, an OCI image).
INPUT_DIR = "/run/moat-input"
CA_FILE = "/run/moat-ca.pem"
_CA_VARS = (
    "SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
    "npm_config_cafile", "GIT_SSL_CAINFO",
)  # fmt: skip
#: Root's capabilities inside a step (in its own user namespace only): what package installs
#: need, as in Docker's default set without NET_RAW; no SYS_ADMIN, SYS_PTRACE, NET_ADMIN...
CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_MKNOD",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_AUDIT_WRITE",
)  # fmt: skip
_CLONE_NEWNET = 0x40000000
_TAIL = 8192


@dataclass(frozen=True)
class BuildSpec:
    """One build step's sandbox. ``root`` is bound writable at ``/``; with ``host_root`` the
    sandbox instead sees the host's ``/usr`` read-only (like a normal sandbox) and ``root``
    bound writable at ``/target`` (for mmdebstrap, umoci and skopeo, which live on the host)."""

    step_id: str  # [a-z0-9-]{4,64}: the cgroup's name and the audit rows' sandbox id
    root: Path
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    inputs: Path | None = None  # bound read-only at INPUT_DIR
    host_root: bool = False
    read_only: bool = False  # bind ``root`` read-only (running a command on a built root)
    #: extra CA bundle the step trusts (a site's TLS-intercepting proxy or mirror); bound at
    #: CA_FILE and named by the usual variables, never written into the root
    ca_file: Path | None = None
    #: cgroup limits; ``disk_mb`` is the largest file a step may write (RLIMIT_FSIZE)
    limits: Limits = field(
        default_factory=lambda: Limits(cpus=2.0, memory_mb=2048, pids=1024, disk_mb=8192)
    )
    timeout: float = 1800.0


def build_argv(spec: BuildSpec, seccomp_fd: int, info_fd: int, block_fd: int) -> list[str]:
    """The bwrap command line for ``spec`` (pure; run as root of the mapped user namespace)."""
    argv = [
        "bwrap",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--unshare-cgroup",
        "--hostname", "build",
        "--die-with-parent", "--new-session", "--clearenv",
        "--info-fd", str(info_fd), "--block-fd", str(block_fd),
    ]  # fmt: skip
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "TMPDIR": "/tmp",  # noqa: S108 - the sandbox's own tmpfs
    }
    proxy = f"http://127.0.0.1:{PROXY_PORT}"
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = proxy
    if spec.ca_file is not None:
        env.update(dict.fromkeys(_CA_VARS, CA_FILE))
    env.update(dict(spec.env))
    for key, value in sorted(env.items()):
        argv += ["--setenv", key, value]
    if spec.host_root:
        # A normal sandbox's view of the host (invariant 1: /usr and a vetted /etc subset).
        argv += ["--ro-bind", "/usr", "/usr"]
        for target, link in bwrap.USR_LINKS:
            argv += ["--symlink", target, link]
        argv += ["--dir", "/etc"]
        for name in bwrap.HOST_ETC:
            argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        argv += ["--bind", str(spec.root), "/target"]
    else:
        argv += ["--ro-bind" if spec.read_only else "--bind", str(spec.root), "/"]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--perms", "1777", "--size", str(1 << 30), "--tmpfs", "/tmp"]  # noqa: S108
    argv += ["--tmpfs", "/run"]
    if spec.inputs is not None:
        argv += ["--ro-bind", str(spec.inputs), INPUT_DIR]
    if spec.ca_file is not None:
        argv += ["--ro-bind", str(spec.ca_file), CA_FILE]
    argv += ["--cap-drop", "ALL"]
    for cap in CAPS:
        argv += ["--cap-add", cap]
    argv += ["--seccomp", str(seccomp_fd), "--chdir", "/", "--"]
    return argv + list(spec.command)


def _setns_listen(pid: int) -> socket.socket:
    """A TCP socket listening on 127.0.0.1:PROXY_PORT in ``pid``'s network namespace.

    ``setns`` on a throwaway thread: a network namespace is per thread, and a socket keeps
    the namespace it was created in wherever it is used afterwards.
    """
    out: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            out.append(_listen_in(pid))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            out.append(exc)

    t = threading.Thread(target=work, name="moat-build-netns")
    t.start()
    t.join()
    result = out[0]
    if isinstance(result, BaseException):
        raise IsolationUnavailableError("the build sandbox's network could not be set up") from (
            result
        )
    return result


def _listen_in(pid: int) -> socket.socket:
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind(("127.0.0.1", PROXY_PORT))
                sock.listen(64)
                sock.setblocking(False)
                return sock
            finally:
                if libc.setns(own, _CLONE_NEWNET) != 0:  # the thread ends anyway
                    log.error("could not return a build thread to the host's namespace")
        finally:
            os.close(target)
    finally:
        os.close(own)


def _probe() -> None:
    for tool in ("bwrap", "nsenter"):
        if shutil.which(tool) is None:
            raise IsolationUnavailableError(f"template builds need '{tool}' on the host")
    if os.geteuid() != 0:
        raise IsolationUnavailableError("template builds need root (cgroups, id mapping)")


async def run_step(
    spec: BuildSpec,
    proxy: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    on_output: Callable[[bytes], None] | None = None,
) -> tuple[int, bytes]:
    """Run one build step; its exit code and the tail of its combined output.

    ``proxy`` serves each connection to the proxy port inside (the step's egress gateway's
    ``handle_connection``: the only way out, invariant 2).

    Fails closed (IsolationUnavailableError) if the sandbox can't be set up, raises
    moat.errors.TimeoutError past ``spec.timeout``; on any exit, cancellation included, the
    sandbox's processes, cgroup, gateway and namespace holder are gone (invariant 5).
    """
    _probe()
    manager = cgroups.detect()
    bpf = seccomp.build_filter()
    cg = await asyncio.to_thread(manager.create, spec.step_id, spec.limits)
    server: asyncio.Server | None = None
    tail = bytearray()
    started: _Started | None = None
    try:
        started = await owned(lambda: _start(spec, bpf, cg), lambda st: st.close())
        popen, block_w = started.popen, started.block_w
        with os.fdopen(started.info_r, "rb") as info:
            raw = await asyncio.to_thread(_read_info, info)
        try:
            child = int(json.loads(raw or b"{}")["child-pid"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("build sandbox did not start (bwrap said %r)", raw[-200:])
            raise IsolationUnavailableError("the build sandbox did not start") from exc
        sock = await asyncio.to_thread(_setns_listen, child)
        server = await asyncio.start_server(proxy, sock=sock)
        os.write(block_w, b"1")  # the network is ready: let the step run
        code = await asyncio.wait_for(_pump(popen, on_output, tail), spec.timeout)
        return code, bytes(tail)
    except builtins.TimeoutError as exc:
        raise TimeoutError(f"build step ran past its {spec.timeout:.0f} s limit") from exc
    finally:
        await settle(asyncio.get_running_loop().run_in_executor(None, _teardown, cg, started))
        if server is not None:
            server.close()


async def _pump(
    popen: subprocess.Popen[bytes], on_output: Callable[[bytes], None] | None, tail: bytearray
) -> int:
    assert popen.stdout is not None
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), popen.stdout
    )
    try:
        while chunk := await reader.read(65536):
            tail += chunk
            del tail[:-_TAIL]
            if on_output is not None:
                on_output(chunk)
    finally:
        transport.close()
    return await asyncio.to_thread(popen.wait)


def _read_info(info: BinaryIO) -> bytes:
    """bwrap's ``--info-fd`` JSON object (it may keep the pipe open: read to its last line)."""
    raw = b""
    while line := info.readline(4096):
        raw += line
        if line.startswith(b"}") or len(raw) > 65536:
            break
    return raw


def _teardown(cg: cgroups.SandboxCgroup, started: _Started | None) -> None:
    """Kill everything of the step (cgroup first: nothing escapes it), then remove it."""
    try:
        cg.kill()
    finally:
        if started is not None:
            started.close()
        cg.destroy()


@dataclass
class _Started:
    holder: userns.Holder
    popen: subprocess.Popen[bytes]
    info_r: int
    block_w: int

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        for fd in (self.info_r, self.block_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.holder.close()


def _start(spec: BuildSpec, bpf: bytes, cg: cgroups.SandboxCgroup) -> _Started:
    """Blocking: the namespace holder, then nsenter+bwrap, held at ``--block-fd``."""
    ids = [(0, BUILD_UID_BASE, BUILD_ID_COUNT)]
    holder = userns.Holder(cg.procs_files, ids, ids)
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()
    try:
        with tempfile.TemporaryFile() as filt:
            filt.write(bpf)
            filt.flush()
            filt.seek(0)
            sfd = filt.fileno()
            argv = build_argv(spec, sfd, info_w, block_r)
            argv[0] = shutil.which("bwrap") or "bwrap"
            nsenter = shutil.which("nsenter") or "nsenter"
            argv = [nsenter, f"--user={holder.path}", "--setuid", "0", "--setgid", "0", *argv]
            procs = list(cg.procs_files)
            nproc = spec.limits.pids + 8
            fsize = spec.limits.disk_mb * 1024 * 1024  # no one file beyond the size cap

            def preexec() -> None:  # os calls only, in the forked child
                for path in procs:
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.write(fd, str(os.getpid()).encode())
                    finally:
                        os.close(fd)
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(sfd, info_w, block_r),
                preexec_fn=preexec,
                env={"PATH": "/usr/bin:/bin"},
                cwd="/",
            )
    except BaseException:
        for fd in (info_r, block_w):
            os.close(fd)
        holder.close()
        raise
    finally:
        os.close(info_w)
        os.close(block_r)
    return _Started(holder, popen, info_r, block_w)


def own_dir(path: Path) -> None:
    """Give a fresh host directory to root of the build's ids (only they and host root
    enter it: 0700)."""
    os.chown(path, BUILD_UID_BASE, BUILD_UID_BASE)
    os.chmod(path, 0o700)


def step_id() -> str:
    """A fresh id for one build step (its cgroup name and audit sandbox id)."""
    return "bld-" + secrets.token_hex(8)
