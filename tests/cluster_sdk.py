"""The E2B SDK scenarios of tests/test_cluster.py, run in a child process of the test.

Why a child: the cluster tests run in a private network namespace (tests/loopnet.py), which
only the test's main thread and what it starts enter. The SDK's HTTP transport (pyqwest)
keeps worker threads for the whole process, in the namespace of the thread that first used
it: shared with other test modules, they would dial into the wrong namespace. A child started
from the main thread is in the cluster's namespace and takes its transport with it.

``python -m tests.cluster_sdk NAME JSON``: runs scenario NAME with the JSON object's fields as
keyword arguments, asserts inside, prints its result as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ECHO_APP = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Echo(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))[::-1]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
"""
WS_ECHO = (Path(__file__).parent / "sandbox_ws_echo.py").read_text()


def drive(url: str, key: str, paused_dir: str) -> dict[str, Any]:
    """Code, commands, files, then pause and connect through the paused store."""
    from e2b_code_interpreter import Sandbox

    kw: dict[str, Any] = {"api_key": key, "api_url": url, "sandbox_url": url}
    sbx = Sandbox.create(timeout=120, **kw)
    try:
        assert sbx.run_code("6 * 7").text == "42"
        assert sbx.commands.run("echo clustered").stdout == "clustered\n"
        sbx.files.write("/tmp/x.txt", "over the cluster")
        assert sbx.files.read("/tmp/x.txt") == "over the cluster"
        assert sbx.pause() is True
        assert (Path(paused_dir) / sbx.sandbox_id).is_dir()  # from outside the sandbox
        assert sbx.get_info().state.value == "paused"
        back = Sandbox.connect(sbx.sandbox_id, **kw)
        assert back.files.read("/tmp/x.txt") == "over the cluster"
        assert back.commands.run("echo resumed").stdout == "resumed\n"
        assert not (Path(paused_dir) / sbx.sandbox_id).exists()
    finally:
        sbx.kill()
    assert not sbx.is_running()
    return {}


def ingress_app(url: str, key: str) -> dict[str, Any]:
    """A sandbox running an echo app on 8000 and a WebSocket echo on 8765: its names."""
    from e2b import Sandbox

    sbx = Sandbox.create(api_key=key, api_url=url, sandbox_url=url, timeout=300)
    sbx.files.write("/home/user/echo.py", ECHO_APP)
    sbx.commands.run("python3 /home/user/echo.py 8000", background=True)
    sbx.files.write("/home/user/ws_echo.py", WS_ECHO)
    sbx.commands.run("python3 /home/user/ws_echo.py 8765", background=True)
    probe = (
        "import socket; [socket.create_connection(('127.0.0.1', p)).close() for p in (8000, 8765)]"
    )
    for _ in range(100):
        if "up" in sbx.commands.run(f'python3 -c "{probe}" && echo up || true').stdout:
            break
        time.sleep(0.1)
    return {"id": sbx.sandbox_id, "host": sbx.get_host(8000), "closed": sbx.get_host(8009),
            "token": sbx.traffic_access_token}  # fmt: skip


def kill(url: str, key: str, sandbox_id: str) -> dict[str, Any]:
    from e2b import Sandbox

    return {"killed": Sandbox.kill(sandbox_id, api_key=key, api_url=url)}


def watches(url: str, key: str) -> dict[str, Any]:
    """The sync SDK's polling watch and the async SDK's streaming one."""
    from e2b import AsyncSandbox, Sandbox
    from e2b.exceptions import SandboxException

    kw: dict[str, Any] = {"api_key": key, "api_url": url, "sandbox_url": url}
    sbx = Sandbox.create(timeout=300, **kw)
    try:
        sbx.files.make_dir("pw")
        handle = sbx.files.watch_dir("pw")
        sbx.files.write("pw/a.txt", "one")
        sbx.commands.run("cd ~/pw && mv a.txt b.txt && rm b.txt")
        polled = [(e.name, e.type.value) for e in handle.get_new_events()]
        again = handle.get_new_events()
        handle.stop()
        try:
            handle.get_new_events()
            refused = False
        except SandboxException:
            refused = True
    finally:
        sbx.kill()

    async def streamed() -> list[tuple[str, str]]:
        s = await AsyncSandbox.create(timeout=120, **kw)
        try:
            await s.files.make_dir("sw")
            got: list[tuple[str, str]] = []
            seen = asyncio.Event()

            def on_event(e: Any) -> None:
                got.append((e.name, e.type.value))
                if e.type.value == "write" and e.name == "f.txt":
                    seen.set()

            watch = await s.files.watch_dir("sw", on_event)
            await s.files.write("sw/f.txt", "hello")
            await asyncio.wait_for(seen.wait(), 20)
            await watch.stop()  # type: ignore[no-untyped-call]
            await s.commands.run("touch ~/sw/late")
            await asyncio.sleep(0.5)
            return got
        finally:
            await s.kill()

    return {"polled": polled, "again": len(again), "refused": refused,
            "streamed": asyncio.run(streamed())}  # fmt: skip


if __name__ == "__main__":
    scenario: dict[str, Callable[..., Any]] = {
        "drive": drive, "ingress_app": ingress_app, "kill": kill, "watches": watches,
    }  # fmt: skip
    run = scenario[sys.argv[1]]
    print(json.dumps(run(**json.loads(sys.argv[2]))), flush=True)
    # The scenario asserted everything and its result is out. Skip the interpreter's teardown:
    # the SDK's transport (pyqwest, Rust) keeps worker threads that can abort the process
    # while Python finalizes (SIGABRT after a passing scenario, seen once in CI).
    os._exit(0)
