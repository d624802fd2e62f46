"""The seccomp filter every container-tier sandbox runs under (DESIGN invariant 9).

Trust domain: host engine. This module only *builds* a classic-BPF program (libseccomp's
``export_bpf`` output); bubblewrap loads it with ``--seccomp FD`` right before it execs the
sandbox's first process, after ``PR_SET_NO_NEW_PRIVS``, so it binds every process of the sandbox
and cannot be removed from inside.

Design:

* Default action ALLOW, with a deny list. The sandbox already runs as an unprivileged uid with
  no capabilities inside its own namespaces; the filter removes the kernel attack surface that
  remains reachable *without* privilege (nested user namespaces, io_uring, bpf, userfaultfd,
  perf, keyrings...) and the calls that only make sense for a privileged escape.
* Refused calls fail with an errno (:data:`REFUSED`), never a kill: a well-behaved program gets
  an ordinary error it can handle, and libc fallbacks keep working. ``ENOSYS`` is used where a
  library probes for a feature and falls back only on "not implemented" (``clone3`` -> glibc
  falls back to ``clone``, whose flags the filter *can* inspect; io_uring -> libuv & co fall
  back to epoll).
* Argument-dependent refusals are in :data:`ARG_RULES`. 32-bit arguments (``int`` domains,
  ``unsigned int`` ioctl commands) are compared under a ``0xffffffff`` mask: the kernel ignores
  the upper half of the register, so an exact 64-bit comparison could be dodged by setting
  high bits.
* Only the native x86-64 ABI is allowed. The i386 ABI (``int 0x80``) and the x32 ABI
  (``nr | 0x40000000``) reach the "bad architecture" action, which we set to
  ``ERRNO(ENOSYS)`` instead of libseccomp's default kill: "this ABI does not exist here" is the
  truthful answer and does not kill a probing program (libseccomp's x86-64 filter sends x32
  numbers to that same action).
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from moat.errors import IsolationUnavailableError

__all__ = [
    "ARG_RULES",
    "BAD_ARCH_ERRNO",
    "CLONE_NEW_FLAGS",
    "REFUSED",
    "ArgRule",
    "build_filter",
]

_EPERM: Final = errno.EPERM
_ENOSYS: Final = errno.ENOSYS

#: Syscalls refused whatever their arguments: name -> errno returned to the caller.
REFUSED: Final[Mapping[str, int]] = MappingProxyType(
    {
        # mounts and the new mount API: a sandbox never changes its own file system view
        "mount": _EPERM,
        "umount2": _EPERM,
        "pivot_root": _EPERM,
        "move_mount": _EPERM,
        "open_tree": _EPERM,
        "fsopen": _EPERM,
        "fsconfig": _EPERM,
        "fsmount": _EPERM,
        "fspick": _EPERM,
        "mount_setattr": _EPERM,
        # namespaces: nested user namespaces are the largest unprivileged kernel surface
        "unshare": _EPERM,
        "setns": _EPERM,
        # clone3 passes flags through memory the filter cannot read: ENOSYS makes glibc fall
        # back to clone(2), whose flags ARG_RULES checks
        "clone3": _ENOSYS,
        # reading/writing other processes
        "ptrace": _EPERM,
        "process_vm_readv": _EPERM,
        "process_vm_writev": _EPERM,
        "process_madvise": _EPERM,
        "pidfd_getfd": _EPERM,
        "kcmp": _EPERM,
        # kernel attack surface reachable without privilege
        "bpf": _EPERM,
        "perf_event_open": _EPERM,
        "userfaultfd": _EPERM,
        "io_uring_setup": _ENOSYS,
        "io_uring_enter": _ENOSYS,
        "io_uring_register": _ENOSYS,
        "keyctl": _EPERM,
        "add_key": _EPERM,
        "request_key": _EPERM,
        "personality": _EPERM,
        # file handles bypass path checks (the "shocker" escape)
        "open_by_handle_at": _EPERM,
        "name_to_handle_at": _EPERM,
        # kernel, modules, machine state
        "kexec_load": _EPERM,
        "kexec_file_load": _EPERM,
        "init_module": _EPERM,
        "finit_module": _EPERM,
        "delete_module": _EPERM,
        "reboot": _EPERM,
        "swapon": _EPERM,
        "swapoff": _EPERM,
        "acct": _EPERM,
        "quotactl": _EPERM,
        "quotactl_fd": _EPERM,
        "lookup_dcookie": _EPERM,
        "syslog": _EPERM,
        "vhangup": _EPERM,
        "iopl": _EPERM,
        "ioperm": _EPERM,
        "uselib": _EPERM,
        "sethostname": _EPERM,
        "setdomainname": _EPERM,
        "fanotify_init": _EPERM,
        # clocks are shared with the host (no time namespace is set up)
        "settimeofday": _EPERM,
        "clock_settime": _EPERM,
        "clock_adjtime": _EPERM,
        "adjtimex": _EPERM,
    }
)


@dataclass(frozen=True)
class ArgRule:
    """Refuse ``syscall`` with ``errno_`` when every ``(args[i] & mask) == value`` holds.

    ``conds`` is a tuple of ``(i, mask, value)``; the comparisons are ANDed.
    """

    syscall: str
    conds: tuple[tuple[int, int, int], ...]
    errno_: int
    why: str


# Constants spelled out so the filter does not depend on what the host's Python exposes.
CLONE_NEW_FLAGS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "CLONE_NEWTIME": 0x00000080,  # only meaningful for clone3/unshare; harmless to refuse
        "CLONE_NEWNS": 0x00020000,
        "CLONE_NEWCGROUP": 0x02000000,
        "CLONE_NEWUTS": 0x04000000,
        "CLONE_NEWIPC": 0x08000000,
        "CLONE_NEWUSER": 0x10000000,
        "CLONE_NEWPID": 0x20000000,
        "CLONE_NEWNET": 0x40000000,
    }
)
_INT32: Final = 0xFFFFFFFF
_SOCK_TYPE_MASK: Final = 0xF  # SOCK_NONBLOCK / SOCK_CLOEXEC live above it
_AF_INET: Final = 2
_AF_INET6: Final = 10
_AF_PACKET: Final = 17
_SOCK_RAW: Final = 3
_SOCK_PACKET: Final = 10
_TIOCSTI: Final = 0x5412
_TIOCLINUX: Final = 0x541C

#: Argument-dependent refusals, each one rule of the filter.
ARG_RULES: Final[tuple[ArgRule, ...]] = (
    # clone(flags, ...): flags is a full 64-bit unsigned long, one rule per namespace bit
    *(
        ArgRule("clone", ((0, bit, bit),), _EPERM, f"{name}: no new namespaces")
        for name, bit in CLONE_NEW_FLAGS.items()
    ),
    # socket(domain, type, protocol): domain is an int (masked to 32 bits); type is masked to
    # its low nibble so SOCK_NONBLOCK/SOCK_CLOEXEC cannot hide it
    ArgRule("socket", ((0, _INT32, _AF_PACKET),), _EPERM, "AF_PACKET: link-layer access"),
    ArgRule(
        "socket",
        ((0, _INT32, _AF_INET), (1, _SOCK_TYPE_MASK, _SOCK_RAW)),
        _EPERM,
        "raw IPv4 sockets: forge packets",
    ),
    ArgRule(
        "socket",
        ((0, _INT32, _AF_INET6), (1, _SOCK_TYPE_MASK, _SOCK_RAW)),
        _EPERM,
        "raw IPv6 sockets: forge packets",
    ),
    # SOCK_PACKET is the obsolete packet socket (in any domain); AF_NETLINK's ordinary
    # SOCK_RAW (glibc's getaddrinfo uses it) stays allowed
    ArgRule("socket", ((1, _SOCK_TYPE_MASK, _SOCK_PACKET),), _EPERM, "SOCK_PACKET sockets"),
    # ioctl(fd, cmd, ...): cmd is an unsigned int, masked to 32 bits
    ArgRule("ioctl", ((1, _INT32, _TIOCSTI),), _EPERM, "TIOCSTI: inject terminal input"),
    ArgRule("ioctl", ((1, _INT32, _TIOCLINUX),), _EPERM, "TIOCLINUX: console tricks"),
)

#: errno returned for the i386 (int 0x80) and x32 ABIs.
BAD_ARCH_ERRNO: Final = _ENOSYS


@functools.cache
def build_filter() -> bytes:
    """Return the sandbox's seccomp filter as classic BPF, for bubblewrap's ``--seccomp FD``.

    Built once per process and cached (the result is immutable bytes). Raises
    IsolationUnavailableError if libseccomp is missing or rejects the filter: the container
    tier never runs without it (invariant 7).
    """
    try:
        import pyseccomp  # local: importing moat must not need libseccomp

        return _build(pyseccomp)
    except (ImportError, OSError, AttributeError, ValueError) as exc:
        raise IsolationUnavailableError(
            "the seccomp filter could not be built (is libseccomp2 installed?)"
        ) from exc


def _build(s: Any) -> bytes:
    # pyseccomp is untyped; its Any-typed calls stay in this one function.
    flt = s.SyscallFilter(s.ALLOW)
    flt.set_attr(s.Attr.ACT_BADARCH, s.ERRNO(BAD_ARCH_ERRNO))
    for name, err in REFUSED.items():
        if s.resolve_syscall(s.Arch.NATIVE, name) < 0:
            # Not a syscall of this architecture (iopl, ioperm... exist only on x86), so it
            # cannot be called; tests check every name resolves on x86-64 (catches typos).
            continue
        flt.add_rule(s.ERRNO(err), name)
    for rule in ARG_RULES:
        args = [s.Arg(i, s.MASKED_EQ, mask, value) for i, mask, value in rule.conds]
        flt.add_rule(s.ERRNO(rule.errno_), rule.syscall, *args)
    # A memfd keeps the program off the file system (no temp file to leak, invariant 5).
    fd = os.memfd_create("moat-seccomp", os.MFD_CLOEXEC)
    with os.fdopen(fd, "w+b") as out:
        flt.export_bpf(out)
        out.seek(0)
        program = out.read()
    if not program or len(program) % 8:
        raise ValueError("libseccomp returned a malformed BPF program")
    return program
