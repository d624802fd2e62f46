"""``sandbox.pty`` of the sync ``Sandbox``: a thin driver of ``moat.sdk.pty`` (see _loop.py)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from moat.model import CommandResult, PtySize
from moat.sdk._loop import loop_thread
from moat.sdk.pty import AsyncPty, AsyncPtyHandle

__all__ = ["Pty", "PtyHandle"]

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return loop_thread().run(coro)


class _Wrap(Protocol):
    def wrap(self, callback: Any) -> Any: ...


class PtyHandle:
    """A running terminal (see ``AsyncPtyHandle``)."""

    def __init__(self, inner: AsyncPtyHandle) -> None:
        self._h = inner
        self.pid = inner.pid

    @property
    def exit_code(self) -> int | None:
        return self._h.exit_code

    def wait(self) -> CommandResult:
        """Wait for the terminal's program to end; CommandExitError on a non-zero exit."""
        return _run(self._h.wait())

    def send_stdin(self, data: str | bytes) -> None:
        _run(self._h.send_stdin(data))

    send_input = send_stdin

    def resize(self, cols: int | PtySize, rows: int | None = None) -> None:
        _run(self._h.resize(cols, rows))

    def kill(self) -> bool:
        return _run(self._h.kill())

    def disconnect(self) -> None:
        _run(self._h.disconnect())


class Pty:
    """``sandbox.pty``; ``on_data`` runs on the sandbox's callback thread, in order."""

    def __init__(self, inner: AsyncPty, callbacks: _Wrap) -> None:
        self._p = inner
        self._cb = callbacks

    def create(
        self,
        cols: int | PtySize = 80,
        rows: int | None = 24,
        on_data: Callable[[bytes], Any] | None = None,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = 60,
        cmd: str | None = None,
    ) -> PtyHandle:
        """Start a terminal; see ``AsyncPty.create``."""
        inner = _run(
            self._p.create(cols, rows, self._cb.wrap(on_data), envs, cwd, user, timeout, cmd)
        )
        return PtyHandle(inner)

    def connect(
        self, pid: int, on_data: Callable[[bytes], Any] | None = None, timeout: float | None = 60
    ) -> PtyHandle:
        return PtyHandle(_run(self._p.connect(pid, self._cb.wrap(on_data), timeout)))

    def send_stdin(self, pid: int, data: str | bytes) -> None:
        _run(self._p.send_stdin(pid, data))

    def resize(self, pid: int, cols: int | PtySize, rows: int | None = None) -> None:
        _run(self._p.resize(pid, cols, rows))

    def kill(self, pid: int) -> bool:
        return _run(self._p.kill(pid))
