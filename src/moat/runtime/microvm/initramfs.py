"""Build the guest's initramfs: busybox, init, stage 2, modules, synthetic /etc, the agent.

Trust domain: host engine. The base archive is built once by setup; the agent's code is a
second cpio archive appended per agent version (the kernel unpacks concatenated archives in
order), so upgrading moat never needs a new setup and the snapshot key follows the agent.
"""

from __future__ import annotations

import importlib.util
import marshal
import os
import sys
from pathlib import Path

from moat.guest.init import INIT_SCRIPT, TOOLS
from moat.runtime.microvm import cpio
from moat.runtime.spec import AGENT_DIR, HOME, SANDBOX_GID, SANDBOX_UID, SSH_CONFIG

#: Stage 2's source (sandbox domain: found, never imported on the host).
_BOOT = Path(__file__).resolve().parents[2] / "guest" / "boot.py"

PASSWD = (
    "root:x:0:0:root:/root:/usr/sbin/nologin\n"
    f"user:x:{SANDBOX_UID}:{SANDBOX_GID}:user:{HOME}:/bin/bash\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
GROUP = f"root:x:0:\nuser:x:{SANDBOX_GID}:\nnogroup:x:65534:\n"


def base_entries(
    busybox: bytes,
    modules: dict[str, bytes],
    ld_cache: bytes,
    ca_bundle: bytes,
    host_etc: list[cpio.Entry] | None = None,
) -> list[cpio.Entry]:
    """Every member of the base archive. Pure: host files are read by the caller."""
    d, f, s = cpio.directory, cpio.file, cpio.symlink
    entries = [
        d("/"),
        d(TOOLS, 0o700),
        d(f"{TOOLS}/bin", 0o700),
        f(f"{TOOLS}/bin/busybox", busybox, 0o755),
        f(f"{TOOLS}/boot.py", _BOOT.read_bytes(), 0o600),
        d(f"{TOOLS}/modules", 0o700),
        *(f(f"{TOOLS}/modules/{name}.ko", data, 0o600) for name, data in modules.items()),
        f("/init", INIT_SCRIPT.encode(), 0o755),
        *(d(p) for p in ("/proc", "/sys", "/dev", "/usr", "/run", "/var", "/opt", "/home")),
        d("/tmp", 0o1777),  # noqa: S108 - the guest's /tmp (a tmpfs is mounted over it)
        d(HOME, 0o755),
        s("/var/tmp", "/tmp"),  # noqa: S108 - in the guest
        s("/bin", "usr/bin"),
        s("/sbin", "usr/sbin"),
        s("/lib", "usr/lib"),
        s("/lib64", "usr/lib64"),
        d("/etc"),
        f("/etc/passwd", PASSWD.encode()),
        f("/etc/group", GROUP.encode()),
        f("/etc/hostname", b"sandbox\n"),
        f("/etc/hosts", b"127.0.0.1 localhost\n::1 localhost\n"),
        f("/etc/resolv.conf", b""),
        f("/etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files\n"),
        f("/etc/ld.so.cache", ld_cache),
        d("/etc/ssl"),
        d("/etc/ssl/certs"),
        f("/etc/ssl/certs/ca-certificates.crt", ca_bundle),
        *(host_etc or []),
    ]
    return entries


def host_etc_entries(etc: Path = Path("/etc")) -> list[cpio.Entry]:
    """The harmless host /etc entries a userland needs (as the container tier binds them).

    /etc/alternatives holds the symlinks Debian resolves shared libraries through (numpy's
    libblas.so.3, for one); matplotlibrc is Debian's default matplotlib configuration.
    """
    out: list[cpio.Entry] = []
    alt = etc / "alternatives"
    if alt.is_dir():
        out.append(cpio.directory("/etc/alternatives"))
        for entry in sorted(alt.iterdir()):
            if entry.is_symlink():
                out.append(cpio.symlink(f"/etc/alternatives/{entry.name}", os.readlink(entry)))
    for name in ("matplotlibrc", "mime.types", "protocols", "services"):
        path = etc / name
        if path.is_file() and not path.is_symlink():
            out.append(cpio.file(f"/etc/{name}", path.read_bytes(), 0o644))
    return out


def build_base(modules: dict[str, bytes]) -> bytes:
    """Read the host inputs (busybox-static, ld.so.cache, CA bundle) and build the archive."""
    busybox = Path("/usr/bin/busybox").read_bytes()
    ld_cache = _read_or_empty("/etc/ld.so.cache")
    ca_bundle = _read_or_empty("/etc/ssl/certs/ca-certificates.crt")
    return cpio.archive(base_entries(busybox, modules, ld_cache, ca_bundle, host_etc_entries()))


def _read_or_empty(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def agent_archive(agent_dir: Path) -> bytes:
    """The agent's code (from ``moat.runtime.agentdir.prepare()``) at AGENT_DIR, root-owned."""
    entries = [cpio.directory("/opt"), cpio.directory(AGENT_DIR)]
    # The guest's /init and stage 2 travel with the agent, not only the base archive: a
    # change to them then takes effect (and re-keys snapshots) without re-running setup.
    # (Later members of the concatenated archive replace earlier ones of the same name.)
    entries.append(cpio.file("/init", INIT_SCRIPT.encode(), 0o755))
    # Here, not in the base archive: a new ssh_config needs no new setup.
    entries.append(cpio.directory("/etc/ssh"))
    entries.append(cpio.file("/etc/ssh/ssh_config", SSH_CONFIG.encode(), 0o644))
    boot = _BOOT.read_bytes()
    entries.append(cpio.file(f"{TOOLS}/boot.py", boot, 0o600))
    entries.append(cpio.directory(f"{TOOLS}/__pycache__", 0o700))
    entries.append(
        cpio.file(
            f"{TOOLS}/__pycache__/boot.{sys.implementation.cache_tag}.pyc",
            _bytecode(boot, f"{TOOLS}/boot.py"),
            0o600,
        )
    )
    for dirpath, dirnames, filenames in os.walk(agent_dir):
        dirnames[:] = sorted(n for n in dirnames if n != "__pycache__")
        rel = os.path.relpath(dirpath, agent_dir)
        inside = AGENT_DIR if rel == "." else f"{AGENT_DIR}/{rel}"
        if rel != ".":
            entries.append(cpio.directory(inside))
        compiled = []
        for name in sorted(filenames):
            data = (Path(dirpath) / name).read_bytes()
            entries.append(cpio.file(f"{inside}/{name}", data, 0o644))
            if name.endswith(".py"):
                compiled.append((name, _bytecode(data, f"{inside}/{name}")))
        if compiled:
            # Byte code compiled here: the read-only guest would recompile every module on
            # every start (slow under TCG). The guest's python is the host's (/usr is shared),
            # and a magic-number mismatch only makes it compile from source as before.
            entries.append(cpio.directory(f"{inside}/__pycache__"))
            tag = sys.implementation.cache_tag
            for name, pyc in compiled:
                entries.append(cpio.file(f"{inside}/__pycache__/{name[:-3]}.{tag}.pyc", pyc))
    return cpio.archive(entries)


def _bytecode(source: bytes, path: str) -> bytes:
    """An unchecked-hash .pyc of ``source`` (the archive is rebuilt whenever sources change)."""
    code = compile(source, path, "exec", dont_inherit=True)
    flags = 0b01  # hash-based, not checked against the source (PEP 552)
    source_hash = importlib.util.source_hash(source)
    return (
        importlib.util.MAGIC_NUMBER
        + flags.to_bytes(4, "little")
        + source_hash
        + marshal.dumps(code)
    )
