"""A real Ray cluster on loopback for the cluster tests and bench: a head (no moat node) and
moat nodes started by the real ``moat node`` command, each with its own state directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from moat.cluster import launch

MOAT = [sys.executable, "-m", "moat.cli"]


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for c in children(todo.pop()):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def state_dir(name: str) -> str:
    """A private state dir sharing the host's built microVM and gVisor artefacts."""
    d = Path(tempfile.mkdtemp(prefix=f"moat-node-{name}-"))
    d.chmod(0o755)  # like /var/lib/moat: the sandboxes' uids traverse it
    shared = Path(os.environ.get("MOAT_STATE_DIR", "/var/lib/moat"))
    for sub in ("microvm", "gvisor-compat"):
        src = shared / sub
        if src.exists():
            (d / sub).symlink_to(src.resolve())
    return str(d)


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    state: str
    log: Path

    def raylet(self) -> int:
        """The pid of this node's raylet (a child of ``ray start --block``)."""
        for c in children(self.proc.pid):
            if comm(c) == "raylet":
                return c
        raise RuntimeError(f"node {self.name} has no raylet")


@dataclass
class Cluster:
    address: str
    head: subprocess.Popen[bytes]
    workdir: Path
    nodes: dict[str, Node] = field(default_factory=dict)
    #: the shared store of paused sandboxes every node is started with (``--paused-dir``)
    paused_dir: str | None = None

    def add_node(self, name: str, tiers: str, slots: int, state: str | None = None) -> Node:
        log = self.workdir / f"node-{name}.log"
        env = {**os.environ, "MOAT_WARM_POOL": "0", "MOAT_STATE_DIR": state or state_dir(name)}
        env.pop("MOAT_AUDIT_DB", None)
        env.pop("MOAT_PAUSED_DIR", None)
        paused = ["--paused-dir", self.paused_dir] if self.paused_dir else []
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*MOAT, "node", "--address", self.address, "--tiers", tiers,
                 "--slots", str(slots), *paused],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        node = Node(name, proc, env["MOAT_STATE_DIR"], log)
        self.nodes[name] = node
        return node

    def stop(self) -> None:
        for node in self.nodes.values():
            launch.stop(node.proc)
        launch.stop(self.head)


def start_cluster(workdir: Path, paused_dir: str | None = None) -> Cluster:
    """A head; ``paused_dir``: the shared paused store the nodes added later reach."""
    address, head = launch.start_head(env={**os.environ, "MOAT_WARM_POOL": "0"})
    return Cluster(address, head, workdir, paused_dir=paused_dir)


def wait_nodes(count: int, timeout: float = 90) -> None:
    """Until ``count`` live Ray nodes advertise ``moat_node`` (needs ``ray.init`` done)."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        listed = ray.nodes()  # type: ignore[no-untyped-call]
        up = [n for n in listed if n.get("Alive") and (n.get("Resources") or {}).get("moat_node")]
        if len(up) >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(up)} of {count} moat nodes came up")
        time.sleep(0.2)


def kill_raylet(node: Node) -> float:
    """SIGKILL the node's raylet; return when (monotonic)."""
    pid = node.raylet()
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()
