"""``moat node`` (a machine joins a cluster) and the local head of ``moat serve --cluster``.

A node probes its tiers (``moat doctor``'s logic), sweeps what a crashed node left on this
host (invariant 5), and only then starts its raylet advertising the tiers that passed and
its capacity as custom resources (invariant 7: a tier that fails its probe is never
advertised; one the operator asked for by name fails the start instead).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from moat.cluster import raycfg
from moat.cluster.paused import ENV as PAUSED_ENV
from moat.cluster.resources import advertise, tiers_of
from moat.errors import IsolationUnavailableError
from moat.model.tiers import TIERS

log = logging.getLogger("moat.cluster.launch")

__all__ = [
    "LOCAL_ONLY_ENV",
    "free_port",
    "keep_ray_on_loopback",
    "node_resources",
    "run_node",
    "start_head",
    "start_local_head",
    "stop",
    "sweep",
]


def node_resources(
    slots: int, tiers: Sequence[str] | None = None, *, paused_dir: str | None = None
) -> dict[str, float]:
    """Probe this host and return what it may advertise. ``tiers``: only these (each must
    pass its probe, else IsolationUnavailableError naming why); None: every tier that passes.
    ``paused_dir``: the cluster's shared store of paused sandboxes (must be a directory)."""
    from moat.engine.tiers import runtime_for

    wanted = list(TIERS) if tiers is None else list(tiers)
    probes: dict[str, str | None] = {}
    for tier in wanted:
        if tier not in TIERS:
            raise IsolationUnavailableError(f"unknown tier {tier!r}")
        probes[tier] = runtime_for(tier).probe()
        if tiers is not None and probes[tier] is not None:
            raise IsolationUnavailableError(
                f"isolation tier {tier!r} is unavailable on this host: {probes[tier]}"
            )
    kvm = False
    if probes.get("microvm", "x") is None:
        from moat.runtime.microvm.probe import dev_kvm_usable, kvm_modules_loaded

        kvm = dev_kvm_usable() and kvm_modules_loaded()
    if paused_dir is not None and not os.path.isdir(paused_dir):
        raise IsolationUnavailableError(
            "the paused-sandbox store (--paused-dir) is not a directory"
        )
    return advertise(probes, slots, kvm=kvm, paused=paused_dir is not None)


def sweep(tiers: Sequence[str]) -> int:
    """Remove what sandboxes of a dead moat process left on this host (before advertising)."""
    from moat.engine.tiers import runtime_for

    swept = 0
    for tier in tiers:
        try:
            swept += runtime_for(tier).sweep()
        except Exception:  # logged; a failed sweep must not hide the node's start
            log.exception("sweep of %s failed", tier)
    return swept


def run_node(
    address: str,
    *,
    slots: int,
    tiers: Sequence[str] | None,
    node_ip: str,
    num_cpus: int,
    paused_dir: str | None = None,
) -> None:
    """Probe, sweep, then become ``ray start --block`` joining ``address`` (never returns).
    ``paused_dir``: the shared paused store, passed to the node's actor by its environment."""
    resources = node_resources(slots, tiers, paused_dir=paused_dir)
    usable = tiers_of(resources)
    if not usable:
        raise IsolationUnavailableError("no isolation tier can run on this host (moat doctor)")
    swept = sweep(usable)
    print(f"moat node: swept {swept} leftovers; advertising tiers {', '.join(usable)} with "
          f"{slots} slots; joining {address}", flush=True)  # fmt: skip
    argv = raycfg.start_argv(
        head=False, address=address, node_ip=node_ip, resources=resources,
        num_cpus=num_cpus, block=True,
    )  # fmt: skip
    env = raycfg.ray_env()
    if paused_dir is not None:
        env[PAUSED_ENV] = os.path.abspath(paused_dir)  # read by the actor (moat.cluster.node)
    os.execve(argv[0], argv, env)  # noqa: S606 - an argv list, no shell


def start_head(
    port: int | None = None,
    *,
    node_ip: str = "127.0.0.1",
    resources: dict[str, float] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> tuple[str, subprocess.Popen[bytes]]:
    """Start a Ray head (usage stats off, tuned health checks, no dashboard) as a blocking
    ``ray start`` child; return its address and process. Stop it with :func:`stop` (never
    ``ray stop``, which would stop every Ray on this host)."""
    port = port or free_port()
    argv = raycfg.start_argv(head=True, port=port, node_ip=node_ip, resources=resources,
                             block=True)  # fmt: skip
    proc = subprocess.Popen(
        argv, env=raycfg.ray_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((node_ip, port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise IsolationUnavailableError("the Ray head did not start") from None
            time.sleep(0.2)
    return f"{node_ip}:{port}", proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a ``ray start --block`` child and the Ray processes it started (its session)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # --block stops the processes it started
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of its session is left


#: Ray's own switch for a Ray of one machine (its default on macOS and Windows): its Python
#: side then keeps a loopback node address instead of rewriting it into the host's outbound
#: one, and its gRPC servers bind 127.0.0.1 only (docs/cluster.md, "Security").
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_ray_on_loopback() -> None:
    """This process and the Ray processes it starts keep Ray's ports on loopback. Ray reads
    the switch when it is imported: if it already was, with the switch off, fail closed
    rather than start a head that listens on every interface."""
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", True):
        raise IsolationUnavailableError(
            "a local Ray head must start before Ray is imported (its ports would listen on "
            "every interface)"
        )
    os.environ[LOCAL_ONLY_ENV] = "0"


def start_local_head(slots: int = 16) -> tuple[str, Callable[[], None]]:
    """``moat serve --cluster`` alone: a head on this host that is itself a moat node, its
    Ray ports on loopback only (nothing else may join it: a one-machine cluster)."""
    keep_ray_on_loopback()
    resources = node_resources(slots, paused_dir=os.environ.get(PAUSED_ENV) or None)
    sweep(tiers_of(resources))
    address, proc = start_head(resources=resources)
    return address, lambda: stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def sweep_after(pid: int, tiers: Sequence[str], timeout: float = 60.0) -> int:
    """Wait for ``pid`` to end (a node's actor whose raylet died), then sweep what it left."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except OSError:
            break
        time.sleep(0.1)
    return sweep(tiers)


if __name__ == "__main__":  # the detached sweeper of a lost node (moat.cluster.node)
    if len(sys.argv) >= 3 and sys.argv[1] == "--sweep-after":
        sweep_after(int(sys.argv[2]), [t for t in sys.argv[3:] if t in TIERS])
