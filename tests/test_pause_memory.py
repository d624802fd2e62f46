"""Pause and resume WITH memory through the engine's front door (issue 11): the tiers that
keep processes (gVisor's runsc checkpoint; the microVM's QEMU migration).

Real sandboxes; what a test asserts it checks through a resumed sandbox and from the host
(the paused store's directory). Each tier: a kernel's variables, a file, a background server
answering on its port, egress set up again (the agent's proxy answers, the new gateway's CA is
trusted), randomness reseeded (two resumes of two sandboxes from one seed differ).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from tests.conftest import require_tier
from tests.test_pause import T, _close, _door, _root, _run

from moat.engine.api import FrontDoor
from moat.errors import PolicyError, QuotaExceededError

pytestmark = [pytest.mark.asyncio]

MEMORY_TIERS = ["gvisor", "microvm"]
CYCLES = 25


@pytest_asyncio.fixture
async def door(tmp_path: Path) -> AsyncIterator[FrontDoor]:
    d = _door(tmp_path / "paused")
    yield d
    await _close(d)


async def _create(door: FrontDoor, tier: str) -> str:
    cfg = door.resolve(isolation=tier, timeout=600)
    return (await door.create(T, cfg)).sandbox_id


async def _sh(door: FrontDoor, sid: str, cmd: str) -> str:
    out = await _run(door, sid, f"import subprocess; print(subprocess.run({cmd!r}, "
                     "shell=True, capture_output=True, text=True).stdout, end='')")  # fmt: skip
    return out


@pytest.mark.parametrize("tier", MEMORY_TIERS)
async def test_memory_kept_across_pause_and_resume(door: FrontDoor, tier: str) -> None:
    require_tier(tier)
    sid = await _create(door, tier)
    await _run(door, sid, "import random; x = 41; random.seed(7)")
    await door.write_file(T, sid, "/home/user/keep.txt", "kept")
    await door.write_file(T, sid, "/home/user/www/index.html", "served")
    # http.server watches its socket with poll (see test_epoll_listener_... for epoll)
    await _run(door, sid, "import subprocess; subprocess.Popen(['python3', '-m', 'http.server', "
               "'8123', '-d', '/home/user/www'], stdout=subprocess.DEVNULL, "
               "stderr=subprocess.DEVNULL)")  # fmt: skip
    for _ in range(40):
        if "served" in await _sh(door, sid, "curl -s http://127.0.0.1:8123/index.html"):
            break
        await asyncio.sleep(0.25)
    # Issue 11: 25 consecutive cycles keep the files, the variables, the background server
    # and the egress policy. The cheap checks run every cycle, the server and egress ones
    # every eighth and after the last (each costs a few processes inside).
    for cycle in range(CYCLES):
        info = await door.pause(T, sid, memory=True)
        assert info.state == "paused" and (_root(door) / sid / "record.json").is_file()
        assert door.engine.get(sid) is None
        _, resumed = await door.connect(T, sid)
        assert resumed and not (_root(door) / sid).exists()
        assert await _run(door, sid, "x += 1; print(x)") == f"{42 + cycle}\n"  # memory
        assert await door.read_file(T, sid, "/home/user/keep.txt") == "kept"
        if cycle % 8 and cycle != CYCLES - 1:
            continue
        assert await _sh(door, sid, "curl -s http://127.0.0.1:8123/index.html") == "served"
        # Egress set up again: the agent's proxy answers (a denied host is refused by the
        # new gateway with its 403, not a connection error).
        code = await _sh(door, sid, "curl -s -o /dev/null -w '%{http_code}' "
                         "http://denied.example/")  # fmt: skip
        assert code == "403", (cycle, code)
    # Reseeded: the generator seeded before the pause does not give seed(7)'s first value.
    seeded = await _run(door, sid, "import random as r2; r2.seed(7); print(r2.random())")
    assert await _run(door, sid, "print(random.random())") != seeded


async def test_gvisor_epoll_listener_is_refused_and_keeps_running(door: FrontDoor) -> None:
    """runsc 20221219 cannot save a listening socket an epoll instance watches (and a failed
    save ends the sandbox): such a pause is refused up front, the sandbox left as it was."""
    require_tier("gvisor")
    sid = await _create(door, "gvisor")
    server = (
        "import asyncio, subprocess, textwrap\n"
        "open('/home/user/srv.py', 'w').write(textwrap.dedent('''\n"
        "    import asyncio\n"
        "    async def h(r, w):\n"
        "        w.write(b'HTTP/1.0 200 OK\\\\r\\\\n\\\\r\\\\nhi'); await w.drain(); w.close()\n"
        "    async def main():\n"
        "        s = await asyncio.start_server(h, '127.0.0.1', 8124)\n"
        "        await s.serve_forever()\n"
        "    asyncio.run(main())\n"
        "'''))\n"
        "p = subprocess.Popen(['python3', '/home/user/srv.py'])\n"
        "x = 5\n"
    )
    await _run(door, sid, server)
    await asyncio.sleep(1.5)
    with pytest.raises(PolicyError, match="epoll"):
        await door.pause(T, sid, memory=True)
    assert await door.is_running(T, sid)
    assert await _run(door, sid, "print(x)") == "5\n"
    assert list(_root(door).iterdir()) == []
    # Positive control: without the epoll listener the same sandbox pauses and resumes.
    await _run(door, sid, "p.kill(); p.wait()")
    await door.pause(T, sid, memory=True)
    await door.connect(T, sid)
    assert await _run(door, sid, "print(x)") == "5\n"


@pytest.mark.parametrize("tier", ["container", "gvisor", "microvm"])
async def test_a_templated_sandbox_resumes_on_its_template(door: FrontDoor, tier: str) -> None:
    """Resume builds the spec as create did: the template's root, not the host's /usr (the
    marker exists only in the template; a memory tier would refuse another root)."""
    import secrets

    from tests import template_support

    require_tier(tier)
    content = "marker-" + secrets.token_hex(6)
    found = template_support.install(
        "tt-pause", files={"/usr/share/moat-test/pause-marker.txt": content}
    )
    cfg = door.resolve(isolation=tier, timeout=600, template=found.name)
    sid = (await door.create(T, cfg)).sandbox_id
    probe = "print(open('/usr/share/moat-test/pause-marker.txt').read())"
    assert await _run(door, sid, probe) == content + "\n"
    await door.pause(T, sid, memory=tier != "container")
    await door.connect(T, sid)
    assert await _run(door, sid, probe) == content + "\n"
    assert (await door.info(T, sid)).template == found.name


async def test_gvisor_files_pause_is_capped_on_the_host(
    door: FrontDoor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A files-only pause streams the sandbox's tar through a host-side counter: whatever the
    sandbox makes of its files (sparse ones pass the tmpfs limit), at most the cap reaches the
    host's disk; past it the pause is refused and the sandbox runs on."""
    require_tier("gvisor")
    sid = await _create(door, "gvisor")
    await _sh(door, sid, "head -c 3000000 /dev/urandom > /home/user/blob; "
              "for i in 1 2 3; do truncate -s 50M /home/user/sparse$i; done")  # fmt: skip
    monkeypatch.setenv("MOAT_CHECKPOINT_MAX_MB", "2")
    with pytest.raises(QuotaExceededError, match="cap"):
        await door.pause(T, sid, memory=False)
    assert await door.is_running(T, sid)
    assert list(_root(door).iterdir()) == []
    # Positive control: what fits under the cap pauses (the same sandbox, files trimmed).
    monkeypatch.setenv("MOAT_CHECKPOINT_MAX_MB", "64")
    await _sh(door, sid, "rm /home/user/blob /home/user/sparse1 /home/user/sparse2; "
              "truncate -s 10M /home/user/sparse3")  # fmt: skip
    await door.pause(T, sid, memory=False)
    await door.connect(T, sid)
    assert "sparse3" in await _sh(door, sid, "ls /home/user")


@pytest.mark.parametrize("tier", MEMORY_TIERS)
@pytest.mark.parametrize("memory", [True, False])
async def test_snapshot_quota_refuses_and_the_sandbox_keeps_running(
    tmp_path: Path, tier: str, memory: bool
) -> None:
    """Over the tenant's snapshot quota, a pause is refused BEFORE the tier stops the
    sandbox (a memory checkpoint stops it first): it keeps running, nothing is on disk."""
    require_tier(tier)
    d = _door(tmp_path / "paused", f"version = 1\n[tenants.{T}]\nquotas = {{ snapshot_mb = 1 }}\n")
    try:
        cfg = d.resolve(isolation=tier, timeout=600)
        sid = (await d.create(T, cfg)).sandbox_id
        await _run(d, sid, "import os; x = 7; open('/home/user/big','wb').write(os.urandom(3<<20))")
        with pytest.raises(QuotaExceededError, match=r"quota|cap"):
            await d.pause(T, sid, memory=memory)
        assert await d.is_running(T, sid)
        assert await _run(d, sid, "print(x)") == "7\n"  # the same processes, answering
        assert list((tmp_path / "paused").iterdir()) == []
    finally:
        await _close(d)


@pytest.mark.parametrize("tier", MEMORY_TIERS)
async def test_a_restored_process_keeps_working_placeholders(door: FrontDoor, tier: str) -> None:
    """A process restored with its memory holds its secret's placeholder (and may have
    loaded the CA): the new gateway takes both over, so the placeholder it holds is still
    the one swapped for the value (checked on the host's gateway)."""
    from moat.egress import Secret

    require_tier(tier)
    cfg = door.resolve(
        isolation=tier,
        timeout=600,
        network={"allow_out": ["api.example.com"]},
        secrets={"API_KEY": Secret("s3cr3t-value-memory", ["api.example.com"])},
    )
    sid = (await door.create(T, cfg, secrets={"API_KEY": "s3cr3t-value-memory"})).sandbox_id
    held = (await _run(door, sid, "import os; ph = os.environ['API_KEY']; print(ph)")).strip()
    ca = door.engine.get(sid).gateway.ca_cert_pem()  # type: ignore[union-attr]
    await door.pause(T, sid, memory=True)
    await door.connect(T, sid)
    assert (await _run(door, sid, "print(ph)")).strip() == held  # its memory
    gateway = door.engine.get(sid).gateway  # type: ignore[union-attr]
    assert gateway is not None
    assert gateway.placeholders() == {"API_KEY": held}
    assert gateway.ca_cert_pem() == ca
