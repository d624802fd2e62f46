"""Filesystem-only saves of the gvisor tier: ``/home/user`` as a tar, through ``runsc exec``.

Trust domain: host engine. A gVisor sandbox's writable files live in the sentry's memory (its
tmpfs mounts), out of the host's reach; a ``checkpoint(memory=False)`` therefore runs ``tar``
*inside* the sandbox with ``runsc exec`` as the sandbox's user (uid 1000, no capabilities,
``noNewPrivileges``: what user code itself has, invariant 9) and writes its stdout to a host
file. A restore starts a fresh sandbox and runs ``tar -x`` inside it, fed from that file. The
archive is sandbox-made data: the host only stores and replays it, never unpacks or parses it
(the unpacking happens inside the new sandbox, with the same rights as user code). Like a
reboot, ``/tmp`` is not kept; processes start afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any, Final

from moat.errors import PolicyError, SandboxDiedError
from moat.runtime.container.checkpoint import max_bytes, too_large
from moat.runtime.gvisor.probe import RUNSC_ENV
from moat.runtime.spec import HOME, SANDBOX_GID, SANDBOX_UID

__all__ = ["ARCHIVE", "load_home", "process_json", "save_home"]

#: The archive in a filesystem-only checkpoint directory.
ARCHIVE: Final = "home.tar"
#: Seconds a tar in or out of the sandbox may take (bounded like every runsc call).
TAR_TIMEOUT: Final = 300.0
_TAR: Final = "/usr/bin/tar"
_REL_HOME: Final = HOME.lstrip("/")
# GNU tar: 1 = a file changed while it was read (a live sandbox); 2 = fatal (unreadable...)
_TAR_OK: Final = (0, 1)


def process_json(args: list[str]) -> dict[str, Any]:
    """The OCI process ``runsc exec`` runs: the sandbox's user, no capabilities. Pure."""
    none: list[str] = []
    return {
        "user": {"uid": SANDBOX_UID, "gid": SANDBOX_GID},
        "args": args,
        "env": ["PATH=/usr/bin:/bin", "LC_ALL=C.UTF-8"],
        "cwd": "/",
        "capabilities": {k: none for k in ("bounding", "effective", "inheritable", "permitted")}
        | {"ambient": none},
        "noNewPrivileges": True,
        "terminal": False,
    }


def _abandon(proc: asyncio.subprocess.Process) -> None:
    """Kill ``runsc exec`` and close our ends of its pipes: the process inside the sandbox
    holds their other ends (runsc hands them over), so only a broken pipe ends it, and
    asyncio's ``wait()`` waits for the pipes as well as the process."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    transport: Any = getattr(proc, "_transport", None)
    for n in (0, 1, 2):
        pipe = transport.get_pipe_transport(n) if transport is not None else None
        if pipe is not None:
            pipe.close()


async def _exec(
    exe: str,
    workdir: Path,
    sandbox_id: str,
    args: list[str],
    *,
    stdin: int,
    stdout: int,
    sink: Any = None,
) -> tuple[int, bytes]:
    """Run ``args`` inside the sandbox. ``sink(proc)``: a coroutine that drains the process's
    stdout (``stdout`` must then be PIPE) while it runs."""
    spec = workdir / "exec-process.json"
    spec.write_text(json.dumps(process_json(args)))
    argv = [exe, "--root", str(workdir / "root"), f"--log={workdir / 'runsc.log'}", "exec"]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        "--process",
        str(spec),
        sandbox_id,
        stdin=stdin,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        env=RUNSC_ENV,
        start_new_session=True,
    )
    try:
        if sink is None:
            _, err = await asyncio.wait_for(proc.communicate(), TAR_TIMEOUT)
        else:
            assert proc.stderr is not None
            errs = asyncio.ensure_future(proc.stderr.read(1 << 16))
            await asyncio.wait_for(sink(proc), TAR_TIMEOUT)
            await asyncio.wait_for(proc.wait(), TAR_TIMEOUT)
            err = await errs
    except BaseException:
        _abandon(proc)
        await proc.wait()
        raise
    finally:
        spec.unlink(missing_ok=True)
    return proc.returncode or 0, err[-2048:]


async def save_home(
    exe: str, workdir: Path, sandbox_id: str, dest: Path, cap: int | None = None
) -> None:
    """Write ``/home/user`` of the running sandbox as ``dest/home.tar`` (0600), at most
    ``cap`` bytes (and the global checkpoint cap): past it the tar is killed and
    QuotaExceededError raised, the sandbox running on. The sandbox controls what it archives
    (sparse files, say), so the host counts what reaches its disk, never trusts a size."""
    limit = max_bytes() if cap is None else min(cap, max_bytes())
    fd = os.open(dest / ARCHIVE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    over = False

    async def drain(proc: asyncio.subprocess.Process) -> None:
        nonlocal over
        assert proc.stdout is not None
        written = 0
        while chunk := await proc.stdout.read(1 << 20):
            written += len(chunk)
            if written > limit:
                over = True
                _abandon(proc)
                return
            await asyncio.to_thread(os.write, fd, chunk)  # a regular file: written whole

    try:
        code, err = await _exec(
            exe,
            workdir,
            sandbox_id,
            [_TAR, "--sparse", "-C", "/", "-cf", "-", _REL_HOME],
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            sink=drain,
        )
    finally:
        os.close(fd)
    if over:
        raise too_large(limit)
    if code not in _TAR_OK:
        _log(workdir, b"save of the home directory failed: " + err)
        raise PolicyError(
            "gvisor: the home directory could not be saved (a file in it is not readable "
            "by the sandbox's user?)"
        )


async def load_home(exe: str, workdir: Path, sandbox_id: str, src: Path) -> None:
    """Unpack ``src/home.tar`` into the (fresh) sandbox's ``/home/user``."""
    fd = os.open(src / ARCHIVE, os.O_RDONLY)
    try:
        code, err = await _exec(
            exe,
            workdir,
            sandbox_id,
            [_TAR, "-C", "/", "-xpf", "-", "--no-overwrite-dir", _REL_HOME],
            stdin=fd,
            stdout=asyncio.subprocess.DEVNULL,
        )
    finally:
        os.close(fd)
    if code != 0:
        _log(workdir, b"restore of the home directory failed: " + err)
        raise SandboxDiedError("the gvisor sandbox's files could not be restored")


#: Run inside the sandbox before a memory checkpoint (as the sandbox's user): prints
#: ``epoll-listen`` when some process holds an epoll instance while a TCP socket other than
#: the agent's egress proxy (port 3128, watched with poll) listens. runsc 20221219 fails to
#: save a listening endpoint with an epoll waiter -- and a failed save ends the sandbox -- so
#: such a pause is refused up front, the sandbox left running. Conservative: an epoll user
#: and a listener in different processes also refuse.
_EPOLL_PROBE = r"""
import os
ep = False
for p in filter(str.isdigit, os.listdir("/proc")):
    try:
        fds = os.listdir(f"/proc/{p}/fd")
    except OSError:
        continue
    for fd in fds:
        try:
            ep = ep or "eventpoll" in os.readlink(f"/proc/{p}/fd/{fd}")
        except OSError:
            pass
ls = False
for name in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        rows = open(name).read().splitlines()[1:]
    except OSError:
        continue
    for row in rows:
        f = row.split()
        ls = ls or (len(f) > 3 and f[3] == "0A" and not f[1].upper().endswith(":0C38"))
print("epoll-listen" if ep and ls else "ok")
"""


async def epoll_listener(exe: str, workdir: Path, sandbox_id: str) -> bool:
    """Whether a memory checkpoint would meet runsc's epoll-on-a-listener failure (above).
    A probe that cannot run counts as yes (fail closed: refuse rather than lose the sandbox)."""
    r, w = os.pipe()
    try:
        code, _ = await _exec(
            exe, workdir, sandbox_id, ["/usr/bin/python3", "-I", "-c", _EPOLL_PROBE],
            stdin=asyncio.subprocess.DEVNULL, stdout=w,
        )  # fmt: skip
        os.close(w)
        w = -1
        out = os.read(r, 64)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    return code != 0 or out.strip() != b"ok"


def _log(workdir: Path, line: bytes) -> None:
    # tar's and runsc's messages may name host paths: the log keeps them (invariant 8)
    with contextlib.suppress(OSError), (workdir / "runsc.log").open("ab") as f:
        f.write(line + b"\n")
