"""commands.* and files.* on real container sandboxes."""

from __future__ import annotations

import io
import os
import time

import pytest

from moat import CommandExitError, InvalidArgumentError, NotFoundError, Sandbox, TimeoutError


def test_run_command(shared_sbx: Sandbox) -> None:
    r = shared_sbx.commands.run("echo hello; echo oops >&2")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "hello\n", "oops\n")


def test_nonzero_exit_raises_with_output(shared_sbx: Sandbox) -> None:
    with pytest.raises(CommandExitError) as info:
        shared_sbx.commands.run("echo partial; echo why >&2; exit 7")
    e = info.value
    assert (e.exit_code, e.stdout, e.stderr) == (7, "partial\n", "why\n")


def test_cwd_envs_and_stdin(shared_sbx: Sandbox) -> None:
    r = shared_sbx.commands.run("pwd; echo $FOO", cwd="/tmp", envs={"FOO": "bar"})
    assert r.stdout == "/tmp\nbar\n"
    assert shared_sbx.commands.run("cat | tr a-z A-Z", stdin="shout").stdout == "SHOUT"


def test_stdin_a_command_does_not_read_yet_never_blocks_the_sandbox(shared_sbx: Sandbox) -> None:
    """More input than a pipe holds, for a command that reads it only later: the agent queues
    it (bounded) and keeps serving other calls at once; all of it arrives, in order."""
    h = shared_sbx.commands.run("sleep 3; sha256sum", background=True, stdin=True)
    data = os.urandom(350 << 10).hex()  # 700 KiB of text: far over a pipe's 64 KiB
    t0 = time.monotonic()
    h.send_stdin(data)
    assert shared_sbx.run_code("40 + 2").text == "42"
    assert time.monotonic() - t0 < 2.5  # served while the command still sleeps
    h.send_stdin(b"", eof=True)
    import hashlib

    assert h.wait().stdout.split()[0] == hashlib.sha256(data.encode()).hexdigest()
    # a command that never reads: input past the agent's bound is refused, nothing wedges
    h = shared_sbx.commands.run("sleep 60", background=True, stdin=True)
    with pytest.raises(Exception, match="not reading its input"):
        for _ in range(8):
            h.send_stdin("x" * (256 << 10))
    assert shared_sbx.run_code("1 + 1").text == "2"
    h.kill()


def test_command_streaming_and_timeout(shared_sbx: Sandbox) -> None:
    chunks: list[tuple[float, str]] = []
    shared_sbx.commands.run(
        "echo one; sleep 1; echo two", on_stdout=lambda s: chunks.append((time.monotonic(), s))
    )
    assert [c for _, c in chunks] == ["one\n", "two\n"] and chunks[1][0] - chunks[0][0] > 0.5
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        shared_sbx.commands.run("sleep 30", timeout=1)
    assert time.monotonic() - t0 < 5
    assert all("sleep 30" not in p.cmd for p in shared_sbx.commands.list())


def test_background_command(shared_sbx: Sandbox) -> None:
    h = shared_sbx.commands.run("read line; echo got:$line; sleep 60", background=True, stdin=True)
    assert h.pid > 0
    assert h.pid in [p.pid for p in shared_sbx.commands.list()]
    # code keeps running in the meantime
    assert shared_sbx.run_code("3 * 3").text == "9"
    h.send_stdin("ping\n")
    deadline = time.monotonic() + 5
    while "got:ping" not in h.stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "got:ping" in h.stdout
    assert h.kill()
    with pytest.raises(CommandExitError) as info:
        h.wait(timeout=5)
    assert info.value.exit_code == 137
    assert h.pid not in [p.pid for p in shared_sbx.commands.list()]
    assert shared_sbx.commands.kill(h.pid) is False


def test_background_wait_success(shared_sbx: Sandbox) -> None:
    h = shared_sbx.commands.run("sleep 0.2; echo done", background=True)
    assert h.wait().stdout == "done\n"


def test_files_text_and_bytes(shared_sbx: Sandbox) -> None:
    info = shared_sbx.files.write("notes/a.txt", "héllo\n")
    assert info.path == "/home/user/notes/a.txt" and info.size == len("héllo\n".encode())
    assert shared_sbx.files.read("/home/user/notes/a.txt") == "héllo\n"
    blob = bytes(range(256)) * 1000
    shared_sbx.files.write("/tmp/blob.bin", blob)
    assert shared_sbx.files.read("/tmp/blob.bin", format="bytes") == blob
    assert (
        shared_sbx.run_code("open('/tmp/blob.bin','rb').read() == bytes(range(256)) * 1000").text
        == "True"
    )


def test_big_file_streamed_both_ways(shared_sbx: Sandbox) -> None:
    data = os.urandom(20 * 1024 * 1024)
    shared_sbx.files.write("big.bin", io.BytesIO(data))
    assert shared_sbx.commands.run("wc -c < big.bin").stdout.strip() == str(len(data))
    assert shared_sbx.files.read("big.bin", format="bytes") == data
    shared_sbx.files.remove("big.bin")


def test_read_cap(shared_sbx: Sandbox) -> None:
    shared_sbx.commands.run("truncate -s 70M /tmp/huge")
    with pytest.raises(InvalidArgumentError, match="cap"):
        shared_sbx.files.read("/tmp/huge", format="bytes")
    shared_sbx.files.remove("/tmp/huge")


def test_list_exists_info_remove_mkdir(shared_sbx: Sandbox) -> None:
    assert shared_sbx.files.make_dir("d1/d2") is True
    assert shared_sbx.files.make_dir("d1/d2") is False
    shared_sbx.files.write("d1/f.txt", "x")
    names = {e.name: e for e in shared_sbx.files.list("d1")}
    assert names["d2"].type == "dir" and names["f.txt"].type == "file" and names["f.txt"].size == 1
    deep = {e.path for e in shared_sbx.files.list("d1", depth=2)}
    assert "/home/user/d1/d2" in deep
    assert shared_sbx.files.exists("d1/f.txt") and not shared_sbx.files.exists("d1/nope")
    assert shared_sbx.files.get_info("d1").type == "dir"
    shared_sbx.files.remove("d1")
    assert not shared_sbx.files.exists("d1")
    with pytest.raises(NotFoundError):
        shared_sbx.files.read("d1/f.txt")
    with pytest.raises(NotFoundError):
        shared_sbx.files.remove("d1")


def test_connect_to_a_running_command(shared_sbx: Sandbox) -> None:
    h = shared_sbx.commands.run("echo before; read x; echo after $x", background=True, stdin=True)
    deadline = time.monotonic() + 10
    while "before" not in h.stdout and time.monotonic() < deadline:
        time.sleep(0.02)
    again = shared_sbx.commands.connect(h.pid)
    h.send_stdin("now\n")
    assert again.wait(10).stdout == "after now\n"
    assert h.wait(10).stdout == "before\nafter now\n"
    with pytest.raises(NotFoundError):
        shared_sbx.commands.connect(h.pid)


def test_rename_moves_files_and_directories(shared_sbx: Sandbox) -> None:
    shared_sbx.files.write("mv/a.txt", "moved")
    entry = shared_sbx.files.rename("mv/a.txt", "mv2/sub/b.txt")  # parents are made
    assert (entry.name, entry.path, entry.type) == ("b.txt", "/home/user/mv2/sub/b.txt", "file")
    assert shared_sbx.files.read("mv2/sub/b.txt") == "moved"
    assert not shared_sbx.files.exists("mv/a.txt")
    assert shared_sbx.files.rename("mv2", "mv3").type == "dir"
    assert shared_sbx.files.read("mv3/sub/b.txt") == "moved"
    with pytest.raises(NotFoundError):
        shared_sbx.files.rename("nope", "x")
    shared_sbx.files.remove("mv")
    shared_sbx.files.remove("mv3")


def test_file_errors_are_typed(shared_sbx: Sandbox) -> None:
    with pytest.raises(InvalidArgumentError):
        shared_sbx.files.read("/tmp")  # a directory
    with pytest.raises(InvalidArgumentError):
        shared_sbx.files.read("/dev/zero")  # not a regular file
    with pytest.raises(InvalidArgumentError):
        shared_sbx.files.read("")
    with pytest.raises(InvalidArgumentError):
        shared_sbx.files.read("a\0b")
    with pytest.raises(InvalidArgumentError):
        shared_sbx.files.write("x", 12345)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        shared_sbx.files.read("x", format="yaml")  # type: ignore[arg-type]


def test_coreutils_list_and_stat(shared_sbx: Sandbox) -> None:
    # What agents run first. On gVisor this needs the statx compatibility library
    # (runsc 20221219 refuses coreutils' AT_NO_AUTOMOUNT); see test_gvisor.py for its control.
    shared_sbx.files.write("/tmp/listed.txt", "x")
    r = shared_sbx.commands.run("ls -la /tmp /home/user / && stat -c '%s %n' /tmp/listed.txt")
    assert "listed.txt" in r.stdout and "1 /tmp/listed.txt" in r.stdout
    assert r.stderr == ""
