"""Ray settings moat runs with: usage statistics off, fast node-loss detection, a small
footprint. Pure data plus the argv of ``ray start`` (DESIGN §5: argv lists, no shell)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping
from typing import Final

__all__ = [
    "HEALTH",
    "NAMESPACE",
    "OBJECT_STORE_BYTES",
    "ray_env",
    "ray_exe",
    "start_argv",
]

#: Ray namespace of moat's actors.
NAMESPACE: Final = "moat"
#: The object store of a moat node holds pulled batches and file bodies only.
OBJECT_STORE_BYTES: Final = 100 * 1000 * 1000
#: GCS health checks (head only): a dead raylet is declared dead after about
#: period x threshold = 3 s, inside issue 13's 5 s (measured: bench_cluster). Tighter (500 ms)
#: declared live nodes dead on this busy 2-core machine; Ray's default takes 15 s.
HEALTH: Final[Mapping[str, int]] = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


def ray_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Ray process moat starts: usage statistics off (they would
    report to a third party from a host that runs untrusted code), dedup of worker logs off."""
    env = dict(os.environ if base is None else base)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


def ray_exe() -> str:
    """The ``ray`` CLI next to this interpreter (the one whose ``ray`` package we import)."""
    here = os.path.join(os.path.dirname(sys.executable), "ray")
    return here if os.path.exists(here) else (shutil.which("ray") or "ray")


def start_argv(
    *,
    head: bool,
    address: str | None = None,
    port: int | None = None,
    node_ip: str = "127.0.0.1",
    resources: Mapping[str, float] | None = None,
    num_cpus: int = 0,
    temp_dir: str | None = None,
    block: bool = False,
) -> list[str]:
    """``ray start`` for a head (``head``) or a node joining ``address``."""
    argv = [ray_exe(), "start", f"--node-ip-address={node_ip}", f"--num-cpus={num_cpus}"]
    argv += [f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats"]
    if head:
        argv += ["--head", "--include-dashboard=false"]
        argv += [f"--system-config={json.dumps(dict(HEALTH), sort_keys=True)}"]
        if port is not None:
            argv.append(f"--port={port}")
    else:
        if not address:
            raise ValueError("a node joins a head: give its address")
        argv.append(f"--address={address}")
    if resources:
        argv.append(f"--resources={json.dumps(dict(resources), sort_keys=True)}")
    if temp_dir is not None:
        argv.append(f"--temp-dir={temp_dir}")
    if block:
        argv.append("--block")
    return argv
