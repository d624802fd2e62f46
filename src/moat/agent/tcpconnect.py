"""ssh's ProxyCommand inside a sandbox: one raw TCP stream through the egress gateway.

``python3 -I tcpconnect.py HOST PORT PROXY_PORT`` asks the sandbox's proxy port (SOCKS5, by
name: nothing is resolved in here, the gateway decides on the name) for HOST:PORT and then
relays stdin and stdout to it. The gateway opens it only for an ``allow_tcp`` entry (issue
15). Run as a script in isolated mode: stdlib only, imports nothing of moat.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

_REPLIES = {
    0x01: "general failure",
    0x02: "not allowed by this sandbox's network policy (allow_tcp)",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x07: "command not supported",
    0x08: "address type not supported",
}


def _exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise OSError("the proxy closed the connection")
        buf += data
    return buf


def connect(host: str, port: int, proxy_port: int) -> socket.socket:
    """A socket connected to host:port through the SOCKS5 endpoint on 127.0.0.1."""
    name = host.encode("idna")
    if not 0 < len(name) < 256 or not 0 < port < 65536:
        raise OSError("bad destination")
    sock = socket.create_connection(("127.0.0.1", proxy_port))
    sock.sendall(b"\x05\x01\x00")
    if _exact(sock, 2) != b"\x05\x00":
        raise OSError("the proxy refused the SOCKS5 greeting")
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
    head = _exact(sock, 4)
    if head[1] != 0:
        raise OSError(f"{host}:{port}: {_REPLIES.get(head[1], 'refused')}")
    _exact(sock, {1: 4, 4: 16}.get(head[3], 0) + 2)  # the bound address, unused
    return sock


def _pump_in(sock: socket.socket) -> None:
    while data := os.read(0, 65536):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def main(argv: list[str]) -> int:
    if len(argv) != 4 or not argv[2].isdigit() or not argv[3].isdigit():
        print("usage: tcpconnect.py HOST PORT PROXY_PORT", file=sys.stderr)
        return 2
    try:
        sock = connect(argv[1], int(argv[2]), int(argv[3]))
    except OSError as exc:
        print(f"moat: {exc}", file=sys.stderr)
        return 1
    threading.Thread(target=_pump_in, args=(sock,), daemon=True).start()
    try:
        while data := sock.recv(65536):
            view = memoryview(data)
            while view:
                view = view[os.write(1, view) :]
    except OSError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
