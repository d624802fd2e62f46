"""Pure ``SandboxSpec -> OCI config.json`` builder for the gvisor tier.

Trust domain: host engine. No I/O here: the driver decides which host files exist and where the
bundle lives, and passes them in a :class:`Bundle`; this module only turns validated data into
the dict ``runsc run`` reads. Golden-tested (``tests/golden/gvisor_*.json``).

What the config encodes, and which invariant it serves:

* root: an empty, read-only skeleton directory built by the driver; the host userland comes in
  as read-only bind mounts (/usr plus a few /etc entries), never the host's /etc wholesale,
  /root, /home, /var or /run (invariant 1).
* process: the agent argv, environment exactly ``spec.env()`` (invariant 1), uid 999 (the
  agent's own) with CAP_SETUID alone, which the agent drops in its first lines after taking
  uid 1000 as its effective uid; user code runs as 1000 with no capabilities at all;
  ``noNewPrivileges`` (invariant 9).
* limits (invariant 10), enforced by gVisor's sentry (the sandbox's kernel) per process and by a
  host cgroup around the whole sandbox:

  - ``RLIMIT_AS`` = ``AS_FACTOR * memory_mb``: one process asking for more fails inside (ENOMEM /
    MemoryError) while the sandbox lives on;
  - cgroup memory = ``memory_mb`` + :data:`SENTRY_OVERHEAD_MB`: the sentry holds all sandbox
    memory (including tmpfs contents), so the sum of all processes is capped on the host; when
    it is hit the host OOM killer ends the whole sandbox (fail closed);
  - ``RLIMIT_NPROC`` = ``pids``: the sentry refuses fork/clone beyond it (EAGAIN inside); the
    host pids cgroup is a backstop on the sentry's own host threads and ptrace stubs;
  - cgroup cpu quota = ``cpus``; ``RLIMIT_FSIZE`` and the tmpfs ``size=`` = ``disk_mb``.

* seccomp: the container tier's deny list (:data:`moat.runtime.seccomp.REFUSED`), loaded by
  the sentry when runsc gets ``--oci-seccomp`` (invariant 9, defence in depth: those calls hit
  gVisor's kernel, not the host's).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any, Final

from moat.protocol.contract import ROOT_CAPS
from moat.runtime.seccomp import REFUSED
from moat.runtime.spec import AGENT_DIR, HOME, SANDBOX_GID, SANDBOX_UID, SandboxSpec

__all__ = [
    "AGENT_UID",
    "CGROUP_PREFIX",
    "HIDDEN_DEVICES",
    "HIDDEN_DEVICE_DIRS",
    "HOST_PIDS_OVERHEAD",
    "HOST_PIDS_PER_TASK",
    "NODEV_FILE",
    "SENTRY_OVERHEAD_MB",
    "SKELETON_DIRS",
    "SKELETON_SYMLINKS",
    "Bundle",
    "build_config",
    "cgroup_name",
]

_MIB: Final = 1 << 20
#: Host memory the sentry and gofer need on top of what sandboxed processes may use.
SENTRY_OVERHEAD_MB: Final = 96
#: Host tasks of the sentry and gofer themselves (about 60 measured with an idle agent).
HOST_PIDS_OVERHEAD: Final = 256
#: RLIMIT_AS per process, as a multiple of the sandbox's memory limit (see build_config).
AS_FACTOR: Final = 2
#: Host tasks per sandboxed task allowed by the backstop: the ptrace platform gives every
#: address space a stub process plus threads (about 4 per sandboxed process measured); the
#: sentry's RLIMIT_NPROC is what refuses a fork loop. When the backstop fires, the sentry
#: cannot create a thread and the whole sandbox dies (fail closed, invariant 10). Fork churn
#: at the limit makes it fire: runsc 20221219 pools stubs forever and adds a thread to a stub
#: per sentry thread that runs in it, so host tasks grow as address spaces x sentry threads,
#: not linearly; no value here bounds that (docs/containment.md "Fork bombs").
HOST_PIDS_PER_TASK: Final = 8
#: Name prefix of the host cgroups of this tier (what ``sweep`` looks for).
CGROUP_PREFIX: Final = "moat-gvisor-"
_CPU_PERIOD: Final = 100_000
#: The agent's own uid in a gVisor sandbox (user code runs as SANDBOX_UID, root calls as 0);
#: the agent's copy of the number is moat.agent.shield.AGENT_UID (a test holds them equal).
AGENT_UID: Final = 999
#: Root's capabilities inside (the sentry's, never the host's): the bounding set of the whole
#: sandbox, so no process inside ever holds more (docs/users.md).
_ROOT_CAPS: Final = sorted(ROOT_CAPS)
_NOFILE: Final = 4096

#: Directories the driver creates in the (otherwise empty) read-only root skeleton, so that
#: every mount point below exists.
SKELETON_DIRS: Final = ("usr", "etc", "home/user", "tmp", "opt/moat", "proc", "dev", "sys")
#: An empty, mode-0000 file in the skeleton (under the /dev mount point, so hidden inside),
#: bound over the devices gVisor creates in every sandbox's /dev that no policy names.
NODEV_FILE: Final = "dev/.moat-nodev"
#: gVisor's sentry populates /dev itself, /dev/fuse and /dev/net/tun included, whatever the
#: config says (runsc has no flag to leave them out): an empty read-only tmpfs hides /dev/net
#: and the mode-0000 file covers /dev/fuse, so opening either fails (invariant 1).
HIDDEN_DEVICES: Final = ("/dev/fuse",)
HIDDEN_DEVICE_DIRS: Final = ("/dev/net",)
#: Merged-/usr symlinks of Debian (and most distributions), relative so they resolve inside.
SKELETON_SYMLINKS: Final = (
    ("bin", "usr/bin"),
    ("lib", "usr/lib"),
    ("lib64", "usr/lib64"),
    ("sbin", "usr/sbin"),
)


@dataclass(frozen=True)
class Bundle:
    """Host-side facts the config depends on, gathered by the driver.

    ``rootfs``: absolute path of the skeleton root; ``agent_dir``: the host copy of the agent
    (``agentdir.prepare()``); ``argv``: the sandbox's first process; ``etc_binds``: host files
    or directories bound read-only at the same path under /etc (only those that exist on this
    host, e.g. ``/etc/ld.so.cache``); the synthetic /etc files live in the skeleton itself.
    """

    rootfs: str
    agent_dir: str
    argv: tuple[str, ...]
    etc_binds: tuple[str, ...] = ()
    #: a template's root (issue 12): (host source, sandbox path) bound read-only instead of
    #: the host's /usr (planned by runtime.templateroot; the skeleton holds the mount points)
    root_binds: tuple[tuple[str, str], ...] = ()


def cgroup_name(spec: SandboxSpec) -> str:
    """The host cgroup (relative to each controller's root) of this sandbox."""
    return CGROUP_PREFIX + spec.sandbox_id


def _rlimit(kind: str, value: int) -> dict[str, Any]:
    return {"type": kind, "hard": value, "soft": value}


def _bind(source: str, dest: str, *, read_only: bool = True) -> dict[str, Any]:
    opts = ["rbind", "nosuid", "nodev"]
    opts.append("ro" if read_only else "rw")
    return {"destination": dest, "type": "bind", "source": source, "options": opts}


def _tmpfs(dest: str, size_mb: int, mode: str, owner: bool) -> dict[str, Any]:
    opts = ["nosuid", "nodev", f"size={size_mb}m", f"mode={mode}"]
    if owner:
        opts += [f"uid={SANDBOX_UID}", f"gid={SANDBOX_GID}"]
    return {"destination": dest, "type": "tmpfs", "source": "tmpfs", "options": opts}


#: Calls of the container tier's list left out here. runsc 20221219 ignores ``errnoRet`` and
#: answers EPERM, and glibc falls back from clone3 to clone only on ENOSYS (threads break);
#: gVisor's sentry does not implement clone3 at all, so it answers ENOSYS itself.
_SECCOMP_SKIP: Final = frozenset({"clone3"})


#: The agent is pid 1 (the OCI process), and gVisor's sentry, unlike Linux, delivers SIGKILL
#: and SIGSTOP to a pid namespace's init from inside it. Nothing in a sandbox has a reason
#: to signal pid 1 or every process (-1), so these calls are refused for those targets: user
#: code cannot stop or kill the agent (issue 17 "Takeover"; see moat.agent.shield). The pid
#: is an ``int``: compared under a 32-bit mask. ``tkill`` (any thread id, so any of the
#: agent's threads) is refused outright; libc uses ``tgkill``, whose first argument is the
#: thread group's pid.
_PID_ARG_CALLS: Final = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open")
_PROTECTED_PIDS: Final = (1, 0xFFFFFFFF)
_SIGNAL_REFUSED: Final = ("tkill", "pidfd_send_signal")


def _seccomp() -> dict[str, Any]:
    # Group refused calls by errno: OCI expresses one errnoRet per rule.
    by_errno: dict[int, list[str]] = {}
    for name, err in sorted(REFUSED.items()):
        if name in _SECCOMP_SKIP:
            continue
        by_errno.setdefault(err, []).append(name)
    by_errno.setdefault(errno.EPERM, []).extend(_SIGNAL_REFUSED)
    rules: list[dict[str, Any]] = [
        {"names": sorted(names), "action": "SCMP_ACT_ERRNO", "errnoRet": err}
        for err, names in sorted(by_errno.items())
    ]
    rules += [
        {
            "names": list(_PID_ARG_CALLS),
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": errno.EPERM,
            "args": [
                {"index": 0, "value": 0xFFFFFFFF, "valueTwo": pid, "op": "SCMP_CMP_MASKED_EQ"}
            ],
        }
        for pid in _PROTECTED_PIDS
    ]
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": rules,
    }


def build_config(spec: SandboxSpec, bundle: Bundle) -> dict[str, Any]:
    """Return the OCI runtime config (``config.json``) for ``spec``. Pure."""
    lim = spec.limits
    env = [f"{k}={v}" for k, v in spec.env().items()]
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
    ]
    if spec.rootfs is None:
        mounts.append(_bind("/usr", "/usr"))
    mounts += [_bind(source, dest) for source, dest in bundle.root_binds]
    mounts += [_bind(path, path) for path in bundle.etc_binds]
    mounts += [
        _bind(bundle.agent_dir, AGENT_DIR),
        _tmpfs(HOME, lim.disk_mb, "0700", owner=True),
        _tmpfs("/tmp", lim.disk_mb, "1777", owner=False),  # noqa: S108 - the sandbox's own /tmp
    ]
    mounts += [_bind(m.host_path, m.sandbox_path, read_only=m.read_only) for m in spec.mounts]
    # /dev/shm: writable (POSIX semaphores, multiprocessing) but capped like /tmp and counted
    # in the sentry's memory (issue 17: the disk limit means what it says)
    mounts.append(_tmpfs("/dev/shm", max(4, lim.disk_mb // 8), "1777", owner=False))  # noqa: S108
    nodev = f"{bundle.rootfs}/{NODEV_FILE}"
    mounts += [_bind(nodev, dev) for dev in HIDDEN_DEVICES]
    mounts += [
        {
            "destination": d,
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["ro", "nosuid", "nodev", "noexec", "size=4k", "mode=0555"],
        }
        for d in HIDDEN_DEVICE_DIRS
    ]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            # The agent starts as AGENT_UID with root's bounded set; its first lines act as
            # SANDBOX_UID, keep AGENT_UID as real and saved uid and keep the capabilities
            # permitted only, for user="root" calls (moat.agent.shield):
            # gVisor's /proc ignores non-dumpable, so a uid of its own is what keeps user code
            # (SANDBOX_UID throughout) out of the agent's fds and signals.
            "user": {"uid": AGENT_UID, "gid": SANDBOX_GID, "additionalGids": [SANDBOX_GID]},
            "args": list(bundle.argv),
            "env": env,
            "cwd": HOME,  # the agent moves to spec.workdir itself (it may be a tmpfs below)
            "capabilities": {
                "bounding": list(_ROOT_CAPS),
                "effective": list(_ROOT_CAPS),
                "inheritable": [],
                "permitted": list(_ROOT_CAPS),
                "ambient": [],
            },
            "noNewPrivileges": True,
            "rlimits": [
                _rlimit("RLIMIT_NOFILE", _NOFILE),
                _rlimit("RLIMIT_NPROC", lim.pids),
                # 2x: address space is not memory (each thread reserves an 8 MiB stack; at
                # 1x a 512 MiB sandbox could start only ~12 threads). The host cgroup caps
                # what is really used.
                _rlimit("RLIMIT_AS", AS_FACTOR * lim.memory_mb * _MIB),
                _rlimit("RLIMIT_FSIZE", lim.disk_mb * _MIB),
                _rlimit("RLIMIT_CORE", 0),
            ],
        },
        "root": {"path": bundle.rootfs, "readonly": True},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "network"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
            ],
            "resources": {
                "memory": {"limit": (lim.memory_mb + SENTRY_OVERHEAD_MB) * _MIB},
                "pids": {"limit": HOST_PIDS_PER_TASK * lim.pids + HOST_PIDS_OVERHEAD},
                "cpu": {"quota": round(lim.cpus * _CPU_PERIOD), "period": _CPU_PERIOD},
            },
            "cgroupsPath": "/" + cgroup_name(spec),
            "seccomp": _seccomp(),
        },
    }
