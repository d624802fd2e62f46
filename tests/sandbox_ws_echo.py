"""A minimal stdlib WebSocket echo server, run INSIDE a sandbox by test_ingress.py.

``python3 sandbox_ws_echo.py PORT``: one client at a time on 127.0.0.1; every text or binary
message comes back prefixed with ``echo:``. Small frames only (the tests send < 64 KiB).
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
import sys

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _handshake(c: socket.socket) -> bool:
    head = b""
    while b"\r\n\r\n" not in head:
        data = c.recv(4096)
        if not data:
            return False  # a probe that only connected
        head += data
    lines = head.split(b"\r\n")
    key = next(ln.split(b":", 1)[1].strip() for ln in lines
               if ln.lower().startswith(b"sec-websocket-key"))  # fmt: skip
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")  # fmt: skip
    return True


def _frame(op: int, payload: bytes) -> bytes:
    size = len(payload)
    length = bytes([size]) if size < 126 else b"\x7e" + struct.pack(">H", size)
    return bytes([0x80 | op]) + length + payload


def _echo(c: socket.socket) -> None:
    buf = b""
    while data := c.recv(65536):
        buf += data
        while len(buf) >= 6:
            op, size, off = buf[0] & 15, buf[1] & 127, 2
            if size == 126:
                size, off = struct.unpack(">H", buf[2:4])[0], 4
            if len(buf) < off + 4 + size:
                break
            mask, body = buf[off : off + 4], buf[off + 4 : off + 4 + size]
            buf = buf[off + 4 + size :]
            body = bytes(b ^ mask[i % 4] for i, b in enumerate(body))
            if op == 8:
                c.sendall(b"\x88\x00")
                return
            c.sendall(_frame(op, b"echo:" + body))


def main() -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", int(sys.argv[1])))
    srv.listen(8)
    while True:
        c, _ = srv.accept()
        with c:
            if _handshake(c):
                _echo(c)


if __name__ == "__main__":
    main()
