"""``moat shell``: an interactive shell in a fresh sandbox, in the terminal you type in.

Trust domain: caller. The local terminal goes into raw mode and its keystrokes travel as
bytes to a pseudo-terminal the sandbox's agent allocated inside (``sbx.pty``; no terminal of
the host is passed in: invariant 1); what comes back has passed the guard (invariant 4) and
is written to stdout as is: like ssh, escape sequences reach the local terminal (choose a
terminal that does not answer title queries). Input the terminal queued and nobody read is
dropped on exit, so no reply the sandbox provoked is read by the host's shell. The window's
size follows the local one (SIGWINCH). The sandbox is killed when the shell ends.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import termios
import threading
import tty
from typing import Any

from moat.errors import SandboxError
from moat.model import PtySize

__all__ = ["interactive_shell"]


def _size() -> PtySize:
    cols, rows = shutil.get_terminal_size((80, 24))
    return PtySize(cols=max(cols, 1), rows=max(rows, 1))


def interactive_shell(sbx: Any, cmd: str | None = None) -> int:
    """Run ``cmd`` (default: a login shell) on a PTY of ``sbx``, wired to this terminal; its
    exit code."""
    out = sys.stdout.buffer

    def show(data: bytes) -> None:
        out.write(data)
        out.flush()

    handle = sbx.pty.create(*_astuple(_size()), on_data=show, timeout=0, cmd=cmd)
    stdin = sys.stdin.fileno()
    interactive = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if interactive else None
    done = threading.Event()
    code: list[int] = []

    def waiter() -> None:
        try:
            code.append(handle.wait().exit_code)
        except Exception as exc:  # noqa: BLE001 - a non-zero exit, or the sandbox died
            code.append(getattr(exc, "exit_code", 1))
        finally:
            os.write(wake_w, b"x")
            done.set()

    wake_r, wake_w = os.pipe()
    old_winch = signal.getsignal(signal.SIGWINCH)
    if interactive:
        signal.signal(signal.SIGWINCH, lambda *_: handle.resize(_size()))
    try:
        if interactive:
            tty.setraw(stdin)
        threading.Thread(target=waiter, daemon=True).start()
        while not done.is_set():
            ready, _, _ = select.select([stdin, wake_r], [], [])
            if stdin in ready:
                data = os.read(stdin, 4096)
                if not data:  # stdin closed (not a terminal): end of input
                    if not interactive:
                        _type(handle, b"\x04", done)
                    done.wait()
                    break
                _type(handle, data, done)
    finally:
        if saved is not None:
            # Replies the terminal typed to the sandbox's queries (title, colour, cursor
            # reports) that nobody read must not reach the host's shell as its input.
            termios.tcflush(stdin, termios.TCIFLUSH)
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, old_winch)
        with contextlib.suppress(Exception):
            handle.kill()
        os.close(wake_r)
        os.close(wake_w)
    return code[0] if code else 1


def _type(handle: Any, data: bytes, done: threading.Event) -> None:
    """Send keystrokes; the shell may have ended meanwhile (then they go nowhere)."""
    try:
        handle.send_stdin(data)
    except SandboxError:
        if not done.wait(2):
            raise


def _astuple(size: PtySize) -> tuple[int, int]:
    return size.cols, size.rows
