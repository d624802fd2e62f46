"""Just enough of QEMU's monitor protocol (QMP), blocking, over a connected socket.

Trust domain: host engine. QEMU is on the far side; it runs the guest, so its replies are read
with a deadline and a size bound and only the fields moat asks for are used.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

#: Longest QMP line accepted (replies moat asks for are small; events too).
MAX_LINE = 1 << 20


class QMPError(RuntimeError):
    """QEMU answered a command with an error, or the monitor broke."""


class QMP:
    """A QMP client with one deadline for everything it is asked to do."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = b""

    def _line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("QMP timed out")
            if len(self.buf) > MAX_LINE:
                raise QMPError("QMP line too long")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QEMU closed its monitor")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError("bad QMP message")
        return msg

    def greeting(self) -> None:
        if "QMP" not in self._line():
            raise ValueError("no QMP greeting")

    def handshake(self) -> QMP:
        """Read the greeting and leave capabilities negotiation mode."""
        self.greeting()
        self.call("qmp_capabilities")
        return self

    def call(self, command: str, fds: list[int] | None = None, **arguments: Any) -> Any:
        return self.execute(command, arguments, fds)

    def execute(self, command: str, arguments: dict[str, Any], fds: list[int] | None = None) -> Any:
        """Run ``command`` (arguments may have names that are not identifiers)."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode()
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)
        while True:
            reply = self._line()
            if "error" in reply:
                raise QMPError(f"QMP {command}: {reply['error'].get('desc')}")
            if "return" in reply:
                return reply["return"]
            # anything else is an asynchronous event: skip it
