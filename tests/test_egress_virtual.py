"""The gateway on virtual streams (the shape the agent channel hands it), not sockets."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from moat.egress import Gateway, GatewayConfig, NetworkPolicy, Secret
from moat.egress.tls import PlainStream, TLSStream
from moat.store import AuditLog
from test_egress_support import CountingResolver, LocalPKI, Upstream

VALUE = "sk-virtual-REAL-VALUE-1234"

pytest_plugins = ["test_egress_support"]  # shared fixtures (servers, PKI, gateway)


class VirtualWriter:
    """Only write / drain / close / is_closing / wait_closed, like the lead's channel writer."""

    def __init__(self, peer: asyncio.StreamReader) -> None:
        self.peer = peer
        self.closed = False

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.peer.feed_data(data)

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.peer.feed_eof()

    def is_closing(self) -> bool:
        return self.closed

    async def wait_closed(self) -> None:
        return None


def _pair(gw: Gateway) -> tuple[asyncio.Task[None], asyncio.StreamReader, VirtualWriter]:
    gw_in, client_in = asyncio.StreamReader(), asyncio.StreamReader()
    task = asyncio.create_task(gw.handle_connection(gw_in, VirtualWriter(client_in)))
    return task, client_in, VirtualWriter(gw_in)


def _gateway(tmp_path: Path, pki: LocalPKI, allow: list[str]) -> Gateway:
    cfg = GatewayConfig(
        unsafe_allow_private_ranges=True,
        upstream_ca_file=str(pki.ca_file),
        resolver=CountingResolver({"api.example.test": [["127.0.0.1"]]}),
    )
    secrets = {"KEY": Secret(VALUE, hosts=["api.example.test"], template="Bearer {value}")}
    return Gateway("sbx-virtual", NetworkPolicy(allow_out=allow), secrets=secrets,
                   audit=AuditLog(tmp_path / "a.db"), config=cfg)  # fmt: skip


@pytest.mark.asyncio
async def test_plain_http_over_virtual_streams(
    tmp_path: Path, pki: LocalPKI, http_upstream: Upstream
) -> None:
    p = http_upstream.port
    gw = _gateway(tmp_path, pki, [f"api.example.test:{p}"])
    task, reader, writer = _pair(gw)
    writer.write(f"GET http://api.example.test:{p}/echo HTTP/1.1\r\n"
                 f"Host: api.example.test:{p}\r\n\r\n".encode())  # fmt: skip
    async with asyncio.timeout(10):
        out = await reader.read(-1)
        await task
    assert out.startswith(b"HTTP/1.1 200") and b'"ident": "plain"' in out
    await gw.close()


@pytest.mark.asyncio
async def test_intercepted_tls_over_virtual_streams(
    tmp_path: Path, pki: LocalPKI, https_upstream: Upstream
) -> None:
    p = https_upstream.port
    gw = _gateway(tmp_path, pki, [f"api.example.test:{p}"])
    ph = gw.placeholders()["KEY"]
    task, reader, writer = _pair(gw)
    async with asyncio.timeout(10):
        writer.write(f"CONNECT api.example.test:{p} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        ctx = ssl.create_default_context(cadata=gw.ca_cert_pem().decode())
        tls = TLSStream(ctx, PlainStream(reader, writer), server_side=False,
                        server_hostname="api.example.test")  # fmt: skip
        await tls.handshake()
        req = (f"GET /echo HTTP/1.1\r\nHost: api.example.test:{p}\r\n"
               f"Authorization: Bearer {ph}\r\nConnection: close\r\n\r\n")  # fmt: skip
        await tls.write(req.encode())
        out = b""
        while chunk := await tls.read(65536):
            out += chunk
        await task
    assert out.startswith(b"HTTP/1.1 200")
    assert https_upstream.records[-1]["headers"]["authorization"] == f"Bearer {VALUE}"
    assert VALUE.encode() not in out
    await gw.close()


@pytest.mark.asyncio
async def test_close_ends_open_virtual_tunnel(
    tmp_path: Path, pki: LocalPKI, https_upstream: Upstream
) -> None:
    p = https_upstream.port
    gw = _gateway(tmp_path, pki, [f"api.example.test:{p}"])
    task, reader, writer = _pair(gw)
    writer.write(f"CONNECT api.example.test:{p} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    async with asyncio.timeout(10):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.05)
        assert not task.done()
        await gw.close()
        await task  # handle_connection returns normally, never raises CancelledError
    assert reader.at_eof() or await reader.read(-1) == b""


class SlowVirtualWriter(VirtualWriter):
    """A virtual writer whose drain takes a while (a slow agent channel)."""

    def __init__(self, peer: asyncio.StreamReader) -> None:
        super().__init__(peer)
        self.drains = 0

    async def drain(self) -> None:
        self.drains += 1
        await asyncio.sleep(0.001)


@pytest.mark.asyncio
async def test_opaque_tunnel_download_over_virtual_streams(
    tmp_path: Path, pki: LocalPKI, https_upstream: Upstream
) -> None:
    p = https_upstream.port
    cfg = GatewayConfig(
        unsafe_allow_private_ranges=True,
        resolver=CountingResolver({"other.example.test": [["127.0.0.1"]]}),
    )
    gw = Gateway("sbx-virtual", NetworkPolicy(allow_out=[f"other.example.test:{p}"]), config=cfg)
    gw_in, client_in = asyncio.StreamReader(), asyncio.StreamReader()
    sink = SlowVirtualWriter(client_in)
    task = asyncio.create_task(gw.handle_connection(gw_in, sink))
    writer = VirtualWriter(gw_in)
    n = 3 << 20
    async with asyncio.timeout(30):
        writer.write(f"CONNECT other.example.test:{p} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await client_in.readuntil(b"\r\n\r\n")
        # Not intercepted: the client verifies the real upstream certificate (test CA).
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        tls = TLSStream(ctx, PlainStream(client_in, writer), server_side=False,
                        server_hostname="other.example.test")  # fmt: skip
        await tls.handshake()
        req = (
            f"GET /bytes/{n} HTTP/1.1\r\nHost: other.example.test:{p}\r\nConnection: close\r\n\r\n"
        )
        await tls.write(req.encode())
        got = 0
        while chunk := await tls.read(1 << 20):
            got += len(chunk)
        writer.close()
        await task
    assert got > n and sink.drains > 0  # the body (plus head) arrived; backpressure was used
    await gw.close()
