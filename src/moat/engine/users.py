"""Who a call runs as inside a sandbox (E2B's ``user=``; docs/users.md).

``user`` (uid 1000, home ``/home/user``) by default; ``root`` is uid 0 *inside* the sandbox
on the tiers whose agent can give it safely, never host root (invariant 9). A tier that
cannot refuses with a typed error naming it, never quietly running as ``user`` (invariant 7).
"""

from __future__ import annotations

from moat.errors import InvalidArgumentError, PolicyError
from moat.protocol.contract import USERS
from moat.runtime.spec import SandboxSpec

DEFAULT_USER = "user"
#: Tiers that run ``user="root"`` calls: gVisor's root is the sentry's (its own kernel, in
#: the sandbox's user namespace on the host); the container tier's is uid 0 of the sandbox's
#: own user namespace, two fresh host ids that own nothing (runtime/container/driver.py); the
#: microVM's is the guest kernel's, with the guest's host-facing parts out of its reach
#: (moat/guest/boot.py ``confine``).
ROOT_TIERS = frozenset({"gvisor", "container", "microvm"})
#: Why a sandbox with host mounts refuses root, per tier.
_MOUNT_REASON = {
    # gVisor's gofer serves host directories as host root and the sentry compares file
    # owners with in-sandbox uids as they are: root inside would read a mounted host
    # root's 0600 files and leave root-owned (setuid) files in a writable mount.
    "gvisor": "root inside would act as host root on their files",
    # The container tier starts such a sandbox without uid 0 at all: root's CHOWN and
    # FSETID would leave files of the shared sandbox group, setgid, in a writable mount.
    "container": "root inside could leave setgid files of the sandboxes' shared group there",
    # The microVM's mount images keep host owners and modes, checked for the user only
    # (mountimg.py): root's DAC_OVERRIDE would read what the user may not.
    "microvm": "root inside would read what the user may not in their images",
}


def root_refusal(tier: str | None = None) -> PolicyError:
    """The typed refusal of a ``user="root"`` call: of ``tier``, or (None) of a sandbox whose
    agent cannot run calls as root (a guest started by an older moat)."""
    if tier is None:
        return PolicyError(
            "this sandbox lacks the capability 'user.root': its agent cannot run calls as "
            "root (start a new sandbox to use user='root')"
        )
    return PolicyError(
        f"the {tier} tier lacks the capability 'user.root': run the sandbox on the "
        f"{'/'.join(sorted(ROOT_TIERS))} tier to use user='root'"
    )


def as_root(spec: SandboxSpec, user: str) -> bool:
    """Whether a call naming ``user`` runs as root in the sandbox of ``spec``; raises for any
    other name, and where the sandbox cannot give root safely."""
    tier = spec.tier
    if not isinstance(user, str) or user not in USERS:
        raise InvalidArgumentError(f"user must be one of {', '.join(map(repr, USERS))}")
    if user != "root":
        return False
    if tier not in ROOT_TIERS:
        raise root_refusal(tier)
    if spec.mounts:
        raise PolicyError(
            f"the {tier} tier lacks the capability 'user.root' for a sandbox with host "
            f"mounts: {_MOUNT_REASON.get(tier, 'root inside could reach their files')}"
        )
    return True
