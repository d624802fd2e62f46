"""Raw TCP egress through the gateway (issue 15): SOCKS5 and CONNECT to ``allow_tcp`` entries.

Real gateway on 127.0.0.1, real TCP servers started here, a hand-written SOCKS5 client (the
one in the sandbox, ``moat.agent.tcpconnect``, is tested end to end in real sandboxes by
``test_egress_tcp_sandbox.py``). Test names resolve to loopback through the harness's
resolver, which the gateway only dials with ``unsafe_allow_private_ranges`` (a control
without it is refused, invariant 2).
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from moat.egress import NetworkPolicy, Secret
from moat.egress.policy import HostPattern
from moat.errors import PolicyError
from test_egress_support import CountingResolver, GatewayFactory, raw_connect

pytest_plugins = ["test_egress_support"]

API, OTHER, REBIND = "api.example.test", "other.example.test", "rebind.example.test"


class _Echo(socketserver.BaseRequestHandler):
    """Says hello first (like sshd), then echoes; records what it got."""

    def handle(self) -> None:
        server: Any = self.server
        self.request.sendall(server.banner)
        got = b""
        while data := self.request.recv(65536):
            got += data
            self.request.sendall(data)
        server.received.append(got)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0, banner: bytes = b"HELLO\n"):
        super().__init__((host, port), _Echo)
        self.banner = banner
        self.received: list[bytes] = []
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()  # fmt: skip

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    srv = EchoServer()
    yield srv
    srv.stop()


def socks_open(port: int, host: str, dport: int, *, atyp: int = 3) -> tuple[socket.socket, int]:
    """SOCKS5 CONNECT through the gateway; returns the socket and the reply code."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    if atyp == 3:
        addr = bytes([len(host)]) + host.encode()
    else:
        addr = socket.inet_pton(socket.AF_INET if atyp == 1 else socket.AF_INET6, host)
    s.sendall(b"\x05\x01\x00" + bytes([atyp]) + addr + dport.to_bytes(2, "big"))
    head = _exact(s, 10)
    return s, head[1]


def _exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = s.recv(n - len(buf))
        if not data:
            break
        buf += data
    return buf


def _rows(h: Any) -> list[dict[str, Any]]:
    time.sleep(0.2)  # the audit writer is asynchronous
    return list(h.audit.query(kind="egress"))


def _closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        while data := s.recv(4096):
            del data
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


# -- policy ------------------------------------------------------------------------------


def test_allow_tcp_needs_an_explicit_port_and_round_trips() -> None:
    p = NetworkPolicy(allow_tcp=["github.com:22", "*.db.example.com:5432", "10.0.0.5:6379"])
    assert NetworkPolicy.parse(p.to_dict()) == p
    assert p.to_dict()["allow_tcp"] == ["github.com:22", "*.db.example.com:5432", "10.0.0.5:6379"]
    for bad in ("github.com", "*.db.example.com", "*:22", "*.com:22", "user@github.com:22"):
        with pytest.raises(PolicyError):
            NetworkPolicy(allow_tcp=[bad])
    with pytest.raises(PolicyError, match="unknown network policy keys"):
        NetworkPolicy.parse({"allow_tcpp": ["github.com:22"]})
    assert HostPattern.parse("github.com:22").ports == frozenset({22})


def test_secret_bound_to_a_tcp_only_host_is_refused_at_create() -> None:
    from moat.engine.api import FrontDoor
    from moat.engine.resolve import validate_config

    secret = Secret("sk-" + "x" * 20, ["db.example.com"])
    config = FrontDoor.resolve(
        network={"allow_tcp": ["db.example.com:5432"]}, secrets={"TOKEN": secret}
    )
    with pytest.raises(PolicyError, match="only over raw TCP"):
        validate_config(config)
    # Control: the same secret with an HTTP(S) rule for its host is fine.
    ok = FrontDoor.resolve(
        network={"allow_tcp": ["db.example.com:5432"], "allow_out": ["db.example.com"]},
        secrets={"TOKEN": secret},
    )
    assert validate_config(ok).network.allow_tcp == ("db.example.com:5432",)


# -- SOCKS5 ------------------------------------------------------------------------------


def test_socks_reaches_an_allowed_host_and_port_only(
    gateway: GatewayFactory, echo: EchoServer
) -> None:
    h = gateway(NetworkPolicy(allow_tcp=[f"{API}:{echo.port}"]))
    s, code = socks_open(h.port, API, echo.port)
    assert code == 0
    assert _exact(s, 6) == b"HELLO\n"  # server speaks first, as sshd does
    s.sendall(b"ping" * 1000)
    assert _exact(s, 4000) == b"ping" * 1000
    s.shutdown(socket.SHUT_WR)
    assert _closed_within(s, 5)
    s.close()
    # The same host on another port, and another host on this port: refused, not dialled.
    for host, port in ((API, echo.port + 1), (OTHER, echo.port)):
        s, code = socks_open(h.port, host, port)
        assert code == 2  # not allowed by ruleset
        s.close()
    rows = _rows(h)
    allowed = [r for r in rows if r["result"] == "allow"]
    assert len(allowed) == 1 and allowed[0]["reason"] == "tcp"
    assert allowed[0]["method"] == "SOCKS" and allowed[0]["port"] == echo.port
    assert allowed[0]["resolved_ip"] == "127.0.0.1"
    assert allowed[0]["bytes_up"] >= 4000 and allowed[0]["bytes_down"] >= 4006
    denied = [r["reason"] for r in rows if r["result"] == "deny"]
    assert denied == ["tcp_not_allowed", "tcp_not_allowed"]
    assert echo.received == [b"ping" * 1000]


def test_http_rules_and_internet_access_never_open_raw_tcp(
    gateway: GatewayFactory, echo: EchoServer
) -> None:
    for policy in (
        NetworkPolicy(allow_out=[f"{API}:{echo.port}"]),
        NetworkPolicy(internet_access=True),
    ):
        h = gateway(policy)
        s, code = socks_open(h.port, API, echo.port)
        assert code == 2
        s.close()
    assert echo.received == []


def test_deny_out_wins_over_allow_tcp(gateway: GatewayFactory, echo: EchoServer) -> None:
    h = gateway(NetworkPolicy(allow_tcp=[f"{API}:{echo.port}"], deny_out=[f"{API}:{echo.port}"]))
    s, code = socks_open(h.port, API, echo.port)
    assert code == 2
    s.close()
    assert [r["reason"] for r in _rows(h)] == ["denied_by_policy"]


def test_private_address_refused_without_the_unsafe_switch(
    gateway: GatewayFactory, echo: EchoServer
) -> None:
    # The name is allowed; it resolves to loopback; the gateway refuses to dial it.
    h = gateway(NetworkPolicy(allow_tcp=[f"{API}:{echo.port}"]), unsafe=False)
    s, code = socks_open(h.port, API, echo.port)
    assert code == 2
    s.close()
    assert _rows(h)[0]["reason"].startswith("blocked_address:")
    # An IP literal of the metadata service: refused however it is spelled.
    h2 = gateway(NetworkPolicy(allow_tcp=["169.254.169.254:80"]), unsafe=False)
    s, code = socks_open(h2.port, "169.254.169.254", 80, atyp=1)
    assert code == 2
    s.close()
    assert echo.received == []


def test_dns_rebinding_dials_the_checked_address(gateway: GatewayFactory) -> None:
    first = EchoServer("127.0.0.2", banner=b"FIRST\n")
    second = EchoServer("127.0.0.1", first.port, banner=b"SECOND\n")
    try:
        resolver = CountingResolver({REBIND: [["127.0.0.2"], ["127.0.0.1"]]})
        h = gateway(NetworkPolicy(allow_tcp=[f"{REBIND}:{first.port}"]), resolver=resolver)
        s, code = socks_open(h.port, REBIND, first.port)
        assert code == 0 and _exact(s, 6) == b"FIRST\n"
        s.close()
        assert resolver.calls == [REBIND]
    finally:
        first.stop()
        second.stop()


def test_name_not_resolved_when_denied(gateway: GatewayFactory) -> None:
    resolver = CountingResolver({API: [["127.0.0.1"]]})
    h = gateway(NetworkPolicy(), resolver=resolver)
    s, code = socks_open(h.port, "exfil-in-a-label.example.test", 22)
    assert code == 2 and resolver.calls == []
    s.close()


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"\x05\x02\x00\x03\x03abc\x00\x16", 0x07),  # BIND
        (b"\x05\x03\x00\x01\x7f\x00\x00\x01\x00\x16", 0x07),  # UDP ASSOCIATE
        (b"\x05\x01\x00\x02\x00\x16", 0x08),  # an address type that doesn't exist
        (b"\x05\x01\x00\x03\x0bexample.com\x00\x00", 0x04),  # port 0
        (b"\x05\x01\x00\x03\x0ea.b:99@evil.xx\x00\x16", 0x04),  # a name smuggling a port
    ],
)
def test_malformed_socks_requests_are_refused(
    gateway: GatewayFactory, request_bytes: bytes, code: int
) -> None:
    h = gateway(NetworkPolicy(allow_tcp=["example.com:22"]))
    s = socket.create_connection(("127.0.0.1", h.port), timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(request_bytes)
    assert _exact(s, 10)[:2] == bytes([5, code])
    s.close()


def test_socks_without_no_auth_or_truncated_is_closed(gateway: GatewayFactory) -> None:
    h = gateway(NetworkPolicy(allow_tcp=["example.com:22"]))
    s = socket.create_connection(("127.0.0.1", h.port), timeout=10)
    s.sendall(b"\x05\x01\x02")  # username/password only
    assert _exact(s, 2) == b"\x05\xff"
    assert _closed_within(s, 5)
    s.close()
    s = socket.create_connection(("127.0.0.1", h.port), timeout=10)
    s.sendall(b"\x05\x01\x00\x05\x01")  # greeting, then a request cut short
    s.shutdown(socket.SHUT_WR)
    assert _exact(s, 2) == b"\x05\x00" and _closed_within(s, 5)
    s.close()


# -- CONNECT to an allow_tcp entry ---------------------------------------------------------


def test_connect_carries_raw_bytes_to_an_allow_tcp_entry(
    gateway: GatewayFactory, echo: EchoServer
) -> None:
    h = gateway(NetworkPolicy(allow_tcp=[f"{API}:{echo.port}"]))
    s, head = raw_connect(h.port, f"{API}:{echo.port}")
    assert head.startswith(b"HTTP/1.1 200")
    assert _exact(s, 6) == b"HELLO\n"
    s.sendall(b"SSH-2.0-test\r\n")
    assert _exact(s, 14) == b"SSH-2.0-test\r\n"
    s.close()
    # Control: the same CONNECT without the entry is refused.
    h2 = gateway(NetworkPolicy())
    s, head = raw_connect(h2.port, f"{API}:{echo.port}")
    assert b"403" in head.split(b"\r\n")[0]
    s.close()


# -- caps, policy updates, what the client sends ------------------------------------------


def test_tcp_tunnel_cap(gateway: GatewayFactory, echo: EchoServer) -> None:
    h = gateway(NetworkPolicy(allow_tcp=[f"{API}:{echo.port}"]), max_tcp_tunnels=2)
    held = [socks_open(h.port, API, echo.port) for _ in range(2)]
    assert [c for _, c in held] == [0, 0]
    s, code = socks_open(h.port, API, echo.port)
    assert code == 1
    s.close()
    held[0][0].close()
    time.sleep(0.3)
    s, code = socks_open(h.port, API, echo.port)  # room again once one ended
    assert code == 0
    s.close()
    held[1][0].close()
    assert "too_many_tcp_tunnels" in [r["reason"] for r in _rows(h)]


def test_update_policy_cuts_an_open_tcp_tunnel(gateway: GatewayFactory, echo: EchoServer) -> None:
    other = EchoServer()
    try:
        h = gateway(NetworkPolicy(allow_tcp=[f"{API}:{echo.port}", f"{OTHER}:{other.port}"]))
        cut, c1 = socks_open(h.port, API, echo.port)
        keep, c2 = socks_open(h.port, OTHER, other.port)
        assert (c1, c2) == (0, 0)
        assert not _closed_within(cut, 0.3)  # control: open while allowed
        h.call(h.gw.update_policy({"allow_tcp": [f"{OTHER}:{other.port}"]}))
        assert _closed_within(cut, 5)
        assert _exact(keep, 6) == b"HELLO\n"
        keep.sendall(b"still here")
        assert _exact(keep, 10) == b"still here"
        keep.close()
        cut.close()
        assert any(r["reason"].endswith("closed:policy_updated") for r in _rows(h))
    finally:
        other.stop()


def test_placeholder_or_canary_in_the_first_bytes_ends_the_tunnel(
    gateway: GatewayFactory, echo: EchoServer
) -> None:
    secret = Secret("sk-live-" + "a" * 32, ["api.example.test"])
    h = gateway(NetworkPolicy(allow_tcp=[f"{OTHER}:{echo.port}"]), secrets={"TOKEN": secret})
    placeholder = h.gw.placeholders()["TOKEN"]
    s, code = socks_open(h.port, OTHER, echo.port)
    assert code == 0 and _exact(s, 6) == b"HELLO\n"
    s.sendall(b"AUTH " + placeholder.encode()[:10])
    s.sendall(placeholder.encode()[10:] + b"\r\n")  # split across two reads
    assert _closed_within(s, 5)
    s.close()
    assert all(placeholder.encode() not in got for got in echo.received)
    assert any(r["reason"].endswith("closed:secret_exfiltration") for r in _rows(h))

    def inspect(data: bytes) -> None:
        from moat.errors import LeakBlockedError

        if b"CANARY-1234" in data:
            raise LeakBlockedError(["canary"], "egress")

    h.gw.set_inspect(inspect)
    s, code = socks_open(h.port, OTHER, echo.port)
    assert code == 0 and _exact(s, 6) == b"HELLO\n"
    s.sendall(b"hello ")  # control: harmless bytes pass
    assert _exact(s, 6) == b"hello "
    s.sendall(b"CANARY-1234")
    assert _closed_within(s, 5)
    s.close()
    assert any(r["reason"].endswith("closed:blocked_by_guard") for r in _rows(h))


def test_a_canary_split_across_the_connect_head_is_caught(
    gateway: GatewayFactory, echo: EchoServer
) -> None:
    """The bytes pipelined after a CONNECT head and the next read are checked as one stream."""
    from moat.errors import LeakBlockedError

    def inspect(data: bytes) -> None:
        if b"CANARY-1234" in data:
            raise LeakBlockedError(["canary"], "egress")

    h = gateway(NetworkPolicy(allow_tcp=[f"{API}:{echo.port}"]))
    h.gw.set_inspect(inspect)
    s = socket.create_connection(("127.0.0.1", h.port), timeout=10)
    target = f"{API}:{echo.port}"
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nCANARY-".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 200")
    time.sleep(0.2)
    s.sendall(b"1234 and more")
    assert _closed_within(s, 5)
    s.close()
    assert all(b"1234" not in got for got in echo.received)
    assert any(r["reason"].endswith("closed:blocked_by_guard") for r in _rows(h))
