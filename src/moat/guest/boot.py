"""Stage 2 of the guest's boot: read this sandbox's configuration, apply it, become the agent.

Trust domain: sandbox (guest root, before any untrusted code runs). Runs with the guest's
/usr/bin/python3 in ``-I -S`` mode (the agent's own flags), stdlib only; /init imports it
(``init.STAGE2_CODE``) so that its byte code from the initramfs is used. A base VM
is snapshotted while this script blocks on the configuration read, so everything after that
read is per sandbox: fresh RNG seed (restored guests would otherwise share the base VM's RNG
state), wall clock, hostname, tmpfs sizes, cgroup limits, then the exact environment and argv
the host sent.

Protocol on the agent port (before the agent's framed protocol starts; see init.py):
the guest writes the boot marker line; the host's one line is either the base-VM request or
the configuration (one line of JSON, at most 1 MiB).

Warm start: this interpreter runs with the same flags as the agent's argv (``python3 -I -S``).
A base VM imports ``site`` and the agent's modules *before* the snapshot is taken. A cold
boot skips that warm-up: ``site.main()`` then runs once, as the agent's uid, just before
the agent starts (and before it forks its kernel, which skips it when ``site`` is loaded).
When the host's argv is ``[this python, "-I", "-S", "-c", CODE, *args]`` it is run in-process
exactly as ``python -I -S -c`` would (``sys.argv = ["-c", *args]``, CODE executed as
``__main__``) after the privileges are dropped and the environment replaced, so a restored
sandbox does not pay the interpreter's start-up under TCG. Any other argv is exec'd.
"""

from __future__ import annotations

# The C module under ``socket``: all stage 2 needs, without the wrapper's import cost (enum
# conversions, selectors: tens of ms under TCG on a cold boot).
import _socket
import ctypes
import fcntl
import importlib
import json
import os
import resource
import select
import stat
import struct
import sys
import time

PORT = "/dev/vport0p1"
#: Guest root's control port (the host's ``qemu.CTL_PORT``): restores' reseed and resume notice.
CTL_PORT = "/dev/vport0p2"
#: Keep in step with init.py (this file runs in the guest, without the moat package).
TOOLS = "/.moat"
MARKER = b"MOAT-BOOT-WAITING 1\n"
BASE_REQUEST = b"MOAT-BASE 1\n"
WARM_MARKER = b"MOAT-BOOT-WARM 1\n"
FLAGS = ["-I", "-S"]
UID = GID = 1000
#: The agent's own uid (``moat.agent.shield.AGENT_UID``; a test holds them equal): it starts
#: as this uid with root's bounded capability set, as on gVisor, and splits itself.
AGENT_UID = 999
#: Root's capabilities by number (``moat.protocol.contract.ROOT_CAPS``; a test holds them
#: equal): the bounding set of everything the agent starts. No CAP_SYS_ADMIN, CAP_SYS_MODULE,
#: CAP_SYS_RAWIO, CAP_MKNOD, CAP_SYS_PTRACE, CAP_SYS_RESOURCE (docs/users.md).
ROOT_CAPS = (0, 1, 3, 4, 5, 6, 7, 10, 18, 29)
#: /proc entries read-only in the agent's mount namespace (Docker's list): what guest root
#: could otherwise write with uid 0 alone (sysctls such as core_pattern, sysrq).
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
#: /proc entries hidden (/dev/null bound over them): kernel memory and state.
PROC_MASKED = ("kcore", "keys", "timer_list", "sched_debug")
#: The character devices of the agent's /dev: (name, major, minor, mode). Nothing else of
#: the guest's devtmpfs (its control port, block devices, consoles, /dev/mem, /dev/kmsg).
DEVICES = (
    ("null", 1, 3, 0o666),
    ("zero", 1, 5, 0o666),
    ("full", 1, 7, 0o666),
    ("random", 1, 8, 0o666),
    ("urandom", 1, 9, 0o666),
    ("tty", 5, 0, 0o666),
)
HOME = "/home/user"
AGENT_DIR = "/opt/moat"
#: Modules imported before the snapshot (they are the agent's; the import is only a warm-up).
# Imported before the base VM's snapshot is taken, so restored guests start with them loaded
# (under TCG every import after a restore costs tens of ms).
WARM = (
    "moat.agent.main",
    "moat.agent.kernel",
    "moat.agent.display",
    "subprocess",
    "ast",
    "socket",  # these two for the agent's egress proxy
    "selectors",
)
_MAX = 1 << 20
_RNDADDENTROPY = 0x40085203
_RNDRESEEDCRNG = 0x5207
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_RDONLY = 2, 4, 8, 32, 1
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_PR_SET_KEEPCAPS, _PR_CAPBSET_DROP = 8, 24
_CAP_VERSION_3 = 0x20080522
_CLONE_NEWNS, _CLONE_NEWPID = 0x00020000, 0x20000000

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(src: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(src.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read_line(fd: int) -> bytes:
    """The host's next line. It sends nothing more until the guest answers, so a chunk
    holding anything after the newline is a protocol error."""
    buf = bytearray()
    while b"\n" not in buf:
        chunk = os.read(fd, 65536)
        if not chunk:
            raise EOFError("host closed the port")
        buf += chunk
        if len(buf) > _MAX:
            raise ValueError("configuration too large")
    if not buf.endswith(b"\n") or buf.count(b"\n") != 1:
        raise ValueError("unexpected data after the host's line")
    return bytes(buf)


def _parse_config(line: bytes) -> dict[str, object]:
    cfg = json.loads(line)
    if not isinstance(cfg, dict):
        raise ValueError("configuration is not an object")
    return cfg


def _reseed(seed: bytes) -> None:
    # Mix host randomness into the input pool (crediting it), then force the CRNG to reseed
    # now instead of at its next scheduled interval: two guests restored from one snapshot
    # must diverge before any user code asks for random bytes.
    fd = os.open("/dev/urandom", os.O_WRONLY)
    try:
        fcntl.ioctl(fd, _RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        fcntl.ioctl(fd, _RNDRESEEDCRNG)
    finally:
        os.close(fd)


def _limits(cfg: dict[str, object]) -> None:
    root = "/sys/fs/cgroup"
    grp = f"{root}/sandbox"
    os.makedirs(grp, exist_ok=True)
    _write(f"{root}/cgroup.subtree_control", "+memory +pids +cpu")
    _write(f"{grp}/memory.max", str(int(cfg["memory_bytes"])))  # type: ignore[call-overload]
    _write(f"{grp}/memory.swap.max", "0")
    _write(f"{grp}/pids.max", str(int(cfg["pids"])))  # type: ignore[call-overload]
    _write(f"{grp}/cpu.max", str(cfg["cpu_max"]))
    _write(f"{grp}/cgroup.procs", str(os.getpid()))


def _loopback_up() -> None:
    """Bring up ``lo``: the agent's proxy port (egress) and local servers live on 127.0.0.1.

    The guest has no other interface at all (no network device).
    """
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), siocgifflags, req))[1]
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))
    finally:
        s.close()


def _disk_by_serial(serial: str, timeout: float = 20.0) -> str:
    """The /dev node of the virtio disk QEMU gave ``serial`` (probing is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        for name in sorted(os.listdir("/sys/block")):
            try:
                with open(f"/sys/block/{name}/serial") as f:
                    found = f.read().strip()
            except OSError:
                continue
            if found == serial and os.path.exists(f"/dev/{name}"):
                return f"/dev/{name}"
        if time.monotonic() > deadline:
            raise OSError(f"disk {serial} not found")
        time.sleep(0.005)


def _mounts(cfg: dict[str, object]) -> None:
    """The sandbox's host mounts: read-only ext4 images the host built (mountimg.py)."""
    mounts = cfg.get("mounts", [])
    if not isinstance(mounts, list):
        raise ValueError("bad mounts")
    for m in mounts:
        if not (isinstance(m, dict) and isinstance(m.get("serial"), str)):
            raise ValueError("bad mount")
        path = str(m["path"])
        if not path.startswith("/") or ".." in path.split("/"):
            raise ValueError("bad mount path")
        dev = _disk_by_serial(str(m["serial"]))
        os.makedirs(path, mode=0o755, exist_ok=True)
        # noload: never replay a journal on a read-only disk; ro also in QEMU (readonly=on)
        _mount(dev, path, "ext4", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "noload")


def apply(cfg: dict[str, object]) -> None:
    # popped: the agent (and so every kernel it forks) runs in this process afterwards
    seed = bytes.fromhex(str(cfg.pop("seed")))
    if len(seed) < 32:
        raise ValueError("seed too short")
    _reseed(seed)
    time.clock_settime_ns(time.CLOCK_REALTIME, int(cfg["time_ns"]))  # type: ignore[call-overload]
    _socket.sethostname(str(cfg["hostname"]))
    size = f"{int(cfg['disk_mb'])}m"  # type: ignore[call-overload]
    flags = _MS_NOSUID | _MS_NODEV
    _mount("tmpfs", "/tmp", "tmpfs", flags, f"mode=1777,size={size}")  # noqa: S108 - the guest's own /tmp
    _mount("tmpfs", HOME, "tmpfs", flags, f"mode=0700,uid={UID},gid={GID},size={size}")
    _mounts(cfg)
    _limits(cfg)
    _loopback_up()
    # No user namespaces for sandboxed code: they are the usual way from an unprivileged uid
    # to kernel attack surface reserved for root (defence in depth inside the guest).
    _write("/proc/sys/user/max_user_namespaces", "0")
    os.chown(PORT, UID, GID)
    # The root file system (the initramfs) is read-only from here on, also for guest root.
    _mount("rootfs", "/", "", _MS_REMOUNT | _MS_RDONLY, "")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _install_seccomp(program: bytes) -> None:
    """Load the host-built filter (the container tier's, invariant 9) for this process tree.

    Classic BPF from libseccomp's ``export_bpf`` on the host: the guest has no libseccomp.
    Needs ``no_new_privs`` (set just before). Irrevocable, inherited by every child.
    """
    if not program or len(program) % 8 or len(program) // 8 > 4096:
        raise ValueError("bad seccomp program")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp")


def enter_pid_namespace() -> int:
    """Continue as init of a new pid namespace; this process stays outside as guest root.

    As its namespace's init, the agent cannot be stopped or killed by user code (the kernel
    drops those signals; see moat.agent.shield), and guest root outside is invisible to it.
    A fresh /proc shows only the namespace. When the agent ends, /init powers the VM off.
    Returns (in the agent) the read end of the pipe on which guest root announces restores.
    """
    resume_r, resume_w = os.pipe()
    if _libc.unshare(_CLONE_NEWPID | _CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    pid = os.fork()
    if pid != 0:
        os.close(resume_r)
        os.closerange(0, 3)
        serve_ctl(pid, resume_w)
        os._exit(0)
    os.close(resume_w)
    _mount("none", "/", "", _MS_REC | _MS_PRIVATE, "")
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "")
    return resume_r


def _bind_read_only(path: str) -> None:
    """``path`` read-only (and nosuid, nodev, noexec) in this mount namespace only."""
    _mount(path, path, "", _MS_BIND | _MS_REC, "")
    ro = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    _mount(path, path, "", ro, "")


def _narrow_dev(disk_mb: int) -> None:
    """A /dev of its own for the agent's mount namespace: the usual character devices, a
    fresh devpts and /dev/shm, and the agent's port; read-only.

    The guest's devtmpfs below it holds what guest root must not reach from inside the
    sandbox (docs/users.md): the control port whose lines the host trusts for restores,
    the block devices of /usr and the mounts, /dev/mem, /dev/kmsg, the consoles. Root inside
    cannot make nodes of its own (no CAP_MKNOD in ROOT_CAPS) nor mount (no CAP_SYS_ADMIN).
    """
    port = os.stat(PORT).st_rdev
    _mount("tmpfs", "/dev", "tmpfs", _MS_NOSUID | _MS_NOEXEC, "mode=0755,size=64k")
    for name, major, minor, mode in DEVICES:
        os.mknod(f"/dev/{name}", stat.S_IFCHR | mode, os.makedev(major, minor))
        os.chmod(f"/dev/{name}", mode)
    os.mknod(PORT, stat.S_IFCHR | 0o600, port)
    os.chmod(PORT, 0o600)
    os.chown(PORT, UID, GID)  # the agent opens it as the user (moat.agent.shield)
    for d, mode in (("pts", 0o755), ("shm", 0o1777)):
        os.mkdir(f"/dev/{d}")
        os.chmod(f"/dev/{d}", mode)
    flags = _MS_NOSUID | _MS_NOEXEC
    _mount("devpts", "/dev/pts", "devpts", flags, "newinstance,ptmxmode=0666")
    shm = f"mode=1777,size={min(64, disk_mb)}m"
    _mount("shm", "/dev/shm", "tmpfs", flags | _MS_NODEV, shm)  # noqa: S108 - the guest's
    for name, target in (
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"/dev/{name}")
    _mount("tmpfs", "/dev", "", _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NOEXEC, "")


def confine(cfg: dict[str, object]) -> None:
    """The agent's mount namespace, before anything of the sandbox runs in it: what would
    let root inside (uid 0 with ROOT_CAPS, ``user="root"``) reach the guest kernel's
    host-facing parts is read-only or absent (docs/users.md, invariant 9).

    /proc/sys (core_pattern, modprobe, sysctls: uid 0 alone may write them) and the other
    writable /proc entries are read-only; kernel memory and state files are masked; /sys
    and the sandbox's cgroup are read-only (limits and cgroup membership stay as stage 2
    set them: invariant 10); /dev is narrowed (:func:`_narrow_dev`). None of it can be
    undone without CAP_SYS_ADMIN, and the seccomp filter refuses mount calls anyway.
    """
    _narrow_dev(int(cfg["disk_mb"]))  # type: ignore[call-overload]
    for name in PROC_READ_ONLY:
        if os.path.exists(f"/proc/{name}"):
            _bind_read_only(f"/proc/{name}")
    for name in PROC_MASKED:
        if os.path.exists(f"/proc/{name}"):
            _mount("/dev/null", f"/proc/{name}", "", _MS_BIND, "")
    ro = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    _mount("/sys/fs/cgroup", "/sys/fs/cgroup", "", ro, "")
    _mount("/sys", "/sys", "", ro, "")


def _bound_caps() -> None:
    """Root's bounded set for everything the agent will start: the bounding set dropped to
    ROOT_CAPS (:func:`_agent_ids` then makes it the permitted and effective set)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if cap not in ROOT_CAPS and _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")


def _agent_ids() -> None:
    """Become AGENT_UID (gid and groups the user's) with ROOT_CAPS permitted and effective,
    none inheritable or ambient: the state gVisor starts the agent in (its OCI process), so
    the agent splits itself the same way (moat.agent.shield._split_uid)."""
    os.setgroups([GID])
    os.setresgid(GID, GID, GID)
    if _libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_KEEPCAPS")
    os.setresuid(AGENT_UID, AGENT_UID, AGENT_UID)
    if _libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_KEEPCAPS")
    mask = sum(1 << cap for cap in ROOT_CAPS)
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(mask, mask, 0, 0, 0, 0)
    if _libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _wait(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except InterruptedError:
            continue
        except ChildProcessError:
            return


def resume(line: bytes, notify_w: int) -> None:
    """One restore: the host's line (one JSON object) on the control port.

    Guest root mixes the host's fresh seed into the kernel's CRNG and forces a reseed (two
    guests restored from one checkpoint must not share it; QEMU 7.2's microvm machine gives
    the guest no vmgenid), sets the wall clock and host name, then tells the agent, which
    drops what the old host channel left and announces itself with ``nonce`` (agent/main.py).
    """
    msg = _parse_config(line)
    seed = bytes.fromhex(str(msg["seed"]))
    nonce = str(msg["nonce"])
    if len(seed) < 32 or not (16 <= len(nonce) <= 64 and nonce.isalnum()):
        raise ValueError("bad resume message")
    _reseed(seed)
    time.clock_settime_ns(time.CLOCK_REALTIME, int(msg["time_ns"]))  # type: ignore[call-overload]
    if isinstance(msg.get("hostname"), str):
        _socket.sethostname(str(msg["hostname"]))
    os.write(notify_w, nonce.encode() + b"\n")


def serve_ctl(agent: int, notify_w: int) -> None:
    """Guest root, outside the sandbox's pid namespace, until the agent ends: serve the
    control port (one JSON line per restore). User code can't reach it: the port is root's
    and this process is outside the agent's pid namespace (invariant 9)."""
    try:
        ctl = os.open(CTL_PORT, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        _wait(agent)  # a VM without the port (started by an older host)
        return
    pidfd = os.pidfd_open(agent)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(ctl, select.POLLIN)
    buf = b""
    while True:
        for fd, _ in poller.poll():
            if fd == pidfd:
                _wait(agent)
                return
            try:
                chunk = os.read(ctl, 65536)
            except OSError:
                chunk = b""
            if not chunk:  # the host closed its end: no more restores to serve
                poller.unregister(ctl)
                continue
            buf += chunk
            if len(buf) > _MAX:
                buf = b""  # never from moat's host; drop it rather than grow
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    resume(line + b"\n", notify_w)
                except Exception:  # noqa: BLE001, S112 - guest root serves on; the host fails closed
                    # The agent then never announces itself: the host's restore times out
                    # and kills the VM (it fails closed). fds 0-2 are closed: nothing to say.
                    continue


def become_agent(cfg: dict[str, object], resume_fd: int) -> None:
    argv = cfg["argv"]
    env = cfg["env"]
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise ValueError("bad argv")
    if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
        raise ValueError("bad env")
    # fds 0-2 are the guest console, opened by the kernel for init: not the sandbox's.
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    program = bytes.fromhex(str(cfg.pop("seccomp")))
    # The agent's own process budget (its reserve for a fork bomb is below it: agent/shield).
    pids = int(cfg["pids"])  # type: ignore[call-overload]
    resource.setrlimit(resource.RLIMIT_NPROC, (pids, pids))
    os.chdir(HOME)
    # Not guest root's full set, never uid 0 (invariant 9): the agent starts as AGENT_UID
    # with ROOT_CAPS, for user="root" calls, and acts as the user from its first lines.
    _bound_caps()
    _agent_ids()
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "no_new_privs")
    _install_seccomp(program)
    # The agent reads guest root's restore notices here (not inherited by what it starts).
    os.set_inheritable(resume_fd, True)
    argv = [*argv, "--resume-fd", str(resume_fd)]
    if len(argv) >= 4 and argv[0] == sys.executable and argv[1:4] == [*FLAGS, "-c"]:
        at = 2 + len(FLAGS)  # the code's position in argv (after "-c")
        os.environ.clear()
        os.environ.update(env)
        if "site" not in sys.modules:
            # A cold boot (a base VM ran it in its warm-up): site now, as the agent's uid
            # with its environment, as the agent's kernel would after its fork; before the
            # fork, the pages it touches are not copy-on-write faults in the kernel.
            import site

            site.main()
        sys.argv = ["-c", *argv[at + 1 :]]
        code = compile(argv[at], "<string>", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102 - `python -c`
        sys.exit(0)
    # (An exec'd agent, not uid 0 and with no ambient set, starts without capabilities: it
    # then refuses user="root" calls, fail closed, as an older guest's agent does.)
    os.execve(argv[0], argv, env)  # noqa: S606 - argv from the host, no shell


def warm_up() -> None:
    """Base VMs only: what a restored sandbox would otherwise import after its restore.

    ``site`` first: stage 2 and the agent run with ``-S``; run here, it is loaded once for
    every sandbox restored from this base VM (become_agent and the kernel then skip it).
    """
    import site

    site.main()
    sys.path.insert(0, AGENT_DIR)
    try:
        for name in WARM:
            importlib.import_module(name)
    except ImportError:
        pass  # the exec path still works; it is only slower
    finally:
        sys.path.remove(AGENT_DIR)


def main() -> None:
    fd = os.open(PORT, os.O_RDWR | os.O_NOCTTY)
    os.write(fd, MARKER)
    line = _read_line(fd)
    if line == BASE_REQUEST:
        warm_up()
        os.write(fd, WARM_MARKER)
        line = _read_line(fd)
    cfg = _parse_config(line)
    os.close(fd)
    apply(cfg)
    resume_fd = enter_pid_namespace()
    confine(cfg)
    become_agent(cfg, resume_fd)


def run() -> None:
    """Entry point (``init.STAGE2_CODE``): any failure ends the VM, saying why."""
    try:
        if sys.path and sys.path[0] == TOOLS:
            del sys.path[0]  # root-only tools; not the agent's import path
        main()
    except BaseException as exc:  # noqa: BLE001 - any failure ends the VM; say why on the console
        sys.stderr.write(f"moat-boot: {type(exc).__name__}: {exc}\n")
        sys.exit(1)


if __name__ == "__main__":
    run()
