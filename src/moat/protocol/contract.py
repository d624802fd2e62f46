"""The sandbox contract: fixed places and ports every tier, the agent and the host agree on.

Pure constants, stdlib only: the in-sandbox agent imports them too (it ships with
``moat.protocol``), and ``moat.model`` re-exports them for callers.
"""

from __future__ import annotations

#: Where the agent's code is bound read-only inside every sandbox.
AGENT_DIR = "/opt/moat"
#: The sandbox user's home and working directory (writable, size-capped).
HOME = "/home/user"
#: uid/gid the sandboxed processes see (mapped to an unprivileged host id).
SANDBOX_UID = 1000
SANDBOX_GID = 1000
#: The users a call may name (E2B's ``user=``): the sandbox user, and ``root`` (uid 0 inside
#: the sandbox, on the tiers that can give it: docs/users.md; never host root, invariant 9).
USERS = ("user", "root")
#: Root's capabilities inside a sandbox, by number (linux/capability.h): Docker's default set
#: without CAP_NET_RAW, CAP_MKNOD, CAP_SETPCAP and CAP_SETFCAP. No CAP_SYS_ADMIN (mounts,
#: namespaces), CAP_SYS_PTRACE (the agent), CAP_SYS_RESOURCE (limits), CAP_SYS_MODULE...
ROOT_CAPS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4, "CAP_KILL": 5,
    "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_NET_BIND_SERVICE": 10, "CAP_SYS_CHROOT": 18,
    "CAP_AUDIT_WRITE": 29,
}  # fmt: skip
#: The sandbox-side proxy port the agent serves (HTTP(S)_PROXY points here).
PROXY_PORT = 3128
#: Where the agent writes the CA bundle (system roots + this sandbox's interception CA).
CA_BUNDLE_PATH = "/tmp/.moat/ca-bundle.pem"  # noqa: S108 - a path inside the sandbox

__all__ = [
    "AGENT_DIR",
    "CA_BUNDLE_PATH",
    "HOME",
    "PROXY_PORT",
    "ROOT_CAPS",
    "SANDBOX_GID",
    "SANDBOX_UID",
    "USERS",
]
