"""What a node advertises to Ray and what a sandbox reserves: pure, no Ray import.

A node advertises only the tiers its probes passed (invariant 7): a tier no node advertises
has no resource anywhere, so no bundle asking for it can ever be placed, and the server
refuses it up front with IsolationUnavailableError instead of waiting.
"""

from __future__ import annotations

from collections.abc import Mapping

from moat.model.tiers import TIERS

__all__ = [
    "KVM",
    "NODE",
    "PAUSED",
    "SLOT",
    "advertise",
    "bundle_for",
    "tier_resource",
    "tiers_of",
]

#: Marks a Ray node as a moat node (1 per node); its actor is pinned there.
NODE = "moat_node"
#: One per sandbox a node may host (its capacity).
SLOT = "moat_slot"
#: Present (= slots) where /dev/kvm is usable: the microVM tier runs accelerated there.
KVM = "moat_kvm"
#: Present (= slots) where the node reaches the cluster's shared store of paused sandboxes
#: (``moat node --paused-dir``): a paused sandbox resumes only on such a node.
PAUSED = "moat_paused_store"
_TIER_PREFIX = "moat_tier_"
#: The memory a bundle reserves is the sandbox's limit; never below this (MiB).
MIN_BUNDLE_MEMORY_MB = 32


def tier_resource(tier: str) -> str:
    """The Ray custom resource that says a node can enforce ``tier``."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}")
    return _TIER_PREFIX + tier


def advertise(
    probes: Mapping[str, str | None], slots: int, *, kvm: bool = False, paused: bool = False
) -> dict[str, float]:
    """The custom resources of a node whose ``probes`` (tier -> None when usable, else why
    not: ``Engine.doctor()``) passed for some tiers. Every tier resource carries ``slots``
    units so that one bundle takes one unit of its tier and one slot. ``paused``: the node
    reaches the shared store of paused sandboxes."""
    if slots < 1:
        raise ValueError("a node needs at least one slot")
    out: dict[str, float] = {NODE: 1.0, SLOT: float(slots)}
    for tier in TIERS:
        if probes.get(tier, "not probed") is None:
            out[tier_resource(tier)] = float(slots)
    if kvm and tier_resource("microvm") in out:
        out[KVM] = float(slots)
    if paused:
        out[PAUSED] = float(slots)
    return out


def tiers_of(resources: Mapping[str, float]) -> list[str]:
    """The tiers a node's resources advertise."""
    return [t for t in TIERS if resources.get(tier_resource(t), 0) > 0]


def bundle_for(tier: str, memory_mb: int, *, paused: bool = False) -> dict[str, float]:
    """The one bundle a sandbox of ``tier`` with a ``memory_mb`` limit reserves.

    A slot, a unit of its tier and its memory limit (Ray's ``memory`` resource, bytes):
    a node is never promised more sandbox memory than it has. No CPU is reserved: a
    sandbox's CPU limit is a cgroup cap the kernel enforces (invariant 10), and reserving
    whole CPUs would cap a 2-core node at two sandboxes. ``paused``: a resume, which only
    a node reaching the paused store may host.
    """
    mem = max(int(memory_mb), MIN_BUNDLE_MEMORY_MB)
    out = {SLOT: 1.0, tier_resource(tier): 1.0, "memory": float(mem << 20)}
    if paused:
        out[PAUSED] = 1.0
    return out
