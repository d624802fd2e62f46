"""Directory watches through ``moat serve`` under the unmodified ``e2b`` SDK: the sync SDK's
polling form (CreateWatcher / GetWatcherEvents / RemoveWatcher) and the async SDK's stream
(WatchDir), on real container sandboxes; unknown and other tenants' watcher ids."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2b import AsyncSandbox, FilesystemEventType, Sandbox
from e2b.exceptions import NotFoundException, SandboxException
from tests.server_support import Server, new_key, tenant_name

pytestmark = [pytest.mark.container, pytest.mark.slow]


@pytest.fixture(scope="module")
def sbx(key_a: str) -> Iterator[Sandbox]:
    s = Sandbox.create(api_key=key_a, timeout=300)
    yield s
    s.kill()


def _kinds(events: list[Any]) -> list[tuple[str, str]]:
    return [(e.name, e.type.value) for e in events]


def test_sync_polling_watch_sees_every_kind(sbx: Sandbox) -> None:
    sbx.files.make_dir("pw")
    handle = sbx.files.watch_dir("pw")
    sbx.files.write("pw/a.txt", "one")
    sbx.commands.run("cd ~/pw && chmod 600 a.txt && mv a.txt b.txt && rm b.txt")
    seen = _kinds(handle.get_new_events())  # no sleep: every event up until the call
    assert ("a.txt", "create") in seen and ("a.txt", "write") in seen
    assert ("a.txt", "chmod") in seen and ("a.txt", "rename") in seen
    assert ("b.txt", "create") in seen and ("b.txt", "remove") in seen
    assert handle.get_new_events() == []  # nothing twice
    handle.stop()
    with pytest.raises(SandboxException):  # stopped: the SDK refuses by itself
        handle.get_new_events()


def test_sync_recursive_watch_follows_new_directories(sbx: Sandbox) -> None:
    sbx.files.make_dir("rw")
    handle = sbx.files.watch_dir("rw", recursive=True)
    sbx.files.make_dir("rw/new/deeper")
    sbx.files.write("rw/new/deeper/f.txt", "x")
    seen = _kinds(handle.get_new_events())
    assert ("new", "create") in seen
    assert ("new/deeper/f.txt", "write") in seen, seen
    handle.stop()


def test_sync_watch_errors(sbx: Sandbox) -> None:
    from e2b import FileNotFoundException

    with pytest.raises(FileNotFoundException):
        sbx.files.watch_dir("no-such-dir")
    sbx.files.write("plain.txt", "x")
    with pytest.raises(SandboxException, match="not a directory"):
        sbx.files.watch_dir("plain.txt")


def _rpc(server: Server, s: Sandbox, method: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{server.url}/filesystem.Filesystem/{method}",
        json=body,
        headers={
            "E2b-Sandbox-Id": s.sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": str(s._envd_access_token),
            "Connect-Protocol-Version": "1",
        },
        timeout=30,
    )


def test_watcher_ids_are_the_sandboxs_own(server: Server, sbx: Sandbox) -> None:
    other = Sandbox.create(api_key=new_key(tenant_name("bob")), timeout=120)
    try:
        r = _rpc(server, sbx, "CreateWatcher", {"path": "/home/user"})
        assert r.status_code == 200, r.text
        wid = r.json()["watcherId"]
        assert _rpc(server, sbx, "GetWatcherEvents", {"watcherId": wid}).status_code == 200
        # Another tenant's sandbox can't read or remove it: unknown, like a made-up id.
        for who, ident in ((other, wid), (sbx, "0123456789abcdef")):
            for method in ("GetWatcherEvents", "RemoveWatcher"):
                r = _rpc(server, who, method, {"watcherId": ident})
                assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
        assert _rpc(server, sbx, "RemoveWatcher", {"watcherId": wid}).status_code == 200
        r = _rpc(server, sbx, "GetWatcherEvents", {"watcherId": wid})
        assert r.status_code == 404
    finally:
        other.kill()


def test_watcher_cap_is_a_clear_error(server: Server, sbx: Sandbox) -> None:
    ids = []
    try:
        for _ in range(16):
            r = _rpc(server, sbx, "CreateWatcher", {"path": "/home/user"})
            assert r.status_code == 200, r.text
            ids.append(r.json()["watcherId"])
        r = _rpc(server, sbx, "CreateWatcher", {"path": "/home/user"})
        assert r.json()["code"] == "resource_exhausted", r.text
        assert "too many" in r.json()["message"]
    finally:
        for wid in ids:
            _rpc(server, sbx, "RemoveWatcher", {"watcherId": wid})
    # Removing them freed their places (and the agent's inotify instances).
    r = _rpc(server, sbx, "CreateWatcher", {"path": "/home/user"})
    assert r.status_code == 200, r.text
    _rpc(server, sbx, "RemoveWatcher", {"watcherId": r.json()["watcherId"]})


def test_async_streaming_watch(key_a: str) -> None:
    async def main() -> None:
        s = await AsyncSandbox.create(api_key=key_a, timeout=120)
        try:
            await s.files.make_dir("sw")
            got: list[tuple[str, str]] = []
            seen = asyncio.Event()
            exits: list[Any] = []

            def on_event(e: Any) -> None:
                got.append((e.name, e.type.value))
                if e.type == FilesystemEventType.WRITE and e.name == "f.txt":
                    seen.set()

            handle = await s.files.watch_dir("sw", on_event, on_exit=exits.append)
            await s.files.write("sw/f.txt", "hello")
            await asyncio.wait_for(seen.wait(), 20)
            assert ("f.txt", "create") in got
            await handle.stop()  # type: ignore[no-untyped-call]
            await s.commands.run("touch ~/sw/late")
            await asyncio.sleep(0.5)
            assert ("late", "create") not in got  # stopped: no event after stop()
        finally:
            await s.kill()

    asyncio.run(main())


def test_a_killed_sandbox_ends_the_stream(key_a: str) -> None:
    async def main() -> None:
        s = await AsyncSandbox.create(api_key=key_a, timeout=120)
        ended = asyncio.Event()
        errors: list[Any] = []

        def on_exit(err: Any) -> None:
            errors.append(err)
            ended.set()

        await s.files.watch_dir("/home/user", lambda e: None, on_exit=on_exit)
        await s.kill()
        await asyncio.wait_for(ended.wait(), 30)
        assert errors and errors[0] is not None  # an error, not a clean end

    asyncio.run(main())


def _watch_stream(
    server: Server, s: Sandbox, body: dict[str, Any], want: int, **headers: str
) -> list[tuple[int, Any]]:
    """A raw WatchDir stream's first ``want`` envelopes (flags, message), 15 s at most."""
    raw = json.dumps(body).encode()
    frames: list[tuple[int, Any]] = []
    t0 = time.monotonic()
    with httpx.stream(
        "POST",
        server.url + "/filesystem.Filesystem/WatchDir",
        content=struct.pack(">BI", 0, len(raw)) + raw,
        headers={
            "E2b-Sandbox-Id": s.sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": str(s._envd_access_token),
            "Connect-Protocol-Version": "1",
            "Content-Type": "application/connect+json",
            **headers,
        },
        timeout=30,
    ) as r:
        buf = b""
        for chunk in r.iter_raw():
            buf += chunk
            while len(buf) >= 5:
                flags, n = struct.unpack(">BI", buf[:5])
                if len(buf) < 5 + n:
                    break
                frames.append((flags, json.loads(buf[5 : 5 + n])))
                buf = buf[5 + n :]
            if len(frames) >= want or time.monotonic() - t0 > 15:
                break
    return frames


def test_watchdir_raw_stream_starts_then_keeps_alive(server: Server, sbx: Sandbox) -> None:
    frames = _watch_stream(
        server, sbx, {"path": "/home/user"}, 3, **{"Keepalive-Ping-Interval": "1"}
    )
    assert frames[0] == (0, {"start": {}})  # proto3 JSON: a oneof's member is a plain key
    assert (0, {"keepalive": {}}) in frames[1:]


def test_watchdir_entries_and_deadline(server: Server, sbx: Sandbox) -> None:
    sbx.files.make_dir("ew")
    sbx.files.write("ew/old", "x")
    t0 = time.monotonic()
    body = {"path": "ew", "includeEntry": True}
    later = threading.Timer(0.5, lambda: sbx.files.write("ew/new.txt", "hello"))
    later.start()
    frames = _watch_stream(server, sbx, body, 10, **{"Connect-Timeout-Ms": "2000"})
    later.join()
    events = [m["filesystem"] for f, m in frames if f == 0 and "filesystem" in m]
    write = next(e for e in events if e["type"] == "EVENT_TYPE_WRITE")
    assert write["name"] == "new.txt"
    assert write["entry"]["path"] == "/home/user/ew/new.txt" and write["entry"]["size"] == "5"
    # The call's timeout ends the stream (an end-of-stream envelope with the error).
    flags, end = frames[-1]
    assert flags == 2 and end["error"]["code"] == "deadline_exceeded", frames[-1]
    assert time.monotonic() - t0 < 10


def test_sdk_maps_unknown_watch_removal(sbx: Sandbox) -> None:
    handle = sbx.files.watch_dir("/home/user")
    handle.stop()
    with pytest.raises((NotFoundException, SandboxException)):
        handle.stop()  # removed already: the server says not_found
