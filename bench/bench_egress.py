"""Egress gateway benchmark: throughput and added latency, direct vs through the gateway.

    .venv/bin/python bench/bench_egress.py [--mb 200] [--requests 200]

Three processes on loopback only: an upstream server (raw byte source + HTTPS echo), the
gateway (``moat.egress.Gateway`` behind ``asyncio.start_server``), and this client.

- throughput: a ``--mb`` MB download over a raw TCP stream, direct, through a CONNECT
  tunnel and through a SOCKS5 tunnel to an ``allow_tcp`` entry (issue 15) (worst case for
  the ratio: no TLS cost on either path to hide the proxy's);
- raw TCP connect: time until a stream is usable, direct vs SOCKS5 through the gateway;
- latency: keep-alive HTTPS GETs, direct, tunnelled (opaque CONNECT) and intercepted (the
  host has a bound secret: TLS terminated with the per-sandbox CA, header swapped, response
  scrubbed), medians after the first handshake.

Targets (issue 3): throughput >= 50% of direct; added latency <= 3 ms tunnelled and
<= 10 ms intercepted. Issue 15: raw TCP throughput >= 50% of direct, connect <= 3 ms added.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "bench.example.test"
CHUNK = 1 << 20


def make_pki(d: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = (d / "ca.pem", d / "cert.pem", d / "key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


# -- roles ---------------------------------------------------------------------------------


def serve_upstream(pki_dir: Path) -> None:
    """A raw byte source (reads a decimal byte count, sends that many) and an HTTPS echo."""
    ca, cert, key = pki_dir / "ca.pem", pki_dir / "cert.pem", pki_dir / "key.pem"
    blob = memoryview(b"x" * CHUNK)

    raw = socket.create_server(("127.0.0.1", 0))

    def raw_loop() -> None:
        while True:
            conn, _ = raw.accept()
            threading.Thread(target=raw_one, args=(conn,), daemon=True).start()

    def raw_one(conn: socket.socket) -> None:
        with conn:
            first = conn.recv(64).split(b"\n")[0]
            n = int(first) if first.isdigit() else 0  # a connect-time probe sends nothing
            while n > 0:
                k = min(n, CHUNK)
                conn.sendall(blob[:k])
                n -= k

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.request = ctx.wrap_socket(self.request, server_side=True)
            super().setup()

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                self.request.close()

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    https = ThreadingHTTPServer(("127.0.0.1", 0), H)
    https.daemon_threads = True
    threading.Thread(target=raw_loop, daemon=True).start()
    print(json.dumps({"raw": raw.getsockname()[1], "https": https.server_address[1]}), flush=True)
    del ca
    https.serve_forever()


def serve_gateway(pki_dir: Path, raw_port: int, https_port: int, intercept: bool) -> None:
    from moat.egress import (
        Gateway,
        GatewayConfig,
        NetworkPolicy,
        Secret,
        StaticResolver,
    )
    from moat.store import AuditLog, AuditSettings

    async def main() -> None:
        cfg = GatewayConfig(
            unsafe_allow_private_ranges=True,
            upstream_ca_file=str(pki_dir / "ca.pem"),
            resolver=StaticResolver({HOST: ["127.0.0.1"]}),
            max_requests_per_second=1e5,
            request_burst=1_000_000,
            max_total_bytes=1 << 40,
            max_tunnels=1000,
            max_tcp_tunnels=1000,  # closed streams wind down in the background
        )
        secrets = {"K": Secret("bench-secret-value-123", hosts=[HOST])} if intercept else {}
        gw = Gateway(
            "bench",
            NetworkPolicy(
                allow_out=[f"{HOST}:{raw_port}", f"{HOST}:{https_port}"],
                allow_tcp=[f"{HOST}:{raw_port}"],
            ),
            secrets=secrets,
            # the bench's request rate is far above a sandbox's audit row budget
            audit=AuditLog(
                pki_dir / f"audit-{int(intercept)}.db",
                AuditSettings(rows_per_second=1e6, burst=10_000_000),
            ),
            config=cfg,
        )
        ca_path = pki_dir / f"gw-ca-{int(intercept)}.pem"
        ca_path.write_bytes(gw.ca_cert_pem())
        server = await asyncio.start_server(gw.handle_connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        print(json.dumps({"port": port, "ca": str(ca_path),
                          "ph": gw.placeholders().get("K", "")}), flush=True)  # fmt: skip
        async with server:
            await server.serve_forever()

    import logging

    logging.disable(logging.WARNING)  # the bench's UNSAFE warning is expected
    asyncio.run(main())


# -- client --------------------------------------------------------------------------------


def connect_tunnel(proxy_port: int, port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy_port))
    s.sendall(f"CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace"))
    return s


def socks_tunnel(proxy_port: int, port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy_port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"\x05\x01\x00")
    if s.recv(2) != b"\x05\x00":
        raise RuntimeError("SOCKS greeting refused")
    name = HOST.encode()
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
    head = b""
    while len(head) < 10:
        head += s.recv(10 - len(head))
    if head[1] != 0:
        raise RuntimeError(f"SOCKS reply {head[1]}")
    return s


def connect_ms(open_stream: Callable[[], socket.socket], n: int) -> list[float]:
    """Time until a stream can carry bytes (a direct connect, or a SOCKS5 success reply)."""
    out = []
    for i in range(n + 3):
        start = time.perf_counter()
        s = open_stream()
        elapsed = (time.perf_counter() - start) * 1000
        s.close()
        if i >= 3:
            out.append(elapsed)
    return out


def download(sock: socket.socket, n: int) -> float:
    buf = bytearray(CHUNK)
    start = time.perf_counter()
    sock.sendall(f"{n}\n".encode())
    got = 0
    while got < n:
        k = sock.recv_into(buf)
        if not k:
            raise RuntimeError("short download")
        got += k
    elapsed = time.perf_counter() - start
    sock.close()
    return n / elapsed / 1e6


def latencies(conn: http.client.HTTPSConnection, n: int, headers: dict[str, str]) -> list[float]:
    out = []
    for i in range(n + 5):
        start = time.perf_counter()
        conn.request("GET", "/", headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}")
        if i >= 5:  # after the first handshake and a little warm-up
            out.append((time.perf_counter() - start) * 1000)
    conn.close()
    return out


def https_conn(https_port: int, ca: str, proxy_port: int | None) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context(cafile=ca)
    if proxy_port is None:
        ctx.check_hostname = False  # direct: dial 127.0.0.1, verify the chain only
        return http.client.HTTPSConnection("127.0.0.1", https_port, context=ctx, timeout=30)
    conn = http.client.HTTPSConnection("127.0.0.1", proxy_port, context=ctx, timeout=30)
    conn.set_tunnel(HOST, https_port)
    return conn


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn(args: list[str]) -> tuple[subprocess.Popen[str], dict[str, object]]:
    proc = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        proc.kill()
        raise RuntimeError("role failed to start")
    return proc, json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--role", choices=["upstream", "gateway"])
    ap.add_argument("--pki")
    ap.add_argument("--ports", nargs=2, type=int)
    ap.add_argument("--intercept", action="store_true")
    a = ap.parse_args()
    if a.role == "upstream":
        serve_upstream(Path(a.pki))
        return
    if a.role == "gateway":
        serve_gateway(Path(a.pki), a.ports[0], a.ports[1], a.intercept)
        return

    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="moat-bench-") as tmp:
        d = Path(tmp)
        ca, _, _ = make_pki(d)
        try:
            up, ports = spawn(["--role", "upstream", "--pki", tmp])
            procs.append(up)
            raw_port, https_port = int(ports["raw"]), int(ports["https"])  # type: ignore[call-overload]
            gw, g = spawn(["--role", "gateway", "--pki", tmp, "--ports", str(raw_port),
                           str(https_port)])  # fmt: skip
            procs.append(gw)
            gwi, gi = spawn(["--role", "gateway", "--pki", tmp, "--ports", str(raw_port),
                             str(https_port), "--intercept"])  # fmt: skip
            procs.append(gwi)
            n = a.mb * 1_000_000
            direct, via, socks = [], [], []
            cpu0 = cpu_seconds(gw.pid)
            for _ in range(a.reps):
                direct.append(download(socket.create_connection(("127.0.0.1", raw_port)), n))
                via.append(download(connect_tunnel(int(g["port"]), raw_port), n))  # type: ignore[call-overload]
                socks.append(download(socks_tunnel(int(g["port"]), raw_port), n))  # type: ignore[call-overload]
            gw_cpu = (cpu_seconds(gw.pid) - cpu0) / a.reps
            d_mbs, v_mbs = statistics.median(direct), statistics.median(via)
            print(f"throughput {a.mb} MB: direct {d_mbs:.0f} MB/s, gateway {v_mbs:.0f} MB/s, "
                  f"ratio {v_mbs / d_mbs:.2f} (target >= 0.50); gateway CPU "
                  f"{gw_cpu:.2f} s per download; load {os.getloadavg()[0]:.1f} on "
                  f"{os.cpu_count()} CPUs")  # fmt: skip
            s_mbs = statistics.median(socks)
            spread = f"direct {min(direct):.0f}-{max(direct):.0f}, "
            spread += f"SOCKS {min(socks):.0f}-{max(socks):.0f}"
            print(f"raw TCP (SOCKS5, allow_tcp) {a.mb} MB: {s_mbs:.0f} MB/s, ratio "
                  f"{s_mbs / d_mbs:.2f} (target >= 0.50); runs {spread}")  # fmt: skip
            cd = connect_ms(lambda: socket.create_connection(("127.0.0.1", raw_port)), 50)
            cs = connect_ms(lambda: socks_tunnel(int(g["port"]), raw_port), 50)  # type: ignore[call-overload]
            md, ms = statistics.median(cd), statistics.median(cs)
            rng = f"{min(cs):.2f}-{max(cs):.2f}"
            print(f"raw TCP connect (median of 50): direct {md:.2f} ms, SOCKS5 via gateway "
                  f"{ms:.2f} ms (+{ms - md:.2f}, target <= 3; range {rng})")  # fmt: skip

            ld = statistics.median(latencies(https_conn(https_port, str(ca), None), a.requests, {}))
            lt = statistics.median(
                latencies(https_conn(https_port, str(ca), int(g["port"])), a.requests, {})  # type: ignore[call-overload]
            )
            li = statistics.median(
                latencies(
                    https_conn(https_port, str(gi["ca"]), int(gi["port"])),  # type: ignore[call-overload]
                    a.requests,
                    {"Authorization": str(gi["ph"])},
                )
            )
            print(f"latency per HTTPS request (median of {a.requests}, keep-alive): direct "
                  f"{ld:.2f} ms, tunnelled {lt:.2f} ms (+{lt - ld:.2f}, target <= 3), "
                  f"intercepted {li:.2f} ms (+{li - ld:.2f}, target <= 10)")  # fmt: skip
        finally:
            for p in procs:
                p.kill()
                p.wait(timeout=10)


if __name__ == "__main__":
    main()
