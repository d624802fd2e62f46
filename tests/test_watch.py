"""Directory watches through the embedded SDK on real sandboxes (issue 10, File watching).

The container tier gets every check; gVisor and the microVM one each (inotify is the
sentry's own in gVisor, the guest kernel's in the microVM). What a test asserts it checks
from outside the sandbox: the events that reached the caller, the inotify instances the
sandbox's host uid holds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import require_tier

from moat import InvalidArgumentError, Mount, NotFoundError, PolicyError, Sandbox
from moat.model import FilesystemEvent
from moat.protocol.watch import MAX_WATCHERS
from moat.testing import session_of


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    require_tier("container")
    with Sandbox.create(isolation="container", timeout=600) as s:
        yield s


def _wait_for(events: list[FilesystemEvent], want: tuple[str, str], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (want not in [(e.name, e.type) for e in events]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert want in [(e.name, e.type) for e in events], events


def _kinds(events: list[FilesystemEvent]) -> list[tuple[str, str]]:
    return [(e.name, e.type) for e in events]


@pytest.mark.container
def test_every_kind_of_event_reaches_the_callback(box: Sandbox) -> None:
    box.files.make_dir("w1")
    got: list[FilesystemEvent] = []
    handle = box.files.watch_dir("w1", got.append)
    box.commands.run("cd ~/w1 && echo a > f && chmod 600 f && mv f g && rm g")
    _wait_for(got, ("g", "remove"))
    assert _kinds(got) == [
        ("f", "create"), ("f", "write"), ("f", "chmod"), ("f", "rename"), ("g", "create"),
        ("g", "remove"),
    ]  # fmt: skip
    handle.stop()


@pytest.mark.container
def test_polling_form_and_entries(box: Sandbox) -> None:
    box.files.make_dir("w2")
    handle = box.files.watch_dir("w2", include_entry=True)
    box.files.write("w2/x.txt", "hello")
    events = handle.get_new_events()  # no wait: every event up until the call
    # An upload is create, chmod, write, as envd's (E2B's clients count them).
    assert _kinds(events) == [("x.txt", "create"), ("x.txt", "chmod"), ("x.txt", "write")]
    entry = events[2].entry
    assert entry is not None and entry.path == "/home/user/w2/x.txt" and entry.size == 5
    box.files.remove("w2/x.txt")
    (removed,) = handle.get_new_events()
    assert (removed.name, removed.type, removed.entry) == ("x.txt", "remove", None)
    handle.stop()


@pytest.mark.container
def test_recursive_watch_follows_a_new_subdirectory(box: Sandbox) -> None:
    box.files.make_dir("w3/old")
    handle = box.files.watch_dir("w3", recursive=True)
    box.commands.run("mkdir -p ~/w3/new/deep && echo 1 > ~/w3/new/deep/f && echo 2 > ~/w3/old/g")
    seen = _kinds(handle.get_new_events())
    assert ("new", "create") in seen and ("old/g", "write") in seen
    assert ("new/deep/f", "create") in seen, seen
    # A directory moved away is no longer watched; one moved in is. (Each step after the
    # watch took in the one before: within one command that is inotify's race.)
    box.commands.run("mv ~/w3/new ~/gone")
    assert ("new", "rename") in _kinds(handle.get_new_events())
    box.commands.run("echo 3 > ~/gone/deep/h && mv ~/gone ~/w3/back")
    seen = _kinds(handle.get_new_events())
    assert ("back", "create") in seen
    assert not [k for k in seen if k[0].endswith("/h") and k[1] == "write"], seen
    box.commands.run("echo 4 > ~/w3/back/deep/i")
    assert ("back/deep/i", "write") in _kinds(handle.get_new_events())
    handle.stop()


@pytest.mark.container
def test_not_recursive_by_default(box: Sandbox) -> None:
    box.files.make_dir("w4/sub")
    handle = box.files.watch_dir("w4")
    box.commands.run("echo 1 > ~/w4/sub/f && echo 2 > ~/w4/top")
    seen = _kinds(handle.get_new_events())
    assert ("top", "write") in seen and not [n for n, _ in seen if n.startswith("sub/")]
    handle.stop()


@pytest.mark.container
def test_errors_are_typed(box: Sandbox) -> None:
    with pytest.raises(NotFoundError):
        box.files.watch_dir("no-such-dir")
    box.files.write("plain", "x")
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        box.files.watch_dir("plain")


def _inotify_fds(uid: int) -> int:
    """inotify instances held by host processes of ``uid`` (the sandbox's own host uid)."""
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
            if int(uids[0]) != uid:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                    n += 1
        except (OSError, StopIteration):
            continue
    return n


@pytest.mark.container
def test_watcher_cap_and_stop_frees_inotify() -> None:
    require_tier("container")
    with Sandbox.create(isolation="container", timeout=120) as s:
        # the agent's host uid: the user's, or in a root-capable sandbox the sandbox's root id
        # (its real uid; bwrap runs as it too: docs/users.md)
        proc = session_of(s).proc
        status = Path(f"/proc/{proc.proc.pid}/status").read_text()  # type: ignore[union-attr]
        uid = int(status.split("Uid:")[1].split()[0])
        base = _inotify_fds(uid)
        handles = [s.files.watch_dir("/home/user") for _ in range(MAX_WATCHERS)]
        assert _inotify_fds(uid) == base + MAX_WATCHERS  # one instance per watch
        with pytest.raises(PolicyError, match="too many directory watches"):
            s.files.watch_dir("/home/user")
        for h in handles:
            h.stop()
        assert _inotify_fds(uid) == base  # stop() closed every instance in the sandbox
        again = s.files.watch_dir("/home/user")  # the places are free again
        again.stop()


@pytest.mark.container
def test_stop_ends_it_and_a_killed_sandbox_ends_the_watch() -> None:
    require_tier("container")
    s = Sandbox.create(isolation="container", timeout=120)
    got: list[FilesystemEvent] = []
    exits: list[Any] = []
    handle = s.files.watch_dir("/home/user", got.append)
    s.files.write("a", "1")
    _wait_for(got, ("a", "write"))
    handle.stop()
    s.files.write("b", "1")
    time.sleep(0.3)
    assert ("b", "create") not in _kinds(got)
    live = s.files.watch_dir("/home/user", got.append, on_exit=exits.append)
    s.kill()
    deadline = time.monotonic() + 10
    while not exits and time.monotonic() < deadline:
        time.sleep(0.02)
    assert exits and isinstance(exits[0], NotFoundError)  # typed: the sandbox was killed
    assert isinstance(live.error, NotFoundError)


@pytest.mark.container
def test_a_slow_consumer_gets_an_overflow_event_not_unbounded_memory(box: Sandbox) -> None:
    box.files.make_dir("w5")
    handle = box.files.watch_dir("w5")  # polling: nobody reads while the flood runs
    box.commands.run("cd ~/w5 && for i in $(seq 3000); do : > f$i; rm f$i; done", timeout=120)
    events = handle.get_new_events()
    assert len(events) <= 4097  # the host's queue: MAX_QUEUED_EVENTS and one marker
    assert events[-1].type == "overflow" and events[-1].name == ""
    assert ("f1", "create") in _kinds(events)  # the first events came through, in order
    box.files.write("w5/after", "x")  # and the watch goes on
    assert ("after", "create") in _kinds(handle.get_new_events())
    handle.stop()


@pytest.mark.container
def test_names_pass_the_guard(box: Sandbox) -> None:
    secret = "sk-live-" + "7f3a9c2e4b1d8f60" * 2
    box.guard.register(secret, "api_key")
    box.files.make_dir("w6")
    handle = box.files.watch_dir("w6")
    box.commands.run(f"touch ~/w6/{secret}.txt")
    events = handle.get_new_events()
    assert events and all(secret not in e.name for e in events), events
    handle.stop()


@pytest.mark.gvisor
def test_gvisor_watch(tmp_path: Any) -> None:
    require_tier("gvisor")
    shared = tmp_path / "rw"
    shared.mkdir()
    shared.chmod(0o777)
    rw = Mount(str(shared), "/mnt/rw", read_only=False)
    with Sandbox.create(isolation="gvisor", timeout=120, mounts=[rw]) as s:
        # A gofer (9p) mount: the sentry's inotify sees the sandbox's own changes there too.
        on_gofer = s.files.watch_dir("/mnt/rw")
        s.commands.run("echo 1 > /mnt/rw/g")
        assert _kinds(on_gofer.get_new_events()) == [("g", "create"), ("g", "write")]
        on_gofer.stop()
        _recursive_in_one_breath(s)


def _recursive_in_one_breath(s: Sandbox) -> None:
    """A recursive watch sees what one command does: files, a new subdirectory's file."""
    s.files.make_dir("w/sub")
    handle = s.files.watch_dir("w", recursive=True)
    s.commands.run("echo 1 > ~/w/f && mkdir ~/w/n && echo 2 > ~/w/n/g && rm ~/w/f")
    seen = _kinds(handle.get_new_events())
    assert [k for k in seen if k[0] == "f"] == [
        ("f", "create"),
        ("f", "write"),
        ("f", "remove"),
    ]
    # n/g was written in the same breath as n was made: seen by the watch of n, or, when
    # that came a moment late, found by its walk (inotify's recursive race: no write then)
    assert ("n", "create") in seen and ("n/g", "create") in seen, seen
    handle.stop()


@pytest.mark.microvm
def test_microvm_watch() -> None:
    require_tier("microvm")
    with Sandbox.create(isolation="microvm", timeout=300) as s:
        _recursive_in_one_breath(s)


@pytest.mark.container
def test_watched_directories_are_capped_per_sandbox() -> None:
    require_tier("container")
    with Sandbox.create(isolation="container", timeout=120) as s:
        s.commands.run("mkdir -p ~/big/d{1..8200} ~/mid/d{1..8000}", timeout=60)
        with pytest.raises(PolicyError, match="too many directories"):
            s.files.watch_dir("big", recursive=True)  # refused at start, nothing half-made
        handle = s.files.watch_dir("mid", recursive=True)  # 8,001 of 8,192
        s.commands.run("mkdir ~/mid/d1/n{1..300} && touch ~/mid/d1/n300/f", timeout=60)
        events = handle.get_new_events()
        # The new directories past the cap can't be watched: said with an overflow event.
        assert any(e.type == "overflow" for e in events)
        assert ("d1/n1", "create") in _kinds(events)
        handle.stop()
        s.commands.run("rm -r ~/mid/d1/n*")
        again = s.files.watch_dir("mid", recursive=True)  # stop() gave its 8,192 back
        again.stop()


@pytest.mark.container
def test_a_directory_made_by_one_call_is_watched_before_the_next(box: Sandbox) -> None:
    # E2B's pattern: make_dir, then write into it at once. The agent lets recursive watches
    # take in pending events before each file operation, so the write is never missed.
    box.files.make_dir("w7")
    handle = box.files.watch_dir("w7", recursive=True)
    for i in range(30):
        box.files.make_dir(f"w7/d{i}/e")
        box.files.write(f"w7/d{i}/e/f", "x")
    seen = _kinds(handle.get_new_events())
    missed = [i for i in range(30) if (f"d{i}/e/f", "write") not in seen]
    assert not missed, seen
    handle.stop()
