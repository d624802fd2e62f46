"""``moat serve``'s process and filesystem services (Connect RPC) under the unmodified ``e2b``
SDK, and on the raw wire (envelopes, keepalives, errors, tenant separation).

A real server process on 127.0.0.1 with real container sandboxes; what a test asserts about
a sandbox it checks from outside it (a file that must not exist, a process list).
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException, TimeoutException
from e2b.sandbox.commands.command_handle import CommandExitException
from e2b.sandbox.filesystem.filesystem import FileType
from tests.server_support import Server, new_key, tenant_name

pytestmark = [pytest.mark.container, pytest.mark.slow]


@pytest.fixture(scope="module")
def sbx(key_a: str) -> Iterator[Sandbox]:
    s = Sandbox.create(api_key=key_a, timeout=300)
    yield s
    s.kill()


def _headers(s: Sandbox, token: str | None = None) -> dict[str, str]:
    return {
        "E2b-Sandbox-Id": s.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": token if token is not None else str(s._envd_access_token),
        "Connect-Protocol-Version": "1",
    }


def _envelope(msg: Any, flags: int = 0) -> bytes:
    body = json.dumps(msg).encode()
    return struct.pack(">BI", flags, len(body)) + body


def _frames(raw: bytes) -> list[tuple[int, Any]]:
    out = []
    while raw:
        flags, n = struct.unpack(">BI", raw[:5])
        out.append((flags, json.loads(raw[5 : 5 + n])))
        raw = raw[5 + n :]
    return out


def _start(server: Server, s: Sandbox, cmd: str, **headers: str) -> list[Any]:
    """A raw ``process.Process/Start`` stream: its events, its end-of-stream trailer last."""
    r = httpx.post(
        server.url + "/process.Process/Start",
        content=_envelope({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd]}}),
        headers={**_headers(s), "Content-Type": "application/connect+json", **headers},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    frames = _frames(r.content)
    assert [f for f, _ in frames[:-1]] == [0] * (len(frames) - 1)
    assert frames[-1][0] == 0x02  # end of stream
    return [m for _, m in frames]


# -- commands through the SDK ---------------------------------------------------------------


def test_foreground_output_exit_code_cwd_envs(sbx: Sandbox) -> None:
    r = sbx.commands.run("echo out; echo err >&2; pwd; echo $GREETING")
    assert (r.exit_code, r.stderr) == (0, "err\n")
    assert r.stdout == "out\n/home/user\n\n"
    r = sbx.commands.run("pwd; echo $GREETING", cwd="/tmp", envs={"GREETING": "hello"})
    assert r.stdout == "/tmp\nhello\n"
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("echo bad >&2; exit 3")
    assert info.value.exit_code == 3
    assert info.value.stderr == "bad\n"


def test_background_wait_list_kill(sbx: Sandbox) -> None:
    h = sbx.commands.run("echo started; sleep 0.5; echo done", background=True)
    assert h.wait().stdout == "started\ndone\n"
    h = sbx.commands.run("sleep 120", background=True)
    listed = {p.pid: p for p in sbx.commands.list()}
    assert h.pid in listed
    assert listed[h.pid].args == ["-l", "-c", "sleep 120"]
    assert sbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException):
        h.wait()
    assert h.pid not in {p.pid for p in sbx.commands.list()}  # checked from the host
    assert sbx.commands.kill(h.pid) is False  # gone: NOT_FOUND -> False
    assert sbx.commands.kill(999_999) is False


def test_stdin_send_and_close(sbx: Sandbox) -> None:
    h = sbx.commands.run("cat; echo eof", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "hello\n")
    sbx.commands.send_stdin(h.pid, b"bytes\n")
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout == "hello\nbytes\neof\n"


def test_connect_reattaches_to_a_running_command(sbx: Sandbox) -> None:
    h = sbx.commands.run(
        "for i in 1 2 3 4 5 6; do echo line$i; sleep 0.4; done; exit 4", background=True
    )
    time.sleep(0.6)
    h.disconnect()  # detaching leaves the command running
    again = sbx.commands.connect(h.pid)
    with pytest.raises(CommandExitException) as info:
        again.wait()
    assert info.value.exit_code == 4
    assert "line6\n" in info.value.stdout  # live output after re-attaching
    with pytest.raises(SandboxException):  # ended: nothing to re-attach to
        sbx.commands.connect(h.pid).wait()


def test_timeout_kills_the_command(sbx: Sandbox) -> None:
    sbx.commands.run("rm -f /home/user/late")
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 3; touch /home/user/late", timeout=1)
    time.sleep(3.5)
    # Had the command survived its deadline, it would have made the file by now.
    assert not sbx.files.exists("/home/user/late")
    assert "sleep 3" not in " ".join(" ".join(p.args) for p in sbx.commands.list())


def test_root_runs_as_root_not_downgraded(sbx: Sandbox) -> None:
    # The container tier's root is uid 0 of the sandbox's own user namespace (docs/users.md;
    # tests/test_users_container.py checks its containment): a root call runs as root,
    # never quietly as the user (invariants 7 and 9).
    sbx.commands.run("touch /home/user/as-root", user="root")
    assert sbx.files.make_dir("/home/user/root-dir", user="root")
    owners = sbx.commands.run("stat -c %u /home/user/as-root /home/user/root-dir").stdout
    assert owners == "0\n0\n"
    assert sbx.commands.run("whoami", user="user").stdout == "user\n"


# -- files through the SDK ------------------------------------------------------------------


def test_files_rpc(sbx: Sandbox) -> None:
    sbx.files.write("proj/a.txt", "alpha")
    assert sbx.files.read("proj/a.txt") == "alpha"
    assert sbx.files.exists("proj/a.txt") and not sbx.files.exists("proj/none")
    info = sbx.files.get_info("proj/a.txt")
    assert (info.name, info.path, info.type, info.size) == (
        "a.txt", "/home/user/proj/a.txt", FileType.FILE, 5,
    )  # fmt: skip
    assert info.permissions.startswith("-rw")
    assert sbx.files.make_dir("proj/sub") is True
    assert sbx.files.make_dir("proj/sub") is False  # ALREADY_EXISTS -> False
    sbx.files.write("proj/sub/deep.txt", "d")
    assert {e.name for e in sbx.files.list("proj")} == {"a.txt", "sub"}
    assert {e.name for e in sbx.files.list("proj", depth=2)} == {"a.txt", "sub", "deep.txt"}
    moved = sbx.files.rename("proj/a.txt", "proj/b.txt")
    assert moved.path == "/home/user/proj/b.txt"
    assert sbx.files.read("proj/b.txt") == "alpha" and not sbx.files.exists("proj/a.txt")
    sbx.files.remove("proj/b.txt")
    assert not sbx.files.exists("proj/b.txt")
    with pytest.raises(SandboxException):
        sbx.files.get_info("proj/b.txt")
    # Checked from outside the file API too.
    assert sbx.commands.run("ls /home/user/proj").stdout == "sub\n"


def test_remove_missing_and_symlink_info(sbx: Sandbox) -> None:
    sbx.files.remove("never-there.txt")  # like rm -rf (E2B), no error
    sbx.files.write("links/t.txt", "target")
    sbx.commands.run("ln -sfn t.txt links/l1; ln -sfn l1 links/l2; ln -sfn gone links/dead")
    for name in ("l1", "l2"):
        info = sbx.files.get_info(f"links/{name}")
        assert (info.type, info.symlink_target) == (FileType.FILE, "/home/user/links/t.txt")
    dead = sbx.files.get_info("links/dead")
    assert dead.symlink_target == "gone"
    assert {e.name: e.type for e in sbx.files.list("links")}["l2"] == FileType.FILE


def test_sandbox_killed_under_a_stream_drops_it(key_a: str) -> None:
    s = Sandbox.create(api_key=key_a, timeout=120)
    h = s.commands.run("sleep 60", background=True)
    s.kill()
    # The stream drops; the SDK's health probe then finds the sandbox gone and says so.
    with pytest.raises(TimeoutException, match="killed or reached its end of life"):
        h.wait()


def test_killed_sandbox_drops_the_raw_stream(server: Server, key_a: str) -> None:
    # e2b 2.45 probes /health only on a transport failure, so the stream must not end
    # cleanly (E2B-WIRE.md §2b): the chunked body is cut short and the connection reset
    # (pyqwest reads a body that merely stops as a protocol error, not a transport failure).
    s = Sandbox.create(api_key=key_a, timeout=120)
    body = _envelope({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "sleep 60"]}})
    headers = {**_headers(s), "Content-Type": "application/connect+json"}
    with httpx.Client(timeout=30) as client:
        with client.stream(
            "POST", server.url + "/process.Process/Start", content=body, headers=headers
        ) as r:
            chunks = r.iter_raw()
            first = next(chunks)
            assert _frames(first)[0][1]["event"]["start"]["pid"] > 0
            s.kill()
            with pytest.raises(httpx.ReadError) as got:
                for _ in chunks:
                    pass
            assert "reset" in str(got.value).lower()


# -- the raw wire ---------------------------------------------------------------------------


def test_start_stream_shape_keepalive_and_trailer(server: Server, sbx: Sandbox) -> None:
    events = _start(server, sbx, "sleep 2.5; echo hi", **{"Keepalive-Ping-Interval": "1"})
    trailer, events = events[-1], [e["event"] for e in events[:-1]]
    assert trailer == {}
    assert isinstance(events[0], dict) and set(events[0]) == {"start"}  # first: start{pid}
    kinds = [next(iter(e)) for e in events if isinstance(e, dict)]
    assert kinds.count("keepalive") >= 1
    data = [e["data"] for e in events if isinstance(e, dict) and "data" in e]
    assert [base64.b64decode(d["stdout"]) for d in data] == [b"hi\n"]
    assert events[-1] == {"end": {"exited": True, "status": "exit status 0"}}


def test_stream_input_and_tags_on_the_raw_wire(server: Server, sbx: Sandbox) -> None:
    # Python 2.63's client stream: start{process}, then data{input} (and keepalives).
    with httpx.Client(timeout=30) as client:
        start = {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "cat"]}, "tag": "cat-1",
                 "stdin": True}  # fmt: skip
        with client.stream(
            "POST", server.url + "/process.Process/Start", content=_envelope(start),
            headers={**_headers(sbx), "Content-Type": "application/connect+json"},
        ) as r:  # fmt: skip
            chunks = r.iter_raw()
            pid = _frames(next(chunks))[0][1]["event"]["start"]["pid"]
            listed = httpx.post(
                server.url + "/process.Process/List", json={},
                headers={**_headers(sbx), "Content-Type": "application/json"},
            ).json()["processes"]  # fmt: skip
            assert {"pid": pid, "tag": "cat-1"}.items() <= next(
                p for p in listed if p["pid"] == pid
            ).items()
            data = base64.b64encode(b"via stream\n").decode()
            body = b"".join([
                _envelope({"start": {"process": {"tag": "cat-1"}}}),
                _envelope({"keepalive": {}}),
                _envelope({"data": {"input": {"stdin": data}}}),
            ])  # fmt: skip
            reply = httpx.post(
                server.url + "/process.Process/StreamInput", content=body,
                headers={**_headers(sbx), "Content-Type": "application/connect+json"},
            )  # fmt: skip
            assert reply.status_code == 200 and _frames(reply.content)[-1] == (0x02, {})
            closed = httpx.post(
                server.url + "/process.Process/CloseStdin", json={"process": {"pid": pid}},
                headers={**_headers(sbx), "Content-Type": "application/json"},
            )  # fmt: skip
            assert closed.status_code == 200
            frames = _frames(b"".join(chunks))
    events = [m["event"] for _, m in frames[:-1]]
    out = b"".join(base64.b64decode(e["data"]["stdout"]) for e in events if "data" in e)
    assert out == b"via stream\n"
    assert events[-1]["end"]["status"] == "exit status 0"


def test_connect_timeout_header_ends_with_deadline_exceeded(server: Server, sbx: Sandbox) -> None:
    events = _start(server, sbx, "sleep 30", **{"Connect-Timeout-Ms": "700"})
    assert events[-1]["error"]["code"] == "deadline_exceeded"
    assert "sleep 30" not in " ".join(" ".join(p.args) for p in sbx.commands.list())


def test_connect_deadline_detaches_without_killing(sbx: Sandbox) -> None:
    h = sbx.commands.run("sleep 1.5; echo finished", background=True, timeout=0)
    with pytest.raises(TimeoutException):
        sbx.commands.connect(h.pid, timeout=0.5).wait()
    assert h.wait().stdout == "finished\n"  # the Start stream still owns it


def test_unary_errors_and_bad_input(server: Server, sbx: Sandbox) -> None:
    url = server.url + "/process.Process/SendSignal"
    h = {**_headers(sbx), "Content-Type": "application/json"}
    r = httpx.post(url, json={"process": {"pid": 999999}, "signal": "SIGNAL_SIGKILL"}, headers=h)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = httpx.post(url, content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = httpx.post(server.url + "/filesystem.Filesystem/Nope", json={}, headers=h)
    assert r.status_code == 404
    bad = httpx.post(
        server.url + "/process.Process/Start",
        content=b"\x00\x7f\xff\xff\xffjunk",  # an envelope announcing 2 GiB
        headers={**_headers(sbx), "Content-Type": "application/connect+json"},
    )
    assert _frames(bad.content)[-1][1]["error"]["code"] in (
        "resource_exhausted", "invalid_argument",
    )  # fmt: skip
    assert server.healthy() and sbx.commands.run("echo ok").stdout == "ok\n"


def test_tenant_separation(server: Server, sbx: Sandbox) -> None:
    sbx.files.write("/home/user/canary.txt", "CANARY-A")
    key_b = new_key(tenant_name("mallory"))
    other = Sandbox.create(api_key=key_b, timeout=120)
    try:
        token_b = str(other._envd_access_token)
        calls = [
            ("/filesystem.Filesystem/Stat", {"path": "/home/user/canary.txt"}),
            ("/filesystem.Filesystem/Remove", {"path": "/home/user/canary.txt"}),
            ("/process.Process/List", {}),
            ("/process.Process/SendSignal", {"process": {"pid": 1}, "signal": "SIGNAL_SIGKILL"}),
        ]
        for path, body in calls:
            h = {**_headers(sbx, token_b), "Content-Type": "application/json"}
            r = httpx.post(server.url + path, json=body, headers=h)  # B's token, A's id
            assert r.status_code == 502 and "was not found" in r.text, (path, r.text)
            assert "CANARY" not in r.text
        events = _start_raw(server, sbx, token_b, "touch /home/user/pwned")
        assert events.status_code == 502 and "was not found" in events.text
        # Positive control: A's own token reaches the same calls.
        h = {**_headers(sbx), "Content-Type": "application/json"}
        ok = httpx.post(server.url + calls[0][0], json=calls[0][1], headers=h)
        assert ok.status_code == 200 and ok.json()["entry"]["size"] == "8"
        assert sbx.files.read("/home/user/canary.txt") == "CANARY-A"
        assert not sbx.files.exists("/home/user/pwned")
    finally:
        other.kill()


def _start_raw(server: Server, s: Sandbox, token: str, cmd: str) -> httpx.Response:
    return httpx.post(
        server.url + "/process.Process/Start",
        content=_envelope({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd]}}),
        headers={**_headers(s, token), "Content-Type": "application/connect+json"},
        timeout=30,
    )
