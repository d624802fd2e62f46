"""Shared fixtures of the egress tests: a test PKI, upstream servers and a gateway harness.

Everything listens on loopback addresses the tests start themselves; the gateway's resolver
maps test names (``*.example.test``) to them. No test talks to any other address.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import io
import ipaddress
import json
import socket
import ssl
import threading
import zipfile
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from moat.egress import Gateway, GatewayConfig, NetworkPolicy, Secret
from moat.store import AuditLog

TEST_NAMES = ["api.example.test", "other.example.test", "pypi.example.test", "rebind.example.test"]


@dataclass
class LocalPKI:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def make_pki(directory: Path) -> LocalPKI:
    """A test CA and one server certificate for every test name (made with cryptography)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "moat test upstream CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TEST_NAMES[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in TEST_NAMES]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = LocalPKI(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    pki.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


def make_wheel() -> tuple[str, bytes]:
    """A minimal valid wheel for the local package index."""
    name = "demo_pkg-0.1-py3-none-any.whl"
    files = {
        "demo_pkg/__init__.py": b"VALUE = 1\n",
        "demo_pkg-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 0.1\n",
        "demo_pkg-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{p},,\n" for p in files) + "demo_pkg-0.1.dist-info/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr("demo_pkg-0.1.dist-info/RECORD", record)
    return name, buf.getvalue()


@dataclass
class Upstream:
    """A loopback HTTP(S) server that records what it received."""

    host: str
    port: int
    tls: bool
    server: ThreadingHTTPServer
    thread: threading.Thread
    records: list[dict[str, Any]] = field(default_factory=list)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def start_upstream(host: str, pki: LocalPKI | None, ident: str = "main", port: int = 0) -> Upstream:
    wheel_name, wheel = make_wheel()
    records: list[dict[str, Any]] = []
    ctx = pki.server_context() if pki else None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            self.request.settimeout(15)
            if ctx is not None:
                self.request = ctx.wrap_socket(self.request, server_side=True)
            super().setup()

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                self.request.close()  # the TLS wrapper (socketserver closes only the raw one)

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _record(self, body: bytes = b"") -> dict[str, Any]:
            headers = {k.lower(): v for k, v in self.headers.items()}
            rec = {"method": self.command, "path": self.path, "headers": headers, "body": body,
                   "ident": ident}  # fmt: skip
            records.append(rec)
            return rec

        def do_GET(self) -> None:
            rec = self._record()
            if self.path.startswith("/bytes/"):
                n = int(self.path.split("/")[2])
                self.send_response(200)
                self.send_header("Content-Length", str(n))
                self.end_headers()
                chunk = b"x" * 65536
                while n > 0:
                    self.wfile.write(chunk[: min(n, len(chunk))])
                    n -= len(chunk)
                return
            if self.path.startswith("/simple/"):
                sha = hashlib.sha256(wheel).hexdigest()
                link = f'<a href="/files/{wheel_name}#sha256={sha}">{wheel_name}</a>'
                html = f"<html><body>{link}</body></html>"
                self._send(200, html.encode(), {"Content-Type": "text/html"})
                return
            if self.path == f"/files/{wheel_name}":
                self._send(200, wheel, {"Content-Type": "application/octet-stream"})
                return
            auth = rec["headers"].get("authorization", "")
            body = json.dumps({"ident": ident, "auth": auth, "path": self.path}).encode()
            self._send(200, body, {"Content-Type": "application/json", "X-Echo-Auth": auth})

        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(n)
            self._record(body)
            self._send(200, json.dumps({"ident": ident, "len": len(body)}).encode())

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # clients cut off by the gateway are expected here

    server = Server((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)  # fmt: skip
    thread.start()
    return Upstream(host, server.server_address[1], ctx is not None, server, thread, records)


class CountingResolver:
    """Maps test names to loopback addresses; counts queries; can change its answers."""

    def __init__(self, table: dict[str, list[list[str]]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int) -> list[Any]:
        self.calls.append(host)
        answers = self.table.get(host)
        if not answers:
            return []
        n = sum(1 for c in self.calls if c == host) - 1
        return [ipaddress.ip_address(a) for a in answers[min(n, len(answers) - 1)]]


class Harness:
    """A gateway served on 127.0.0.1 from its own event loop thread."""

    def __init__(self, gw: Gateway, audit: AuditLog) -> None:
        self.gw = gw
        self.audit = audit
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("gateway harness did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self.gw.handle_connection, "127.0.0.1", 0)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 20) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            await self.gw.close()
            await self.server.wait_closed()

        async def drain() -> None:
            # Let connection handlers finish their closing (3.11's wait_closed doesn't).
            for _ in range(100):
                pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                if not pending:
                    return
                await asyncio.sleep(0.02)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        try:
            self.call(shutdown())
            self.call(drain())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
            self.audit.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def https_upstream(pki: LocalPKI) -> Iterator[Upstream]:
    up = start_upstream("127.0.0.1", pki, "tls")
    yield up
    up.stop()


@pytest.fixture(scope="module")
def http_upstream() -> Iterator[Upstream]:
    up = start_upstream("127.0.0.1", None, "plain")
    yield up
    up.stop()


GatewayFactory = Callable[..., Harness]


@pytest.fixture
def gateway(tmp_path: Path, pki: LocalPKI) -> Iterator[GatewayFactory]:
    """Factory: ``gateway(policy, secrets=..., unsafe=True, table=..., **config)``."""
    started: list[Harness] = []

    def make(
        policy: NetworkPolicy | dict[str, Any] | None,
        secrets: dict[str, Secret] | None = None,
        unsafe: bool = True,
        resolver: Any = None,
        **config: Any,
    ) -> Harness:
        if resolver is None:
            resolver = CountingResolver({n: [["127.0.0.1"]] for n in TEST_NAMES})
        config.setdefault("upstream_ca_file", str(pki.ca_file))
        cfg = GatewayConfig(unsafe_allow_private_ranges=unsafe, resolver=resolver, **config)
        audit = AuditLog(tmp_path / f"audit{len(started)}.db")
        h = Harness(Gateway("sbx-test", policy, secrets=secrets, audit=audit, config=cfg), audit)
        started.append(h)
        return h

    yield make
    for h in started:
        h.stop()


def raw_connect(port: int, target: str, timeout: float = 10) -> tuple[socket.socket, bytes]:
    """Send CONNECT through the gateway; return the socket and the response head."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return s, head


def raw_request(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes to the gateway and read everything until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
