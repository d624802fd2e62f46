"""Pure ``spec -> argv`` builder for bubblewrap. No I/O: golden-tested.

Namespaces: a user namespace, pid, mount, ipc, uts, net (loopback only) and cgroup. The user
namespace is either bwrap's own (``--unshare-user``: the sandbox's uid 1000 maps to one
unprivileged host uid and nothing inside holds a capability), or, for a sandbox that can run
calls as root (``root=True``, docs/users.md), one the driver made with two fresh host ids
(``userns.Holder``: uid 0 and uid 1000 inside), which bwrap runs in as its root: the agent
then starts as uid 0 with root's bounded capability set (``ROOT_CAPS``) and splits itself
(``moat.agent.shield``).
"""

from __future__ import annotations

from dataclasses import dataclass

from moat.protocol.contract import ROOT_CAPS
from moat.runtime.rootlayout import Op
from moat.runtime.spec import AGENT_DIR, HOME, SANDBOX_GID, SANDBOX_UID, SandboxSpec

#: Host /etc entries a userland needs and that hold nothing about the host's users or secrets.
#: Never the host's /etc wholesale (DESIGN invariant 1).
HOST_ETC = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "alternatives",
    "localtime",
    "mime.types",
    "protocols",
    "services",
    "matplotlibrc",
    "python3",
    "python3.11",
)
#: Synthetic files moat writes for every sandbox (see template.py).
SYNTHETIC_ETC = ("passwd", "group", "hostname", "hosts", "resolv.conf", "nsswitch.conf")
#: The kernel's boot id: the host's would identify the host; each sandbox gets its own.
BOOT_ID = "/proc/sys/kernel/random/boot_id"
#: /usr-merged top-level symlinks.
USR_LINKS = (
    ("usr/bin", "/bin"),
    ("usr/sbin", "/sbin"),
    ("usr/lib", "/lib"),
    ("usr/lib64", "/lib64"),
)
#: Paths moat mounts itself on a template's root (issue 12): never taken from the template
#: (``sys``: not mounted at all, as with the host's /usr).
OWNED = (
    "proc",
    "dev",
    "sys",
    "tmp",
    HOME,
    AGENT_DIR,
    *(f"etc/{name}" for name in SYNTHETIC_ETC),
    "etc/ssh/ssh_config",
)


def owned(spec: SandboxSpec) -> tuple[str, ...]:
    """Paths moat mounts on this sandbox's root: its own, and the caller's mounts."""
    return OWNED + tuple(m.sandbox_path for m in spec.mounts)


@dataclass(frozen=True)
class HostLayout:
    """Facts about the host the builder needs, gathered by the driver (which does the I/O)."""

    agent_dir: str  # host dir bound read-only at AGENT_DIR
    etc_dir: str  # host dir with the synthetic /etc files
    seccomp_fd: int  # fd of the compiled BPF filter
    host_etc: tuple[str, ...] = HOST_ETC  # the subset of HOST_ETC that exists on this host
    usr_links: tuple[tuple[str, str], ...] = USR_LINKS  # the subset that exists on this host
    #: where bwrap finds each of spec.mounts (staged by the driver, see mountns.py); empty:
    #: the mounts' host paths themselves
    mount_sources: tuple[str, ...] = ()
    #: the template's root as ``/`` (spec.rootfs, planned by runtime.templateroot); empty
    #: for the host's /usr
    root_ops: tuple[Op, ...] = ()
    #: where bwrap finds the template's root (staged by the driver, see mountns.py); empty:
    #: spec.rootfs itself
    root_source: str = ""
    #: a file with this sandbox's own boot id, shown at /proc/sys/kernel/random/boot_id in
    #: place of the host's (a stable host identifier: invariant 1); empty: none staged
    boot_id: str = ""
    #: ``root_source`` is the sandbox's whole ``/`` (the template's root under moat's own
    #: layer, one overlay: mountns.py, toplayer.py): bound once, and moat's /etc files and
    #: agent are already in it
    root_merged: bool = False


def build_argv(
    spec: SandboxSpec, host: HostLayout, command: list[str], *, root: bool = False
) -> list[str]:
    """The full bwrap command line for ``spec`` running ``command`` as the sandbox's init;
    ``root``: bwrap runs as root of a user namespace the driver made (module doc)."""
    disk = spec.limits.disk_mb * 1024 * 1024
    tmp_size = max(16 * 1024 * 1024, disk // 4)
    shm_size = max(4 * 1024 * 1024, disk // 8)
    argv = ["bwrap"]
    if not root:
        argv += ["--unshare-user"]
    argv += [
        "--unshare-pid",
        # the agent is the pid namespace's init: user code cannot signal it (moat.agent.shield)
        "--as-pid-1",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-net",
        "--unshare-cgroup",
    ]
    if root:
        # No nested user namespace: the holder set max_user_namespaces=0 in this one, and the
        # seccomp filter refuses them (userns.py; --disable-userns needs --unshare-user).
        # The agent keeps root's bounded set, as on gVisor (invariant 9: no SYS_ADMIN,
        # SYS_PTRACE, SYS_RESOURCE; no_new_privs and seccomp as for every process).
        # CAP_SETPCAP only to drop the rest of the bounding set, which bwrap leaves whole
        # here; the agent does that and lets SETPCAP go first thing (shield._bound_root).
        argv += ["--cap-drop", "ALL"]
        for cap in sorted({*ROOT_CAPS, "CAP_SETPCAP"}):
            argv += ["--cap-add", cap]
    else:
        argv += ["--disable-userns", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID)]
    argv += [
        "--hostname", spec.hostname,
        "--die-with-parent",
        "--new-session",
        "--clearenv",
    ]  # fmt: skip
    for key, value in sorted(spec.env().items()):
        argv += ["--setenv", key, value]
    merged = spec.rootfs is not None and host.root_merged and bool(host.root_source)
    if spec.rootfs is None:
        argv += ["--ro-bind", "/usr", "/usr"]
        for target, link in host.usr_links:
            argv += ["--symlink", target, link]
    elif merged:
        # one read-only overlay: the template's root under moat's layer (invariant 1: moat's
        # own paths hide the template's; toplayer.py)
        argv += ["--ro-bind", host.root_source, "/"]
    else:
        # the template's root, read-only (bwrap binds nosuid, nodev) around moat's own paths
        argv += _template_root(host.root_source or spec.rootfs, host.root_ops)
    # bwrap's /dev is an uncapped tmpfs the sandbox uid owns: /dev/shm gets its own capped
    # tmpfs and /dev itself is made read-only below (issue 17: the disk limit means what it
    # says; tmpfs pages also count against the memory cgroup).
    argv += ["--proc", "/proc", "--ro-bind", f"{host.etc_dir}/cmdline", "/proc/cmdline"]
    if host.boot_id:
        argv += ["--ro-bind", host.boot_id, BOOT_ID]
    argv += ["--dev", "/dev"]
    argv += ["--perms", "1777", "--size", str(shm_size), "--tmpfs", "/dev/shm"]  # noqa: S108 - the sandbox's own
    if not merged:
        argv += ["--dir", "/etc"]
        for name in host.host_etc if spec.rootfs is None else ():  # a template has its own
            argv += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
        for name in SYNTHETIC_ETC:
            argv += ["--ro-bind", f"{host.etc_dir}/{name}", f"/etc/{name}"]
        # ssh through the egress gateway (runtime.spec.SSH_CONFIG)
        argv += ["--dir", "/etc/ssh"]
        argv += ["--ro-bind", f"{host.etc_dir}/ssh_config", "/etc/ssh/ssh_config"]
    argv += ["--perms", "0755", "--size", str(disk), "--tmpfs", HOME]
    argv += ["--perms", "1777", "--size", str(tmp_size), "--tmpfs", "/tmp"]  # noqa: S108 - the sandbox's own /tmp
    if not merged:
        if root:
            # bwrap makes the bind's missing parent 0700, its own: root's here, not the user's
            argv += ["--perms", "0755", "--dir", AGENT_DIR.rsplit("/", 1)[0]]
        argv += ["--ro-bind", host.agent_dir, AGENT_DIR]
    sources = host.mount_sources or tuple(m.host_path for m in spec.mounts)
    for m, source in zip(spec.mounts, sources, strict=True):
        argv += ["--ro-bind" if m.read_only else "--bind", source, m.sandbox_path]
    argv += [
        "--remount-ro", "/",
        "--remount-ro", "/dev",
        "--seccomp", str(host.seccomp_fd),
        "--chdir", HOME,
        "--",
    ]  # fmt: skip
    return argv + command


def _template_root(rootfs: str, ops: tuple[Op, ...]) -> list[str]:
    out: list[str] = []
    for op in ops:
        if op.op == "bind":
            out += ["--ro-bind", f"{rootfs}/{op.path}", f"/{op.path}"]
        elif op.op == "link":
            out += ["--symlink", op.target, f"/{op.path}"]
        else:
            out += ["--dir", f"/{op.path}"]
    return out
