"""Reseed after a restore or fork: two sandboxes from one checkpoint never share randomness.

Runs INSIDE the sandbox (assume compromised: it only harms its own randomness). The host
sends fresh entropy; it is mixed into the kernel's pool where the sandbox may write
``/dev/urandom`` (a write mixes without crediting: harmless when refused), then the agent's
``random`` and every kernel's (SIGUSR2, see ``kernel._on_reseed``) are seeded from the
pool again.
"""

from __future__ import annotations

import os
import signal
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable


def reseed(entropy: bytes, kernel_pids: Iterable[int]) -> None:
    try:
        with open("/dev/urandom", "wb", buffering=0) as pool:
            pool.write(entropy)
    except OSError:
        pass  # a read-only pool: os.urandom still differs per boot unless memory was kept
    rnd = sys.modules.get("random")
    if rnd is not None:
        rnd.seed(os.urandom(32) + entropy)
    for pid in kernel_pids:
        try:
            os.kill(pid, signal.SIGUSR2)
        except OSError:
            pass  # ended meanwhile
