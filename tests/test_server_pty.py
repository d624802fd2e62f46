"""Terminals through ``moat serve`` under the unmodified ``e2b`` SDK (sync and async), and on
the raw wire: Start with ``pty{size}``, ``data.pty``, SendInput/StreamInput with ``pty``
bytes, Update (resize), SendSignal (kill), Connect (re-attach).

A real server process on 127.0.0.1 with real container sandboxes; kill is checked from the
host's /proc.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import AsyncSandbox, Sandbox
from e2b.sandbox.commands.command_handle import CommandExitException, PtySize
from tests.server_support import Server, new_key, tenant_name

pytestmark = [pytest.mark.container, pytest.mark.slow]


@pytest.fixture(scope="module")
def key(server: Server) -> str:
    return new_key(tenant_name("tty"))


@pytest.fixture(scope="module")
def sbx(key: str) -> Iterator[Sandbox]:
    s = Sandbox.create(api_key=key, timeout=300)
    yield s
    s.kill()


class Screen:
    def __init__(self) -> None:
        self.data = bytearray()
        self._cond = threading.Condition()

    def __call__(self, chunk: bytes) -> None:
        assert isinstance(chunk, bytes)
        with self._cond:
            self.data += chunk
            self._cond.notify_all()

    def wait_for(self, needle: bytes, timeout: float = 20, start: int = 0) -> int:
        deadline = time.monotonic() + timeout
        with self._cond:
            while (i := self.data.find(needle, start)) < 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{needle!r} not seen; got {bytes(self.data)[-600:]!r}")
                self._cond.wait(left)
            return i + len(needle)


def _live(marker: bytes) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ")
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state not in ("Z", "X"):
            out.append(int(name))
    return out


def test_create_input_resize_wait(sbx: Sandbox) -> None:
    """E2B's shapes: PtySize(rows, cols), send_stdin, resize, and wait with on_pty."""
    t = sbx.pty.create(PtySize(rows=24, cols=80), envs={"ABC": "e2b-123"}, cwd="/tmp")
    sbx.pty.send_stdin(t.pid, b"stty size; echo $ABC $PWD $TERM\n")
    time.sleep(0.5)
    sbx.pty.resize(t.pid, PtySize(rows=50, cols=120))
    sbx.pty.send_stdin(t.pid, b"stty size; tput cols\nexit\n")
    chunks: list[bytes] = []
    result = t.wait(on_pty=chunks.append)
    assert result.exit_code == 0
    out = b"".join(chunks)
    assert b"24 80\r\n" in out and b"e2b-123 /tmp xterm-256color" in out
    assert b"50 120\r\n" in out and b"120\r\n" in out


def test_ctrl_c_then_ctrl_d(sbx: Sandbox) -> None:
    t = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.send_stdin(t.pid, b"sleep 100\n")
    time.sleep(1)
    sbx.pty.send_stdin(t.pid, b"\x03")
    sbx.pty.send_stdin(t.pid, b"echo $((40+2))-survived\n")
    time.sleep(1)
    sbx.pty.send_stdin(t.pid, b"\x04")
    chunks: list[bytes] = []
    started = time.monotonic()
    assert t.wait(on_pty=chunks.append).exit_code == 0
    assert time.monotonic() - started < 30
    out = b"".join(chunks)
    assert b"^C" in out and b"42-survived" in out


def test_kill_leaves_no_process(sbx: Sandbox) -> None:
    t = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.send_stdin(t.pid, b"sleep 5151.5 & sleep 5152.5\n")
    deadline = time.monotonic() + 10
    while len(_live(b"sleep 515")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_live(b"sleep 515")) == 2
    assert sbx.pty.kill(t.pid)
    with pytest.raises(CommandExitException):
        t.wait()
    deadline = time.monotonic() + 10
    while _live(b"sleep 515") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _live(b"sleep 515")
    assert not sbx.pty.kill(t.pid)
    with pytest.raises(CommandExitException):
        sbx.commands.run(f"kill -0 {t.pid}")


def test_secret_shaped_output_is_redacted(sbx: Sandbox) -> None:
    """An AWS-key-shaped token printed in the terminal (assembled inside, so the typed line
    does not hold it) reaches the SDK as a marker, also written in two pieces."""
    t = sbx.pty.create(PtySize(rows=24, cols=80))
    key = "AKIA" + "Q3EXAMPLE7ZZQ4XW"
    cmd = (
        "a=AKIA; b=Q3EXAMPLE7ZZQ4XW; printf '%s%s\\n' $a $b; "
        "python3 -c \"import os; os.write(1, b'$a'); os.write(1, b'$b\\n')\"; exit\n"
    )
    sbx.pty.send_stdin(t.pid, cmd.encode())
    chunks: list[bytes] = []
    t.wait(on_pty=chunks.append)
    out = b"".join(chunks)
    assert key.encode() not in out
    assert out.count(b"[REDACTED") >= 2, out


def test_async_create_connect(key: str) -> None:
    async def main() -> None:
        s = await AsyncSandbox.create(api_key=key, timeout=120)
        try:
            first: list[bytes] = []
            second: list[bytes] = []
            t = await s.pty.create(PtySize(24, 80), on_data=first.append, envs={"FOO": "bar"})
            await s.pty.send_stdin(t.pid, b"echo X$FOO\n")
            await asyncio.sleep(0.5)
            await t.disconnect()
            again = await s.pty.connect(t.pid, on_data=second.append)
            await s.pty.send_stdin(t.pid, b"echo Y$FOO\nexit\n")
            await again.wait()
            assert again.exit_code == 0 and again.pid == t.pid
            assert b"Xbar" in b"".join(first) and b"Ybar" in b"".join(second)
        finally:
            await s.kill()

    asyncio.run(main())


def _headers(s: Sandbox) -> dict[str, str]:
    return {
        "E2b-Sandbox-Id": s.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": str(s._envd_access_token),
        "Connect-Protocol-Version": "1",
        "Content-Type": "application/json",
    }


def _envelope(msg: Any) -> bytes:
    body = json.dumps(msg).encode()
    return struct.pack(">BI", 0, len(body)) + body


def test_raw_wire_pty_data_stream_input_and_errors(server: Server, sbx: Sandbox) -> None:
    h = _headers(sbx)
    stream_h = {**h, "Content-Type": "application/connect+json"}
    start = {
        "process": {"cmd": "/bin/bash", "args": ["-i", "-l"], "envs": {"PS1": "$ "}},
        "pty": {"size": {"cols": 77, "rows": 11}},
    }
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            server.url + "/process.Process/Start",
            content=_envelope(start),
            headers=stream_h,
        ) as r,
    ):
        chunks = r.iter_raw()
        first = next(chunks)
        _, n = struct.unpack(">BI", first[:5])
        pid = json.loads(first[5 : 5 + n])["event"]["start"]["pid"]
        # input through the client stream, with pty bytes
        body = b"".join(
            [
                _envelope({"start": {"process": {"pid": pid}}}),
                _envelope({"data": {"input": {"pty": base64.b64encode(b"stty size\n").decode()}}}),
            ]
        )
        reply = httpx.post(
            server.url + "/process.Process/StreamInput", content=body, headers=stream_h
        )
        assert reply.status_code == 200
        bad = [
            ({"process": {"pid": pid}}, 400),  # no size
            ({"process": {"pid": pid}, "pty": {"size": {"cols": 0, "rows": 5}}}, 400),
            ({"process": {"pid": pid}, "pty": {"size": {"cols": 99999, "rows": 5}}}, 400),
            ({"process": {"pid": 999999}, "pty": {"size": {"cols": 80, "rows": 5}}}, 404),
        ]
        for msg, status in bad:
            r2 = httpx.post(server.url + "/process.Process/Update", json=msg, headers=h)
            assert r2.status_code == status, (msg, r2.text)
        ok = httpx.post(
            server.url + "/process.Process/SendInput",
            json={"process": {"pid": pid}, "input": {"pty": base64.b64encode(b"exit\n").decode()}},
            headers=h,
        )
        assert ok.status_code == 200, ok.text
        raw = first + b"".join(chunks)
    events = []
    while raw:
        _, n = struct.unpack(">BI", raw[:5])
        events.append(json.loads(raw[5 : 5 + n]))
        raw = raw[5 + n :]
    data = [e["event"]["data"] for e in events[:-1] if "data" in e["event"]]
    assert data and all(set(d) == {"pty"} for d in data)
    out = b"".join(base64.b64decode(d["pty"]) for d in data)
    assert b"11 77\r\n" in out
    assert events[-2]["event"]["end"]["status"] == "exit status 0"
