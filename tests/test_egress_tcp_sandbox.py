"""Raw TCP egress end to end through REAL sandboxes on every tier (issue 15).

A real OpenSSH server (Debian's ``openssh-server``) listens on 127.0.0.1, started here; inside
the sandbox the stock ``ssh`` and ``git`` reach it through moat's ``ssh`` wrapper and the
gateway's SOCKS5 endpoint, opened by one ``allow_tcp`` entry. The test name
``ssh.example.test`` maps to 127.0.0.1 through a StaticResolver, which the gateway only dials
with ``unsafe_allow_private_ranges`` (as in test_egress_sandbox.py). Controls: the same
commands without the entry, and on another port, fail; the server's log shows what arrived.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.conftest import TIER_PARAMS, require_tier
from tests.server_support import free_port

from moat import Sandbox
from moat.egress import GatewayConfig, StaticResolver
from moat.errors import CommandExitError

HOST = "ssh.example.test"
SSH_OPTS = "-i /home/user/.ssh/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o ConnectTimeout=20"  # noqa: E501


@dataclass
class Sshd:
    port: int
    key: str  # the client's private key (OpenSSH format)
    repo: Path  # a bare git repository with one commit
    log: Path
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if shutil.which("sshd", path="/usr/sbin") is None:
        pytest.fail("openssh-server is not installed (make install adds it)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True)  # fmt: skip
    (d / "authorized_keys").write_bytes((d / "client.pub").read_bytes())
    work = d / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "README").write_text("cloned over ssh through moat\n")
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@example.test"]
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    repo = d / "repo.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(repo)], check=True)
    port = free_port()
    config = d / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nPidFile none\nLogLevel VERBOSE\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    log = d / "sshd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 10
    while b"Server listening" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("sshd did not start: " + log.read_text()[-2000:])
        time.sleep(0.05)
    yield Sshd(port, (d / "client").read_text(), repo, log, proc)
    proc.terminate()
    proc.wait(10)


def _sandbox(tier: str, sshd: Sshd, allow: list[str]) -> Sandbox:
    sbx = Sandbox.create(
        isolation=tier,
        timeout=300,
        network={"allow_tcp": allow},
        gateway_config=GatewayConfig(
            unsafe_allow_private_ranges=True, resolver=StaticResolver({HOST: ["127.0.0.1"]})
        ),
    )
    sbx.files.write("/home/user/.ssh/id", sshd.key)
    sbx.commands.run("chmod 700 /home/user/.ssh && chmod 600 /home/user/.ssh/id")
    return sbx


@pytest.mark.parametrize("tier", TIER_PARAMS)
def test_ssh_and_git_over_ssh_through_an_allow_tcp_entry(tier: str, sshd: Sshd) -> None:
    require_tier(tier)
    with _sandbox(tier, sshd, [f"{HOST}:{sshd.port}"]) as sbx:
        r = sbx.commands.run(f"ssh {SSH_OPTS} -p {sshd.port} root@{HOST} 'echo $((6*7))'",
                             timeout=120)  # fmt: skip
        assert r.stdout.strip() == "42", r.stderr
        git_ssh = f"ssh {SSH_OPTS}"  # `ssh` on PATH is moat's wrapper
        r = sbx.commands.run(
            f"GIT_SSH_COMMAND='{git_ssh}' git clone -q ssh://root@{HOST}:{sshd.port}{sshd.repo}"
            " /home/user/clone && cat /home/user/clone/README",
            timeout=180,
        )
        assert r.stdout == "cloned over ssh through moat\n", r.stderr
        # Another port on the same host: refused by the gateway, with a clear message.
        with pytest.raises(CommandExitError) as exc:
            sbx.commands.run(f"ssh {SSH_OPTS} -p {sshd.port + 1} root@{HOST} true", timeout=60)
        assert "not allowed by this sandbox's network policy" in exc.value.stderr
        rows = [r for r in sbx.audit() if r.get("kind") == "egress"]
        allowed = [r for r in rows if r["result"] == "allow"]
        assert len(allowed) >= 2 and all(r["reason"].startswith("tcp") for r in allowed)
        assert all(r["port"] == sshd.port and r["resolved_ip"] == "127.0.0.1" for r in allowed)
        assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in allowed)
        assert any(r["reason"] == "tcp_not_allowed" for r in rows if r["result"] == "deny")


def test_without_the_entry_nothing_reaches_sshd(sshd: Sshd) -> None:
    before = sshd.log.read_text().count("Connection from")
    with _sandbox("container", sshd, []) as sbx:
        with pytest.raises(CommandExitError) as exc:
            sbx.commands.run(f"ssh {SSH_OPTS} -p {sshd.port} root@{HOST} true", timeout=60)
        assert "not allowed" in exc.value.stderr
        # A process that ignores the proxy has no route at all.
        r = sbx.run_code(
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {sshd.port}), timeout=5); print('open')\n"
            "except OSError as e:\n"
            "    print('refused', e.errno)\n"
        )
        assert "refused" in r.logs.stdout[0]
    time.sleep(0.5)
    assert sshd.log.read_text().count("Connection from") == before


def test_update_network_cuts_an_open_ssh_session(sshd: Sshd) -> None:
    with _sandbox("container", sshd, [f"{HOST}:{sshd.port}"]) as sbx:
        h = sbx.commands.run(
            f"ssh {SSH_OPTS} -p {sshd.port} root@{HOST} 'echo up; sleep 120'",
            background=True,
        )
        deadline = time.monotonic() + 60
        while "Accepted publickey" not in sshd.log.read_text():
            assert time.monotonic() < deadline, sshd.log.read_text()[-2000:]
            time.sleep(0.2)
        time.sleep(1.0)
        started = time.monotonic()
        sbx.update_network({"allow_tcp": []})
        with pytest.raises(CommandExitError):
            h.wait(timeout=30)
        assert time.monotonic() - started < 20  # cut, not the 120 s sleep ending
        rows = [r for r in sbx.audit() if r.get("kind") == "egress" and r["result"] == "allow"]
        assert any(r["reason"].endswith("closed:policy_updated") for r in rows)


def test_allow_tcp_over_moat_serve(tmp_path: Path) -> None:
    """moat's extension of E2B's ``network`` object: ``allowTcp`` on create and PUT."""
    import httpx
    from tests.server_support import new_key, serving, tenant_name

    with serving(tmp_path / "server.log") as srv:
        key = {"X-API-Key": new_key(tenant_name("tcp"))}
        body = {"templateID": "base", "network": {"allowTcp": ["github.com"]}}
        bad = httpx.post(f"{srv.url}/v2/sandboxes", headers=key, timeout=60, json=body)
        assert bad.status_code == 400 and "explicit port" in bad.json()["message"]
        body = {"templateID": "base", "network": {"allowTcp": ["GitHub.com:22"]}}
        r = httpx.post(f"{srv.url}/v2/sandboxes", headers=key, timeout=60, json=body)
        assert r.status_code == 201, r.text
        sid = r.json()["sandboxID"]
        info = httpx.get(f"{srv.url}/sandboxes/{sid}", headers=key, timeout=30).json()
        assert info["network"]["allowTcp"] == ["github.com:22"]
        put = httpx.put(f"{srv.url}/sandboxes/{sid}/network", headers=key, timeout=30,
                        json={"allowTcp": ["db.example.com:5432"]})  # fmt: skip
        assert put.status_code == 204
        info = httpx.get(f"{srv.url}/sandboxes/{sid}", headers=key, timeout=30).json()
        assert info["network"]["allowTcp"] == ["db.example.com:5432"]
        assert (
            httpx.delete(f"{srv.url}/sandboxes/{sid}", headers=key, timeout=30).status_code == 204
        )
