"""``moat serve --cluster`` alone (issue 13): a local Ray head that is itself a moat node,
on the host's own network (no private namespace here). Every Ray process it starts listens
on loopback only (Ray's one-machine switch, moat.cluster.launch.keep_ray_on_loopback), read
from /proc outside them; a sandbox runs through it."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from tests.cluster_support import MOAT, descendants
from tests.loopnet import listeners
from tests.server_support import free_port, new_key

pytestmark = [pytest.mark.container, pytest.mark.slow]


def test_a_local_head_keeps_rays_ports_on_loopback(tmp_path: Path) -> None:
    from e2b import Sandbox

    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "MOAT_WARM_POOL": "0", "MOAT_AUDIT_DB": str(tmp_path / "audit.db")}
    env.pop("MOAT_PAUSED_DIR", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the server sets it itself
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*MOAT, "serve", "--host", "127.0.0.1", "--port", str(port), "--tier", "container",
             "--cluster"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        key = new_key("t-local")
        sbx = Sandbox.create(api_key=key, api_url=url, sandbox_url=url, timeout=120)
        try:
            assert sbx.commands.run("echo local").stdout == "local\n"  # a node actor serves
            found = listeners({proc.pid} | descendants(proc.pid))
            names = {e.comm for e in found}
            assert {"gcs_server", "raylet", "ray::NodeActor"} <= names, found
            assert [e for e in found if not e.loopback] == [], found
        finally:
            sbx.kill()
        # positive control: the same reader flags a listener on every interface
        ctl = socket.socket()
        try:
            ctl.bind(("0.0.0.0", 0))
            ctl.listen(1)
            mine = [e for e in listeners([os.getpid()]) if e.port == ctl.getsockname()[1]]
            assert len(mine) == 1 and not mine[0].loopback
        finally:
            ctl.close()
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, log.read_text()[-3000:]
