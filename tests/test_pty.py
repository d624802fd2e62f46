"""Terminals (``sbx.pty``) on real sandboxes: the agent's own pseudo-terminal, driven with raw
bytes, guarded output, and kill checked from outside the sandbox.

Most semantics run on the container tier; one full session runs on gVisor and one on the
microVM. What a test asserts about processes it checks from the host's /proc.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.conftest import require_tier

from moat import Sandbox
from moat.errors import CommandExitError, InvalidArgumentError
from moat.model import PtySize
from moat.sdk.pty_sync import PtyHandle


class Screen:
    """What a terminal printed, with a wait for a pattern (the bytes as one buffer)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.chunks: list[bytes] = []
        self._cond = threading.Condition()

    def __call__(self, chunk: bytes) -> None:
        assert isinstance(chunk, bytes)
        with self._cond:
            self.chunks.append(chunk)
            self.data += chunk
            self._cond.notify_all()

    def wait_for(self, needle: bytes, timeout: float = 20, start: int = 0) -> int:
        """Offset just past ``needle``'s first appearance at or after ``start``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (i := self.data.find(needle, start)) < 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{needle!r} not seen; got {bytes(self.data)[-600:]!r}")
                self._cond.wait(left)
            return i + len(needle)


@pytest.fixture
def csbx() -> Iterator[Sandbox]:
    require_tier("container")
    with Sandbox.create(isolation="container", timeout=300) as s:
        yield s


def _shell(sbx: Sandbox, screen: Screen, cols: int = 80, rows: int = 24) -> PtyHandle:
    h = sbx.pty.create(cols, rows, on_data=screen)
    screen.wait_for(b"$ ")  # the login shell's prompt (its profile sets PS1)
    h.send_stdin(b"PS1='PRO''MPT$ '\n")  # typed as is, echoed unlike the prompt itself
    screen.wait_for(b"PROMPT$ ")
    return h


def _session(sbx: Sandbox) -> None:
    """The semantics every tier must show: size, resize, Ctrl-C, Ctrl-D."""
    screen = Screen()
    h = _shell(sbx, screen)
    h.send_stdin(b"stty size; tty\n")
    at = screen.wait_for(b"24 80")
    screen.wait_for(b"/dev/pts/", start=at)
    h.resize(132, 43)
    # gVisor once showed the old size to a `stty size` typed right after resize() returned
    # (a CI run; never reproduced alone): ask up to three times before calling it lost.
    for attempt in range(3):
        h.send_stdin(b"stty size\n")
        try:
            at = screen.wait_for(b"43 132", start=at, timeout=5 if attempt < 2 else 20)
            break
        except AssertionError:
            if attempt == 2:
                raise
    # Ctrl-C interrupts the foreground job; the shell survives and answers.
    h.send_stdin(b"sleep 100; echo NOT-INTERRUPTED\n")
    time.sleep(0.5)
    t0 = time.monotonic()
    h.send_stdin(b"\x03")
    h.send_stdin(b"echo $((6*7))-alive\n")
    at = screen.wait_for(b"42-alive", start=at)
    assert time.monotonic() - t0 < 20
    assert b"\nNOT-INTERRUPTED" not in screen.data
    # Ctrl-D at an empty prompt is EOF: the shell ends and wait returns.
    screen.wait_for(b"PROMPT$ ", start=at)
    h.send_stdin(b"\x04")
    result = h.wait()
    assert result.exit_code == 0
    assert h.exit_code == 0


def test_size_resize_ctrl_c_ctrl_d_container(csbx: Sandbox) -> None:
    _session(csbx)


@pytest.mark.gvisor
def test_pty_session_gvisor() -> None:
    require_tier("gvisor")
    with Sandbox.create(isolation="gvisor", timeout=300) as s:
        _session(s)


@pytest.mark.microvm
@pytest.mark.slow
def test_pty_session_microvm() -> None:
    require_tier("microvm")
    with Sandbox.create(isolation="microvm", timeout=300) as s:
        _session(s)


def test_raw_bytes_round_trip(csbx: Sandbox) -> None:
    """Every byte value a program writes reaches on_data unchanged (invalid UTF-8, escape
    sequences, a multi-byte character split across writes), and input bytes arrive as typed."""
    csbx.files.write(
        "/tmp/emit.py",
        "import os, sys, time\n"
        "os.write(1, bytes(range(256)))\n"
        "os.write(1, b'|\\xe2\\x82'); time.sleep(0.3); os.write(1, b'\\xac|')\n"  # a split euro
        "os.write(1, b'\\x1b[31mRED\\x1b[0m\\x1b[2J\\x1b[H')\n",
    )
    screen = Screen()
    h = csbx.pty.create(80, 24, on_data=screen, cmd="stty raw -echo; python3 /tmp/emit.py")
    assert h.wait().exit_code == 0
    data = bytes(screen.data)
    # raw mode: no output processing, so the 256 byte values come back as written
    assert bytes(range(256)) in data
    assert b"|\xe2\x82\xac|" in data
    assert b"\x1b[31mRED\x1b[0m\x1b[2J\x1b[H" in data
    # input: raw bytes (with NUL, 0xff, a lone UTF-8 lead byte) reach the program unchanged
    screen = Screen()
    h = csbx.pty.create(
        80,
        24,
        on_data=screen,
        cmd="stty raw -echo; echo READY; head -c 8 | od -An -tx1",
    )
    screen.wait_for(b"READY")
    h.send_stdin(b"\x00\xff\xe2\x1bA\x7fz\x01")
    assert h.wait().exit_code == 0
    assert b"00 ff e2 1b 41 7f 7a 01" in screen.data


def test_full_screen_program_draws(csbx: Sandbox) -> None:
    """vim takes over the screen (alternate screen, cursor addressing, the size given),
    edits a file, and gives the screen back."""
    screen = Screen()
    h = _shell(csbx, screen, cols=100, rows=30)
    h.send_stdin(b"vim -u NONE -N /tmp/drawn.txt\n")
    at = screen.wait_for(b"\x1b[?1049h")  # the alternate screen
    screen.wait_for(b'"/tmp/drawn.txt" [New]', start=at)
    # the status line sits on the last of the 30 rows (cursor addressed there)
    assert b"\x1b[30;1H" in screen.data[at:]
    h.send_stdin(b"ihello from vim\x1b:wq\r")
    at = screen.wait_for(b"\x1b[?1049l", start=at)  # the screen given back
    screen.wait_for(b"PROMPT$ ", start=at)
    assert csbx.files.read("/tmp/drawn.txt") == "hello from vim\n"
    h.kill()


def test_canary_is_redacted_across_chunks(csbx: Sandbox) -> None:
    """A canary printed in a terminal never reaches on_data, also when the program writes it
    in pieces (separate writes, so separate reads of the terminal) and with escape sequences
    around it; the findings are audited."""
    canary = csbx.guard.canary("aws")
    csbx.files.write(
        "/tmp/leak.py",
        "import os, sys, time\n"
        "v = sys.argv[1].encode()\n"
        "os.write(1, b'\\x1b[1mkey=' + v + b'\\x1b[0m\\n')\n"  # one write
        "for i in range(0, len(v), 7):\n"  # pieces: separate writes
        "    os.write(1, v[i:i+7])\n"
        "os.write(1, b'\\nDONE\\n')\n",
    )
    screen = Screen()
    h = _shell(csbx, screen)
    h.send_stdin(f"python3 /tmp/leak.py {canary[:10]}''{canary[10:]}\n")
    screen.wait_for(b"DONE\r\n")
    h.send_stdin(b"exit\n")
    h.wait()
    data = bytes(screen.data)
    assert canary.encode() not in data
    assert canary[4:20].encode() not in data
    assert data.count(b"[REDACTED") >= 2, data[-400:]
    findings = [r for r in csbx.audit() if r["kind"] == "finding"]
    assert sum(r.get("count", 1) for r in findings if r.get("channel") == "pty") >= 2, findings


def _sandbox_pids(marker: str) -> list[int]:
    """Host pids of processes whose command line holds ``marker`` (seen from outside)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline.replace(b"\0", b" ") and state not in ("Z", "X"):
            out.append(int(name))
    return out


def _eventually(check: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_kill_ends_the_whole_session(csbx: Sandbox) -> None:
    """Kill reaches the shell, a foreground job and a background job (each in a process
    group of its own under job control): none is left, checked from the host's /proc."""
    screen = Screen()
    h = _shell(csbx, screen)
    h.send_stdin(b"sleep 4242.71 & sleep 4243.71 &\n")
    screen.wait_for(b"PROMPT$ ", start=screen.wait_for(b"[2]"))
    h.send_stdin(b"sleep 4244.71\n")
    assert _eventually(lambda: len(_sandbox_pids(".71 ")) == 3)
    assert h.kill() is True
    with pytest.raises(CommandExitError):
        h.wait()
    assert _eventually(lambda: not _sandbox_pids(".71 ")), _sandbox_pids(".71 ")
    assert csbx.pty.kill(h.pid) is False
    assert csbx.pty.kill(99999) is False


def test_connect_by_pid_and_disconnect(csbx: Sandbox) -> None:
    first, second = Screen(), Screen()
    h = _shell(csbx, first)
    h.disconnect()
    again = csbx.pty.connect(h.pid, on_data=second)
    again.send_stdin(b"echo re$((1+1))attached\nexit 3\n")
    second.wait_for(b"re2attached")
    with pytest.raises(CommandExitError) as err:
        again.wait()
    assert err.value.exit_code == 3
    assert b"re2attached" not in first.data


def test_env_cwd_and_refusals(csbx: Sandbox) -> None:
    screen = Screen()
    h = csbx.pty.create(
        PtySize(cols=90, rows=20),
        on_data=screen,
        envs={"ABC": "x-123-y"},
        cwd="/tmp",
        cmd='echo "$ABC $PWD $TERM $(id -un) $(tty) [$(ls /dev/pts | tr "\n" " ")]"',
    )
    h.wait()
    # the sandbox's own devpts instance: its one terminal, nothing of the host's (invariant 1)
    assert b"x-123-y /tmp xterm-256color user /dev/pts/0 [0 ptmx ]" in screen.data
    with pytest.raises(InvalidArgumentError):  # root is a name (tests/test_users*.py)
        csbx.pty.create(80, 24, user="admin")
    with pytest.raises(InvalidArgumentError):
        csbx.pty.create(0, 24)
    with pytest.raises(InvalidArgumentError):
        csbx.pty.create(80, 100_000)


def test_timeout_kills_the_terminal(csbx: Sandbox) -> None:
    h = csbx.pty.create(80, 24, timeout=1, cmd="sleep 4245.53")
    assert _eventually(lambda: bool(_sandbox_pids("sleep 4245.53")))
    with pytest.raises(Exception, match="timeout"):
        h.wait()
    assert _eventually(lambda: not _sandbox_pids("sleep 4245.53"))


def test_input_nobody_reads_is_refused_not_buffered(csbx: Sandbox) -> None:
    """A terminal whose program reads nothing: the agent queues at most 1 MiB of input for it
    (then refuses), and the terminal stays usable (it can still be killed)."""
    from moat.errors import SandboxError

    screen = Screen()
    h = csbx.pty.create(80, 24, on_data=screen, cmd="stty raw -echo; echo READY; sleep 60")
    screen.wait_for(b"READY")
    with pytest.raises(SandboxError, match="not reading"):
        h.send_stdin(b"x" * (3 << 20))
    assert h.kill() is True
    assert csbx.commands.run("echo fine").stdout == "fine\n"
