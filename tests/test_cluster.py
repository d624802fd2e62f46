"""moat on a real Ray cluster (issue 13): a head and two moat nodes on loopback, one per module.

Node A advertises the container tier only, node B container and gVisor (``moat node
--tiers``); microVM is advertised nowhere. The server side is a ``ClusterFrontDoor`` in this
process (and, for the E2B SDK, a real ``moat serve --cluster``). Every node and the server
share one paused-sandbox store (``--paused-dir``, a directory of this machine). Every check
of containment is made from outside: processes and cgroups in /proc and /sys, a listener's
accept count, the paused store's directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.cluster_support import (
    MOAT,
    Cluster,
    alive,
    children,
    descendants,
    kill_raylet,
    start_cluster,
    wait_nodes,
)
from tests.loopnet import interfaces, listeners, loopback_only_netns
from tests.server_support import Server, free_port, new_key
from tests.test_ingress import _ws_echo

from moat.cluster.door import ClusterFrontDoor
from moat.errors import (
    CapacityError,
    IsolationUnavailableError,
    NotFoundError,
    PolicyError,
    QuotaExceededError,
    SandboxError,
    SandboxLostError,
)
from moat.model import End, Output, Started

pytestmark = [pytest.mark.container, pytest.mark.gvisor, pytest.mark.slow]

SLOTS = 3  # per node: 6 sandboxes fill the cluster
PLACE_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    import ray

    # Ray's ports on loopback only (issue 13): the whole cluster, its server side and this
    # thread live in a network namespace whose one interface is lo (tests/loopnet.py)
    with loopback_only_netns():
        c = start_cluster(
            tmp_path_factory.mktemp("cluster"), paused_dir=str(tmp_path_factory.mktemp("paused"))
        )
        try:
            ray.init(address=c.address, namespace="moat", log_to_driver=False,
                     configure_logging=False)  # fmt: skip
            # one at a time: two raylets registering at once time out on a busy 2-core host
            c.add_node("a", "container", SLOTS)
            wait_nodes(1)
            c.add_node("b", "container,gvisor", SLOTS)
            wait_nodes(2)
            yield c
        finally:
            ray.shutdown()
            c.stop()


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def door(cluster: Cluster, loop: asyncio.AbstractEventLoop) -> Iterator[ClusterFrontDoor]:
    d = ClusterFrontDoor(
        cluster.address, place_timeout=PLACE_TIMEOUT, paused_dir=cluster.paused_dir
    )
    loop.run_until_complete(d.start(min_nodes=2))
    yield d
    loop.run_until_complete(d.close())


def run(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return loop.run_until_complete(coro)


async def command(door: ClusterFrontDoor, tenant: str, sid: str, cmd: str) -> tuple[str, int]:
    handle = await door.start_command(tenant, sid, cmd)
    out, code = [], -1
    async for event in handle.events():
        if isinstance(event, Output):
            out.append(event.text)
        elif isinstance(event, End):
            code = event.exit_code if event.exit_code is not None else -1
    return "".join(out), code


def create(loop: asyncio.AbstractEventLoop, door: ClusterFrontDoor, tenant: str, tier: str,
           **kw: Any) -> str:  # fmt: skip
    info = run(loop, door.create(tenant, door.resolve(isolation=tier, timeout=300), **kw))
    return str(info.sandbox_id)


def node_name(cluster: Cluster, door: ClusterFrontDoor, tenant: str, sid: str) -> str:
    """Which of the cluster's nodes hosts the sandbox: its actor's parent is that raylet."""
    pid = door.node_of(tenant, sid)["pid"]
    raylet = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    for name, node in cluster.nodes.items():
        if raylet in children(node.proc.pid):
            return name
    raise AssertionError("the sandbox's actor runs under no known raylet")


def test_rays_ports_listen_on_loopback_only(cluster: Cluster, door: ClusterFrontDoor) -> None:
    """Issue 13: no process of the test cluster (GCS, raylets' node and object managers,
    runtime-env agents, workers with the node actors, this driver) listens on anything but
    loopback, read from outside them (/proc); and their namespace has no interface but lo.
    Positive control: the same reader flags a listener of ours on 0.0.0.0."""
    pids = {os.getpid(), cluster.head.pid} | descendants(cluster.head.pid)
    for node in cluster.nodes.values():
        pids |= {node.proc.pid} | descendants(node.proc.pid)
    found = listeners(pids)
    names = {entry.comm for entry in found}
    assert {"gcs_server", "raylet", "ray::NodeActor"} <= names, found
    assert len([e for e in found if e.comm == "raylet"]) >= 2 * (1 + len(cluster.nodes))
    assert [e for e in found if not e.loopback] == [], found
    assert {tuple(interfaces(pid)) for pid in (cluster.head.pid, door_pid(door))} == {("lo",)}
    # positive control: a listener on every interface is seen as such
    ctl = socket.socket()
    try:
        ctl.bind(("0.0.0.0", 0))
        ctl.listen(1)
        mine = [e for e in listeners([os.getpid()]) if e.port == ctl.getsockname()[1]]
        assert len(mine) == 1 and not mine[0].loopback, mine
    finally:
        ctl.close()


def door_pid(door: ClusterFrontDoor) -> int:
    """The pid of one of the door's node actors."""
    return int(next(iter(door.nodes.values())).info["pid"])


def test_sandboxes_land_on_a_node_owning_their_tier(
    cluster: Cluster, door: ClusterFrontDoor, loop: asyncio.AbstractEventLoop
) -> None:
    gv = create(loop, door, "t-tier", "gvisor")
    ct = create(loop, door, "t-tier", "container")
    try:
        assert node_name(cluster, door, "t-tier", gv) == "b"  # only B advertises gVisor
        assert run(loop, door.info("t-tier", gv)).tier == "gvisor"
        for sid in (gv, ct):
            out, code = run(loop, command(door, "t-tier", sid, "echo placed; echo e >&2"))
            assert (out, code) == ("placed\ne\n", 0)
        # another tenant's id answers exactly like an unknown one (invariant 11)
        with pytest.raises(NotFoundError, match=f"sandbox {gv} was not found"):
            run(loop, door.info("t-other", gv))
    finally:
        for sid in (gv, ct):
            run(loop, door.kill("t-tier", sid))


def test_a_tier_no_node_advertises_fails_closed(
    door: ClusterFrontDoor, loop: asyncio.AbstractEventLoop
) -> None:
    import ray

    before = len(ray.util.placement_group_table())
    t0 = time.monotonic()
    with pytest.raises(IsolationUnavailableError, match="'microvm' is not offered"):
        create(loop, door, "t-closed", "microvm")
    assert time.monotonic() - t0 < 2  # refused at once, no wait for a bundle
    assert len(ray.util.placement_group_table()) == before  # nothing reserved


def test_a_full_cluster_gives_a_clear_error_then_room_again(
    door: ClusterFrontDoor, loop: asyncio.AbstractEventLoop
) -> None:
    made: list[str] = []
    try:
        for _ in range(2 * SLOTS):
            made.append(create(loop, door, "t-full", "container"))
        t0 = time.monotonic()
        with pytest.raises(CapacityError, match="no cluster node has room"):
            create(loop, door, "t-full", "container")
        waited = time.monotonic() - t0
        assert PLACE_TIMEOUT - 0.5 < waited < PLACE_TIMEOUT + 5  # bounded wait, then the error
        run(loop, door.kill("t-full", made.pop()))  # its bundle is released at once
        made.append(create(loop, door, "t-full", "container"))
    finally:
        for sid in made:
            run(loop, door.kill("t-full", sid))


def test_a_kill_ends_the_streams_open_on_it(
    door: ClusterFrontDoor, loop: asyncio.AbstractEventLoop
) -> None:
    """A command streaming from a node ends (with an error) when its sandbox is killed: the
    server's pull must not wait on a stream that never ends (E2B's killed-during-run test)."""
    sid = create(loop, door, "t-kill", "container")

    async def scenario() -> BaseException | None:
        handle = await door.start_command("t-kill", sid, "sleep 60")
        events = handle.events()
        assert isinstance(await anext(events), Started)
        pending = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.3)
        await door.kill("t-kill", sid)
        try:
            await asyncio.wait_for(pending, 10)
        except SandboxError as exc:
            return exc
        except StopAsyncIteration:
            return None
        return None

    t0 = time.monotonic()
    ended = run(loop, scenario())
    assert time.monotonic() - t0 < 10
    assert isinstance(ended, SandboxError), ended


def test_a_tenants_quota_holds_across_nodes(
    cluster: Cluster, door: ClusterFrontDoor, loop: asyncio.AbstractEventLoop
) -> None:
    """The server keeps the tenant's quota for the whole cluster (invariant 11): two sandboxes
    on two nodes count as two, and another tenant is not held back."""
    from moat.engine.tenants import Quotas, TenantPolicies, TenantPolicy

    saved = door.policy
    door.policy = TenantPolicies(tenants={"t-quota": TenantPolicy(quotas=Quotas(sandboxes=2))})
    made: list[tuple[str, str]] = []
    try:
        for _ in range(8):  # until one is on each node
            if len({node_name(cluster, door, t, s) for t, s in made}) == 2:
                break
            if len(made) == 2:
                run(loop, door.kill(*made.pop(0)))
            made.append(("t-quota", create(loop, door, "t-quota", "container")))
        assert len({node_name(cluster, door, t, s) for t, s in made}) == 2
        with pytest.raises(QuotaExceededError):
            create(loop, door, "t-quota", "container")
        made.append(("t-free", create(loop, door, "t-free", "container")))
    finally:
        door.policy = saved
        for tenant, sid in made:
            run(loop, door.kill(tenant, sid))


def _listener() -> tuple[socket.socket, list[Any]]:
    """A canary listener on every interface (as Ray's ports are): counts what arrives."""
    srv = socket.socket()
    srv.bind(("0.0.0.0", 0))
    srv.listen(8)
    got: list[Any] = []

    def accept() -> None:
        while True:
            try:
                got.append(srv.accept())
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return srv, got


PROBE = r"""
import os, socket, sys
out = []
for host, port in [(h, int(p)) for h, p in (a.split(":") for a in sys.argv[1:])]:
    try:
        socket.create_connection((host, port), timeout=3).close(); out.append("direct-open")
    except OSError:
        out.append("direct-refused")
    proxy = os.environ.get("HTTP_PROXY") or os.environ.get("http_proxy")
    ph, pp = proxy.rsplit("/", 1)[-1].rsplit(":", 1)
    s = socket.create_connection((ph, int(pp)), timeout=5)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    out.append(s.recv(64).split(b"\r\n")[0].decode())
print(" | ".join(out))
"""


def test_guard_egress_and_ray_ports_on_a_remote_node(
    cluster: Cluster, door: ClusterFrontDoor, loop: asyncio.AbstractEventLoop
) -> None:
    canary = "moat-canary-" + os.urandom(6).hex()
    sid = create(loop, door, "t-guard", "container", sensitive=[canary])
    srv, got = _listener()
    try:
        out, _ = run(loop, command(door, "t-guard", sid, f"echo {canary}"))
        assert canary not in out and "[REDACTED" in out  # guarded on the node (invariant 4)
        gcs_port = cluster.address.rsplit(":", 1)[1]
        host_ip = socket.gethostbyname(socket.gethostname())
        canary_port = srv.getsockname()[1]
        targets = [f"127.0.0.1:{gcs_port}", f"{host_ip}:{gcs_port}", f"127.0.0.1:{canary_port}",
                   f"{host_ip}:{canary_port}"]  # fmt: skip
        run(loop, door.write_file("t-guard", sid, "/tmp/probe.py", PROBE))
        out, _ = run(loop, command(door, "t-guard", sid,
                                   "python3 /tmp/probe.py " + " ".join(targets)))  # fmt: skip
        answers = out.strip().split(" | ")
        assert answers[0::2] == ["direct-refused"] * 4, out  # no route to any host port
        assert all(" 403" in a or " 502" in a for a in answers[1::2]), out  # gateway says no
        time.sleep(0.5)
        assert got == []  # from outside: nothing reached the listener (positive control below)
        rows = run(loop, door.audit("t-guard", sid, denied_only=True))
        ports = {r.get("port") for r in rows if r.get("kind") == "egress"}
        assert int(gcs_port) in ports, rows  # the Ray port, audited as denied
        assert all(r["node"].endswith(door.node_of("t-guard", sid)["node_id"][:12]) for r in rows)
        # `moat audit --cluster` merges every node's trail and names the node of each row
        out = subprocess.run(
            [*MOAT, "audit", "--cluster", cluster.address, "--sandbox", sid, "--denied", "--json"],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
        merged = json.loads(out)
        assert {r["port"] for r in merged if r["kind"] == "egress"} >= {int(gcs_port)}
        node_id = door.node_of("t-guard", sid)["node_id"][:12]
        assert {r["node"].split("/")[1] for r in merged} == {node_id}
        # positive control: the listener does count a connection from outside a sandbox
        socket.create_connection(("127.0.0.1", canary_port), timeout=3).close()
        time.sleep(0.3)
        assert len(got) == 1
    finally:
        srv.close()
        run(loop, door.kill("t-guard", sid))


@pytest.fixture(scope="module")
def served(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real ``moat serve --cluster`` for the module's wire tests."""
    import httpx

    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "MOAT_WARM_POOL": "0"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*MOAT, "serve", "--host", "127.0.0.1", "--port", str(port), "--tier", "container",
             "--cluster", cluster.address, "--paused-dir", str(cluster.paused_dir)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    srv = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(srv.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield srv
    finally:
        assert srv.stop() == 0, log.read_text()[-3000:]


def sdk(scenario: str, **kw: Any) -> Any:
    """Run an E2B SDK scenario of tests/cluster_sdk.py in a child process (in this namespace;
    the SDK's transport threads must not outlive it: see that module)."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.cluster_sdk", scenario, json.dumps(kw)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_e2b_sdk_drives_a_clustered_server(cluster: Cluster, served: Server) -> None:
    """Code, commands, files, pause and connect (E2B's shapes) through the clustered server
    and its paused store."""
    sdk("drive", url=served.url, key=new_key("t-sdk"), paused_dir=str(cluster.paused_dir))


def test_ingress_reaches_a_sandbox_on_a_node_through_the_clustered_server(
    cluster: Cluster, served: Server
) -> None:
    """E2B's ``get_host``: an http.server inside a sandbox on a moat node (the head runs
    none) answers through the clustered server, 256 KB each way, with the sandbox's traffic
    token only; the connection is an audit row in the trail of the sandbox's node."""
    import httpx

    key = new_key("t-ingress")
    app = sdk("ingress_app", url=served.url, key=key)
    try:
        body = os.urandom(256 * 1024)
        host = {"Host": app["host"]}
        # without the token, or with a wrong one: refused like an unknown sandbox (502)
        for extra in ({}, {"E2B-Traffic-Access-Token": "x" * 32}):
            r = httpx.post(served.url + "/", content=body, headers={**host, **extra}, timeout=30)
            assert r.status_code == 502 and "was not found" in r.text, r.text
        token = {"E2B-Traffic-Access-Token": app["token"] or ""}
        t0 = time.monotonic()
        r = httpx.post(served.url + "/", content=body, headers={**host, **token}, timeout=60)
        took = time.monotonic() - t0
        assert r.status_code == 200, r.text[:300]
        assert r.content == body[::-1]  # 256 KB up, the app's 256 KB down, intact
        print(f"256 KB each way through the cluster in {took:.2f} s")
        # E2B's header form reaches it too
        hdrs = {"E2b-Sandbox-Id": app["id"], "E2b-Sandbox-Port": "8000", **token}
        r = httpx.post(served.url + "/", content=b"abc", headers=hdrs, timeout=30)
        assert (r.status_code, r.content) == (200, b"cba")
        # a WebSocket, message by message (with the token only)
        assert _ws_echo(served, app["id"], app["token"]) == ["echo:one", "echo:" + "two" * 100]
        assert _ws_echo(served, app["id"], None) == ["rejected"]
        # a port where nothing listens: the node's answer, 502
        r = httpx.get(served.url + "/", headers={"Host": app["closed"], **token}, timeout=30)
        assert r.status_code == 502
        # the audit rows are in the trail of the sandbox's node, which names itself
        deadline = time.monotonic() + 20
        while True:
            out = subprocess.run(
                [*MOAT, "audit", "--cluster", cluster.address, "--sandbox", app["id"], "--json"],
                capture_output=True, text=True, timeout=120, check=True,
            ).stdout  # fmt: skip
            rows = [r for r in json.loads(out) if r["kind"] == "ingress"]
            if len(rows) >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        big = [r for r in rows if r["result"] == "allow" and r["bytes_up"] >= len(body)]
        assert len(big) == 1 and big[0]["bytes_down"] >= len(body), rows
        assert any(r["result"] == "deny" and r["port"] == 8009 for r in rows), rows
        assert len({r["node"] for r in rows}) == 1  # one node, named on every row
    finally:
        sdk("kill", url=served.url, key=key, sandbox_id=app["id"])


def test_directory_watches_on_a_node_through_the_clustered_server(served: Server) -> None:
    """E2B's directory watches against a sandbox on a moat node: the sync SDK's polling form
    (CreateWatcher / GetWatcherEvents / RemoveWatcher) and the async SDK's stream (WatchDir)."""
    got = sdk("watches", url=served.url, key=new_key("t-watch"))
    seen = {tuple(e) for e in got["polled"]}
    assert {("a.txt", "create"), ("a.txt", "write"), ("a.txt", "rename"),
            ("b.txt", "remove")} <= seen, got  # fmt: skip
    assert got["again"] == 0 and got["refused"]  # nothing twice; stopped: refused
    streamed = {tuple(e) for e in got["streamed"]}
    assert {("f.txt", "create"), ("f.txt", "write")} <= streamed, got
    assert ("late", "create") not in streamed  # stopped: no event after stop()


def test_a_watch_on_a_node_guards_the_names_it_reports(
    door: ClusterFrontDoor, loop: asyncio.AbstractEventLoop
) -> None:
    """A file named after a sensitive value: the watch's event names it redacted (the
    node's guard, invariant 4), in the polling and the streaming form alike."""
    canary = "moat-canary-" + os.urandom(6).hex()
    sid = create(loop, door, "t-wguard", "container", sensitive=[canary])

    async def scenario() -> tuple[list[str], list[str]]:
        await door.make_dir("t-wguard", sid, "/home/user/g")
        polled = await door.watch_dir("t-wguard", sid, "/home/user/g")
        streamed = await door.watch_dir("t-wguard", sid, "/home/user/g")
        events = streamed.events()
        await door.write_file("t-wguard", sid, f"/home/user/g/{canary}.txt", "x")
        first = await asyncio.wait_for(anext(events), 20)
        await events.aclose()  # type: ignore[attr-defined]  # leaving the stream stops its watch
        names = [e.name for e in await polled.take()]
        await polled.stop()
        return names, [first.name]

    try:
        names, first = run(loop, scenario())
        for got in (names, first):
            assert got and all(canary not in n and "REDACTED" in n for n in got), got
    finally:
        run(loop, door.kill("t-wguard", sid))


def _sbx_groups(pid: int) -> set[str]:
    """The sandbox cgroups owned by ``pid`` (the name says its owner), in the pids
    hierarchy (fast enough to poll); elsewhere, every hierarchy."""
    parent = Path("/sys/fs/cgroup/pids/moat")
    if not parent.is_dir():
        return set(cgroups_of(pid))
    return {n for n in os.listdir(parent) if n.startswith("sbx-") and f".{pid}." in n}


def test_a_cancelled_create_leaves_no_sandbox(
    door: ClusterFrontDoor, loop: asyncio.AbstractEventLoop
) -> None:
    """The caller's create is cancelled while its node is starting the sandbox (its cgroup
    exists, the create has not returned): within a bounded time nothing of it is left on any
    node (cgroups, from outside), no node lists it, its bundle and quota are released."""
    import ray

    pids = [int(n.info["pid"]) for n in door.nodes.values()]
    before = {p: _sbx_groups(p) for p in pids}
    pgs = {k for k, g in ray.util.placement_group_table().items() if g["state"] != "REMOVED"}

    def new() -> set[str]:
        return {g for p in pids for g in _sbx_groups(p) - before[p]}

    async def scenario() -> None:
        cfg = door.resolve(isolation="container", timeout=300)
        task = asyncio.ensure_future(door.create("t-cancel", cfg))
        deadline = time.monotonic() + 30
        while not new():  # the node is starting it
            assert not task.done() and time.monotonic() < deadline, task
            await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # let the create's remainder run on this loop (kill on arrival)
            await asyncio.sleep(0.1)
            if not new() and not [p for p in door.placed.values() if p.tenant == "t-cancel"]:
                break

    run(loop, scenario())
    assert new() == set()  # no sandbox cgroup left on any node (invariant 5)
    for node in door.nodes.values():
        assert run(loop, door._call(node, "list_sandboxes", "t-cancel")) == []
    assert [p for p in door.placed.values() if p.tenant == "t-cancel"] == []
    assert door.quota.usage("t-cancel")[0] == 0
    live = {k for k, g in ray.util.placement_group_table().items() if g["state"] != "REMOVED"}
    assert live <= pgs  # its bundle is released


def test_a_pause_without_a_reachable_store_is_refused_and_the_sandbox_runs_on(
    door: ClusterFrontDoor, loop: asyncio.AbstractEventLoop
) -> None:
    """No shared paused store (no --paused-dir), or a node that sees another store: the pause
    is a PolicyError and the sandbox keeps running (invariant 7), nothing written."""
    store = door.paused_store
    assert store is not None
    sid = create(loop, door, "t-nostore", "container")
    try:
        door.paused_store = None
        with pytest.raises(PolicyError, match="needs a paused-sandbox store"):
            run(loop, door.pause("t-nostore", sid))
        door.paused_store = store
        real, store.store_id = store.store_id, "0" * 32  # the nodes read another store's id
        try:
            with pytest.raises(PolicyError, match="can't reach the paused-sandbox store"):
                run(loop, door.pause("t-nostore", sid))
        finally:
            store.store_id = real
        assert run(loop, command(door, "t-nostore", sid, "echo still")) == ("still\n", 0)
        # snapshots and fork are not carried across the cluster: said (501), never a 500
        with pytest.raises(PolicyError, match=r"lacks the capability 'sandboxes\.snapshot'"):
            run(loop, door.create_snapshot("t-nostore", sid))
        with pytest.raises(PolicyError, match=r"lacks the capability 'sandboxes\.fork'"):
            run(loop, door.fork("t-nostore", sid, 2))
        assert run(loop, door.list_snapshots("t-nostore")) == []
        assert not (store.store.root / sid).exists()
    finally:
        door.paused_store = store
        run(loop, door.kill("t-nostore", sid))


def test_node_loss_gives_sandbox_lost_and_leaves_nothing(
    cluster: Cluster, door: ClusterFrontDoor, loop: asyncio.AbstractEventLoop
) -> None:
    """Last in the module: it kills a node. SIGKILL its raylet (by pid): the next call for
    its sandboxes raises SandboxLostError within 5 s, never a re-creation; the bundles are
    released; no process or cgroup of its sandboxes is left; the other node keeps serving."""
    import ray

    made: dict[str, str] = {}
    for _ in range(4):  # one sandbox on each node
        sid = create(loop, door, "t-loss", "container")
        made.setdefault(node_name(cluster, door, "t-loss", sid), sid)
        if len(made) == 2:
            break
    assert len(made) == 2
    victim, survivor = made["a"], made["b"]
    run(loop, command(door, "t-loss", victim, "sleep 600 >/dev/null 2>&1 &"))
    actor_pid = door.node_of("t-loss", victim)["pid"]
    procs = descendants(actor_pid)
    assert procs  # the victim's sandbox runs under the node's actor
    pg = door.placed[victim].pg.id.hex()

    killed_at = kill_raylet(cluster.nodes["a"])
    while True:
        try:
            run(loop, door.list_commands("t-loss", victim))
        except SandboxLostError as exc:
            assert "was not found" in str(exc)  # the E2B SDKs' 502 shape
            break
        assert time.monotonic() - killed_at < 5
        time.sleep(0.1)
    lost_after = time.monotonic() - killed_at
    assert lost_after < 5
    assert not run(loop, door.is_running("t-loss", victim))
    with pytest.raises(SandboxLostError):
        run(loop, door.info("t-loss", victim))
    # the bundle is released, not rescheduled onto the survivor
    assert ray.util.placement_group_table()[pg]["state"] == "REMOVED"
    # nothing of the node's sandboxes is left (invariant 5), seen from outside
    deadline = time.monotonic() + 10
    while any(alive(p) for p in procs | {actor_pid}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in procs | {actor_pid} if alive(p)]
    cgroups = [
        f"{d}/{n}" for root in Path("/sys/fs/cgroup").glob("*")
        for d, names, _ in os.walk(root) for n in names if f".{actor_pid}." in n
    ]  # fmt: skip
    assert cgroups == []
    # the survivor keeps serving
    assert run(loop, command(door, "t-loss", survivor, "echo alive")) == ("alive\n", 0)
    run(loop, door.kill("t-loss", survivor))
    print(f"lost after {lost_after:.2f} s")


def cgroups_of(pid: int) -> list[str]:
    """Sandbox cgroups whose owner (in their name) is ``pid``."""
    return [
        f"{d}/{n}" for root in Path("/sys/fs/cgroup").glob("*")
        for d, names, _ in os.walk(root) for n in names if "sbx-" in n and f".{pid}." in n
    ]  # fmt: skip


def test_a_returning_node_sweeps_before_it_advertises(
    cluster: Cluster, door: ClusterFrontDoor, loop: asyncio.AbstractEventLoop
) -> None:
    """A node killed hard (its actor and its raylet at once: no cleanup ran) leaves cgroups;
    the same machine's next ``moat node`` sweeps them before it joins."""
    state = cluster.nodes["a"].state
    cluster.add_node("a2", "container", SLOTS, state=state)
    wait_nodes(2)
    run(loop, door.start(min_nodes=2))
    sid = ""
    # Ray places them (packing first): once "a" and "b" are full, one must land on "a2".
    for _ in range(2 * SLOTS + 1):
        sid = create(loop, door, "t-back", "container")
        if node_name(cluster, door, "t-back", sid) == "a2":
            break
    assert node_name(cluster, door, "t-back", sid) == "a2"
    actor = door.node_of("t-back", sid)["pid"]
    assert cgroups_of(actor)
    os.kill(actor, 9)  # no last kill by the node: what it held stays behind
    kill_raylet(cluster.nodes["a2"])
    with pytest.raises(SandboxLostError):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            run(loop, door.list_commands("t-back", sid))
            time.sleep(0.2)
    left = cgroups_of(actor)
    back = cluster.add_node("a3", "container", SLOTS, state=state)
    deadline = time.monotonic() + 90
    while "joining" not in back.log.read_text():
        assert back.proc.poll() is None and time.monotonic() < deadline, back.log.read_text()
        time.sleep(0.2)
    log = back.log.read_text()
    assert "moat node: swept" in log.split("joining")[0]  # the sweep ran before it joined
    assert [g for g in left if os.path.exists(g)] == []  # the leftovers are gone


def test_a_paused_sandbox_outlives_its_node_and_resumes_on_another(
    cluster: Cluster, door: ClusterFrontDoor, loop: asyncio.AbstractEventLoop
) -> None:
    """Last: pause on node X into the shared store, SIGKILL X's raylet, and connect resumes
    it on the other node under the same id, tenant, metadata and guard, files intact. Kill of
    a paused sandbox deletes its state; another tenant can neither resume nor kill it."""
    import ray

    wait_nodes(2)
    run(loop, door.start(min_nodes=2))
    store = Path(str(cluster.paused_dir))
    t = "t-pause"
    canary = "moat-canary-" + os.urandom(6).hex()
    cfg = door.resolve(isolation="container", timeout=300, metadata={"run": "p1"})
    sid = run(loop, door.create(t, cfg, sensitive=[canary])).sandbox_id
    gone = run(loop, door.create(t, door.resolve(isolation="container", timeout=300)))
    gone_id = gone.sandbox_id
    auto_cfg = door.resolve(isolation="container", timeout=2, on_timeout="pause")
    auto = run(loop, door.create(t, auto_cfg)).sandbox_id
    try:
        run(loop, door.write_file(t, sid, "/home/user/keep.txt", "kept across nodes"))
        x = node_name(cluster, door, t, sid)
        dead = door.node_of(t, sid)["node_id"]
        pg = door.placed[sid].pg.id.hex()
        assert run(loop, door.pause(t, sid)).state == "paused"
        assert (store / sid / "record.json").is_file()  # in the shared store, from outside
        assert ray.util.placement_group_table()[pg]["state"] == "REMOVED"  # bundle released
        assert run(loop, door.info(t, sid)).state == "paused"
        assert not run(loop, door.is_running(t, sid))
        paused = {i.sandbox_id for i in run(loop, door.list_sandboxes(t, state="paused"))}
        assert sid in paused
        assert sid not in {i.sandbox_id for i in run(loop, door.list_sandboxes(t))}  # running
        with pytest.raises(SandboxError, match="already paused"):
            run(loop, door.pause(t, sid))
        # another tenant's id answers like an unknown one (invariant 11)
        with pytest.raises(NotFoundError, match=f"sandbox {sid} was not found"):
            run(loop, door.connect("t-other", sid))
        assert run(loop, door.kill("t-other", sid)) is False
        assert (store / sid).is_dir()
        # kill of a paused sandbox deletes its state
        run(loop, door.pause(t, gone_id))
        assert (store / gone_id).is_dir()
        assert run(loop, door.kill(t, gone_id)) is True
        assert not (store / gone_id).exists()
        assert gone_id not in {i.sandbox_id for i in run(loop, door.list_sandboxes(t, state=None))}

        # one that pauses by itself at its timeout (on its node) is tracked as paused too
        deadline = time.monotonic() + 20
        while auto not in {i.sandbox_id for i in run(loop, door.list_sandboxes(t, state=None))
                           if i.state == "paused"}:  # fmt: skip
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert run(loop, door.info(t, auto)).state == "paused"
        assert auto not in door.placed and (store / auto).is_dir()
        assert auto in {i.sandbox_id for i in run(loop, door.list_sandboxes(t, state="paused"))}
        assert run(loop, door.kill(t, auto)) is True and not (store / auto).exists()

        # X dies while the sandbox is paused: nothing of it is lost
        kill_raylet(cluster.nodes[x])
        deadline = time.monotonic() + 10
        while dead in door.nodes:  # the server sees it lost (the GCS may still offer it: a
            assert time.monotonic() < deadline  # bundle placed there is placed again)
            run(loop, asyncio.sleep(0.1))
        t0 = time.monotonic()
        info, resumed = run(loop, door.connect(t, sid))
        print(f"resumed on the other node in {time.monotonic() - t0:.2f} s")
        assert resumed and info.sandbox_id == sid and info.metadata == {"run": "p1"}
        assert node_name(cluster, door, t, sid) != x  # placed again, on the other node
        assert run(loop, door.read_file(t, sid, "/home/user/keep.txt")) == "kept across nodes"
        out, _ = run(loop, command(door, t, sid, f"echo {canary}"))
        assert canary not in out and "[REDACTED" in out  # the same guard (invariant 4)
        assert not (store / sid).exists()  # deleted once it serves again
        with pytest.raises(NotFoundError):
            run(loop, door.info("t-other", sid))
    finally:
        run(loop, door.kill(t, sid))
    assert not (store / sid).exists()
