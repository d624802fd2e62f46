"""The egress gateway of one sandbox: the only way out (DESIGN invariants 2 and 3).

Trust domain: host engine. Every byte arriving here comes from the sandbox and is hostile:
request heads (parsed by h11), CONNECT targets, TLS ClientHellos, bodies. The gateway:

1. accepts HTTP ``CONNECT host:port`` and absolute-form plain HTTP; refuses anything else
   with a 4xx and an ``X-Moat-Reason`` header;
2. canonicalises the destination once (:mod:`moat.egress.hostport`) and decides on the name
   (:func:`moat.egress.policy.decide_name`) *before* any DNS query;
3. resolves once, classifies every answer (:func:`moat.egress.policy.decide`) and dials the
   first answer by address: nothing resolves the name again (no DNS rebinding);
4. on an opaque CONNECT tunnel, requires the ClientHello's SNI to equal the CONNECT host
   (ports 80/443 must carry TLS; other explicitly allowed ports may carry raw bytes);
5. for hosts a secret is bound to, terminates TLS with a leaf of the per-sandbox CA, swaps
   placeholders for values in the configured header, forwards over TLS verified against the
   system roots, and scrubs values out of responses; a placeholder bound elsewhere (or sent
   over plain HTTP) refuses the request as ``secret_exfiltration``;
6. serves raw TCP to ``allow_tcp`` destinations (issue 15) through SOCKS5 (a stream whose
   first byte is 5, :mod:`moat.egress.socks`) or CONNECT, decided, resolved and dialled the
   same way; the first bytes the client sends pass the guard's egress check and may carry
   no secret placeholder (no credential travels over raw TCP);
7. enforces the per-sandbox caps of :class:`~moat.egress.caps.GatewayConfig`;
8. writes one audit row and one log line per decision (never a secret value).

Plain HTTP connections carry one request each (the response says ``Connection: close``), so
every request is decided on its own; intercepted TLS connections keep alive and every
request on them is checked against the CONNECT host. That per-request HTTP/1.1 exchange
(request checks, secret swap, body and response forwarding) is :mod:`moat.egress.exchange`;
the gateway hands it the decided destination and the state it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h11

from moat.egress import socks
from moat.egress.addr import IPAddress
from moat.egress.broker import CertificateAuthority, Secret, SecretBroker
from moat.egress.caps import GatewayConfig, TokenBucket
from moat.egress.exchange import (
    READ_SIZE,
    Ended,
    Forwarder,
    Refused,
    next_request,
    send_refusal,
)
from moat.egress.framing import FramingError
from moat.egress.hostport import HostKind, HostPort, parse_absolute_url, parse_authority
from moat.egress.identity import GatewayIdentity
from moat.egress.policy import Decision, NetworkPolicy, decide, decide_name, decide_tcp_name
from moat.egress.pump import SplicePump, UpstreamPump, open_pump
from moat.egress.resolve import Resolver, SystemResolver, host_addresses, resolve_once
from moat.egress.tls import (
    ByteStream,
    ClientHello,
    HelloError,
    PlainStream,
    TLSStream,
    _Writer,
    read_client_hello,
)
from moat.errors import InvalidArgumentError, LeakBlockedError
from moat.store import AuditLog

__all__ = ["Gateway"]

log = logging.getLogger("moat.egress")

# Per reason, at most this many audit rows per second for flood-type refusals.
_FLOOD_REASONS = frozenset(
    {"too_many_tunnels", "too_many_tcp_tunnels", "rate_limited", "byte_budget_exhausted"}
)
#: How much of what a client sends first on a raw TCP tunnel passes the egress checks.
_INSPECT_BYTES = 64 * 1024
_FLOOD_ROWS_PER_SECOND = 5


class _Conn:
    """Bookkeeping of one client connection (a tunnel or an HTTP session)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.task: asyncio.Task[None] | None = None
        self.dest: HostPort | None = None
        self.ip: IPAddress | None = None
        self.started = time.monotonic()
        self.last = self.started
        self.up = 0
        self.down = 0
        self.end_reason: str | None = None
        self.tcp = False  # a raw TCP tunnel (decided by allow_tcp)

    def touch(self) -> None:
        self.last = time.monotonic()

    def count(self, up: int = 0, down: int = 0) -> bool:
        """Account bytes; False once this connection must stop (budget spent, closed)."""
        self.up += up
        self.down += down
        self.last = time.monotonic()
        self.gateway._account(up + down)
        return self.end_reason is None

    def final_reason(self, base: str) -> str:
        """``base``, followed by why the gateway closed the connection if it did."""
        return base if self.end_reason is None else f"{base};closed:{self.end_reason}"

    def close(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason
        if self.task is not None and not self.task.done():
            self.task.cancel()


class Gateway:
    """The egress gateway of one sandbox.

    Serve it with ``asyncio.start_server(gw.handle_connection, "127.0.0.1", 0)`` or feed it
    the agent's virtual streams (a StreamReader and an object with write / drain / close /
    is_closing / wait_closed). All methods must be called from one event loop.
    """

    def __init__(
        self,
        sandbox_id: str,
        policy: NetworkPolicy | Mapping[str, Any] | None = None,
        secrets: Mapping[str, Secret] | None = None,
        audit: AuditLog | None = None,
        config: GatewayConfig | None = None,
        inspect: Callable[[bytes], object] | None = None,
        identity: GatewayIdentity | None = None,
    ) -> None:
        """``inspect`` sees each request's line and headers as the sandbox sent them (before
        any secret is swapped in): the guard's canary and sensitive-value check. It reports
        findings itself; raising LeakBlockedError refuses the request.

        ``identity``: the placeholders and CA of the gateway a restored sandbox had (kept
        where they are still valid: moat.egress.identity)."""
        if not isinstance(sandbox_id, str) or not 1 <= len(sandbox_id) <= 128:
            raise InvalidArgumentError("bad sandbox id")
        if config is not None and not isinstance(config, GatewayConfig):
            raise InvalidArgumentError("config must be a GatewayConfig")
        self.sandbox_id = sandbox_id
        self.config = config or GatewayConfig()
        self._policy = NetworkPolicy.parse(policy)
        self._policy_gen = 0
        self._broker = SecretBroker(secrets, identity.placeholders if identity else None)
        saved = (identity.ca_key_pem, identity.ca_cert_pem) if identity else None
        self._ca = CertificateAuthority(
            f"moat {sandbox_id}", self._broker.bound_hosts(), saved=saved
        )
        self._audit = audit
        self._inspect = inspect
        self._resolver: Resolver = self.config.resolver or SystemResolver()
        self._conns: set[_Conn] = set()
        self._rate = TokenBucket(self.config.max_requests_per_second, self.config.request_burst)
        self._bytes = 0
        self._over_budget = False
        self._closed = False
        self._flood: dict[str, tuple[int, int]] = {}
        self._upstream_ctx: ssl.SSLContext | None = None
        if self.config.unsafe_allow_private_ranges:
            # Loud weakening (invariant 2): warn at every gateway start.
            log.warning(
                "UNSAFE: unsafe_allow_private_ranges is on for sandbox %s: loopback, private,"
                " link-local and host addresses are reachable from it",
                sandbox_id,
            )
        if self.config.unsafe_allow_networks:
            log.warning(
                "UNSAFE: unsafe_allow_networks is on for sandbox %s: %s reachable for"
                " allowed names",
                sandbox_id,
                ", ".join(map(str, self.config.unsafe_allow_networks)),
            )

    # -- public API ------------------------------------------------------------------------

    def placeholders(self) -> dict[str, str]:
        """Environment variable name -> placeholder to put in the sandbox's environment."""
        return self._broker.placeholders()

    def identity(self) -> GatewayIdentity:
        """What the sandbox's processes may hold of this gateway (placeholders, its CA), to
        save with a checkpoint: host side only (the CA key is in it)."""
        return GatewayIdentity(self.placeholders(), self._ca.key_pem(), self._ca.cert_pem())

    def ca_cert_pem(self) -> bytes:
        """The per-sandbox CA certificate (public part only) for the sandbox's trust paths."""
        return self._ca.cert_pem()

    def ca_bundle_pem(self) -> bytes:
        """The system roots followed by the per-sandbox CA (for SSL_CERT_FILE & co.)."""
        paths = ssl.get_default_verify_paths()
        for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
            if candidate and Path(candidate).is_file():
                system = Path(candidate).read_bytes()
                return system.rstrip(b"\n") + b"\n" + self.ca_cert_pem()
        return self.ca_cert_pem()

    @property
    def policy(self) -> NetworkPolicy:
        """The current policy."""
        return self._policy

    def stats(self) -> dict[str, int]:
        """Open connections and bytes moved so far."""
        return {"open": len(self._conns), "bytes": self._bytes}

    def set_inspect(self, inspect: Callable[[bytes], object] | None) -> None:
        """Replace the request inspection hook (a warm sandbox gets its caller's guard)."""
        self._inspect = inspect

    async def update_policy(self, policy: NetworkPolicy | Mapping[str, Any] | None) -> None:
        """Replace the policy; close open connections the new one no longer allows."""
        new = NetworkPolicy.parse(policy)
        self._policy = new
        self._policy_gen += 1
        for conn in list(self._conns):
            if conn.dest is not None and not self._still_allowed(conn):
                conn.close("policy_updated")
        await asyncio.sleep(0)

    async def close(self) -> None:
        """End every connection and refuse new ones. Idempotent."""
        self._closed = True
        tasks = []
        for conn in list(self._conns):
            conn.close("gateway_closed")
            if conn.task is not None:
                tasks.append(conn.task)
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def handle_connection(self, reader: asyncio.StreamReader, writer: _Writer) -> None:
        """Serve one client connection (one proxied stream from the sandbox) to its end.

        Never raises for anything the client does; returns when the connection is over.
        """
        client = PlainStream(reader, writer)
        try:
            refusal = self._admission()
            if refusal is not None:
                self._decision(None, None, None, allowed=False, reason=refusal)
                await send_refusal(client, 503 if refusal == "gateway_closed" else 429, refusal)
                return
            conn = _Conn(self)
            self._conns.add(conn)
            conn.task = asyncio.create_task(self._serve(conn, client))
            watchdog = asyncio.create_task(self._watch(conn))
            try:
                await conn.task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    conn.task.cancel()
                    raise
            finally:
                watchdog.cancel()
                self._conns.discard(conn)
        finally:
            client.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await writer.wait_closed()

    # -- admission, caps, bookkeeping ------------------------------------------------------

    def _admission(self) -> str | None:
        if self._closed:
            return "gateway_closed"
        if self._over_budget:
            return "byte_budget_exhausted"
        if len(self._conns) >= self.config.max_tunnels:
            return "too_many_tunnels"
        return None

    def _account(self, n: int) -> None:
        self._bytes += n
        if not self._over_budget and self._bytes > self.config.max_total_bytes:
            self._over_budget = True
            for conn in list(self._conns):
                conn.close("byte_budget_exhausted")

    async def _watch(self, conn: _Conn) -> None:
        cfg = self.config
        step = min(1.0, cfg.idle_timeout / 4, cfg.max_tunnel_seconds / 4)
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            if now - conn.last > cfg.idle_timeout:
                conn.close("idle_timeout")
                return
            if now - conn.started > cfg.max_tunnel_seconds:
                conn.close("tunnel_time_limit")
                return

    def _still_allowed(self, conn: _Conn) -> bool:
        dest = conn.dest
        if dest is None:
            return True
        if conn.ip is None:
            name = decide_tcp_name if conn.tcp else decide_name
            return name(self._policy, dest).allowed
        return self._decide(dest, [conn.ip], tcp=conn.tcp).allowed

    def _decide(self, dest: HostPort, addrs: list[IPAddress], tcp: bool = False) -> Decision:
        own = self.config.own_addresses
        return decide(
            self._policy,
            dest,
            addrs,
            unsafe_allow_private_ranges=self.config.unsafe_allow_private_ranges,
            own_addresses=host_addresses() if own is None else own,
            tcp=tcp,
            unsafe_allow_networks=self.config.unsafe_allow_networks,
        )

    def _decision(
        self,
        method: str | None,
        dest: HostPort | None,
        ip: IPAddress | None,
        *,
        allowed: bool,
        reason: str,
        secret: str | None = None,
        up: int = 0,
        down: int = 0,
    ) -> int | None:
        """The one canonical log line and audit row of a decision; returns the row id."""
        if reason in _FLOOD_REASONS and not self._flood_ok(reason):
            return None
        level = logging.WARNING if reason.startswith("secret_") else logging.INFO
        log.log(
            level,
            "egress sandbox=%s result=%s reason=%s method=%s dest=%s ip=%s secret=%s up=%d down=%d",
            self.sandbox_id,
            "allow" if allowed else "deny",
            reason,
            method or "-",
            dest.authority() if dest else "-",
            ip or "-",
            secret or "-",
            up,
            down,
        )
        if self._audit is None:
            return None
        return self._audit.record_egress(
            self.sandbox_id,
            method=method,
            host=dest.host if dest else None,
            port=dest.port if dest else None,
            resolved_ip=str(ip) if ip else None,
            allowed=allowed,
            reason=reason,
            bytes_up=up,
            bytes_down=down,
            secret=secret,
        )

    def _finish(self, row: int | None, conn: _Conn, reason: str) -> None:
        """Complete an allowed row at the end of its tunnel (bytes, end reason)."""
        final = conn.final_reason(reason)
        log.debug(
            "egress sandbox=%s closed reason=%s up=%d down=%d",
            self.sandbox_id,
            final,
            conn.up,
            conn.down,
        )
        if row is not None and self._audit is not None:
            self._audit.update_egress(row, reason=final, bytes_up=conn.up, bytes_down=conn.down)

    def _flood_ok(self, reason: str) -> bool:
        second = int(time.monotonic())
        at, n = self._flood.get(reason, (second, 0))
        if at != second:
            at, n = second, 0
        self._flood[reason] = (at, n + 1)
        return n < _FLOOD_ROWS_PER_SECOND

    # -- serving ---------------------------------------------------------------------------

    async def _serve(self, conn: _Conn, plain: PlainStream) -> None:
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                first = await plain.read(1)
        except (TimeoutError, OSError, ConnectionError):
            return
        if not first:
            return
        if first[0] == socks.VERSION:  # no HTTP request starts with it
            conn.count(up=1)
            await self._socks(conn, plain)
            return
        client = _Prefixed(plain, first)
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes)
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                event = await next_request(h, client, conn, self.config.max_header_bytes)
        except FramingError as exc:
            # Ambiguous or malformed head: refused before anything is dialed (issue 17).
            self._decision(None, None, None, allowed=False, reason=exc.reason)
            await send_refusal(client, 400, exc.reason)
            return
        except (TimeoutError, h11.RemoteProtocolError):
            await send_refusal(client, 400, "bad_request")
            return
        if not isinstance(event, h11.Request):
            return
        method = event.method.decode("ascii", "replace")
        if not self._rate.take():
            self._decision(method, None, None, allowed=False, reason="rate_limited")
            await send_refusal(client, 429, "rate_limited")
            return
        if method == "CONNECT":
            await self._connect(conn, client, h, event)
        else:
            await self._plain(conn, client, h, event)

    async def _resolve_and_decide(
        self, conn: _Conn, method: str, dest: HostPort, tcp: bool = False
    ) -> IPAddress:
        """Steps 2-3 of the module doc: name decision, one resolution, address decision
        (``tcp``: a raw TCP destination, decided by ``allow_tcp``)."""
        conn.dest = dest
        conn.tcp = tcp
        verdict = (decide_tcp_name if tcp else decide_name)(self._policy, dest)
        if not verdict.allowed:
            raise Refused(403, verdict.reason)
        addrs = await resolve_once(dest, self._resolver, self.config.resolve_timeout)
        verdict = self._decide(dest, addrs, tcp=tcp)
        if not verdict.allowed:
            raise Refused(403, verdict.reason)
        conn.ip = verdict.addresses[0]
        return conn.ip

    async def _dial(
        self, ip: IPAddress, dest: HostPort, tls: bool
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to exactly ``ip`` (never the name); TLS verified against ``dest.host``."""
        ctx = self._upstream_context() if tls else None
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                return await asyncio.open_connection(
                    str(ip),
                    dest.port,
                    ssl=ctx,
                    server_hostname=dest.host if tls else None,
                    limit=READ_SIZE,
                )
        except ssl.SSLError as exc:
            raise Refused(502, "upstream_tls_failed") from exc
        except (OSError, TimeoutError) as exc:
            raise Refused(502, "upstream_connect_failed") from exc

    def _forwarder(
        self,
        conn: _Conn,
        client: ByteStream,
        h: h11.Connection,
        dest: HostPort,
        ip: IPAddress,
        *,
        tls: bool,
    ) -> Forwarder:
        """The HTTP exchange of ``conn`` to its decided ``dest`` (intercepted when ``tls``)."""

        def recheck() -> None:
            # Each request on a kept-alive intercepted connection: the rate limit, and the
            # policy again once it has been updated.
            if not self._rate.take():
                raise Refused(429, "rate_limited")
            if self._policy_gen and not self._still_allowed(conn):
                raise Refused(403, "policy_updated")

        return Forwarder(
            conn,
            client,
            h,
            dest,
            ip,
            tls,
            broker=self._broker,
            record=self._decision,
            dial=self._dial,
            recheck=recheck if tls else None,
        )

    def _upstream_context(self) -> ssl.SSLContext:
        if self._upstream_ctx is None:
            ctx = ssl.create_default_context(cafile=self.config.upstream_ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_alpn_protocols(["http/1.1"])
            self._upstream_ctx = ctx
        return self._upstream_ctx

    # -- CONNECT ---------------------------------------------------------------------------

    async def _connect(
        self, conn: _Conn, client: PlainStream, h: h11.Connection, req: h11.Request
    ) -> None:
        """CONNECT: decide, say 200, check the ClientHello, and only then dial."""
        dest: HostPort | None = None
        ip: IPAddress | None = None
        try:
            try:
                dest = parse_authority(req.target.decode("ascii"), None)
            except (InvalidArgumentError, UnicodeDecodeError) as exc:
                raise Refused(400, "bad_target") from exc
            # An HTTP(S) rule first; else an allow_tcp entry makes it a raw TCP tunnel.
            raw = not decide_name(self._policy, dest).allowed and (
                decide_tcp_name(self._policy, dest).allowed
            )
            if raw and self._tcp_tunnels() >= self.config.max_tcp_tunnels:
                raise Refused(429, "too_many_tcp_tunnels")
            ip = await self._resolve_and_decide(conn, "CONNECT", dest, tcp=raw)
        except Refused as r:
            self._decision("CONNECT", dest, ip, allowed=False, reason=r.reason)
            await send_refusal(client, r.status, r.reason)
            return
        if raw:
            await client.write(h.send(h11.Response(status_code=200, headers=[])) or b"")
            await self._raw(conn, client, dest, ip, "CONNECT", h.trailing_data[0])
            return
        intercept = dest.kind is HostKind.NAME and self._broker.intercepts(dest.host)
        await client.write(h.send(h11.Response(status_code=200, headers=[])) or b"")
        # Nothing leaves the host before the client has shown the SNI it will use: the
        # gateway is no port scanner and no connection amplifier.
        hello = await self._check_hello(conn, client, dest, h.trailing_data[0], intercept)
        if isinstance(hello, str):
            self._decision("CONNECT", dest, ip, allowed=False, reason=hello)
            return
        if intercept:
            await self._intercept(conn, client, dest, ip, hello.raw)
            return
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                # Dial exactly the checked address (invariant 2), never the name.
                pump = await open_pump(
                    str(ip), dest.port, client.writer, lambda n: conn.count(down=n)
                )
        except (OSError, TimeoutError):
            self._decision("CONNECT", dest, ip, allowed=False, reason="upstream_connect_failed")
            return
        row = self._decision("CONNECT", dest, ip, allowed=True, reason="tunnel")
        try:
            conn.count(up=len(hello.raw))
            await pump.write(hello.raw)
            await self._tunnel(conn, client, pump)
        except (OSError, ConnectionError):
            pass
        finally:
            pump.close()
            self._finish(row, conn, "tunnel")

    # -- raw TCP (issue 15) ------------------------------------------------------------------

    def _tcp_tunnels(self) -> int:
        return sum(1 for c in self._conns if c.tcp)

    async def _socks(self, conn: _Conn, client: PlainStream) -> None:
        """A SOCKS5 CONNECT: decided by ``allow_tcp`` only (``internet_access`` and HTTP rules
        never open raw TCP)."""
        dest: HostPort | None = None
        ip: IPAddress | None = None
        try:
            try:
                async with asyncio.timeout(self.config.handshake_timeout):
                    request = await socks.read_request(client)
            except TimeoutError:
                raise socks.SocksError("socks_timeout", None) from None
            except (OSError, ConnectionError):
                raise socks.SocksError("client_closed", None) from None
            conn.count(up=request.size - 1)
            dest = request.dest
            if not self._rate.take():
                raise socks.SocksError("rate_limited", socks.Reply.GENERAL_FAILURE)
            if self._tcp_tunnels() >= self.config.max_tcp_tunnels:
                raise socks.SocksError("too_many_tcp_tunnels", socks.Reply.GENERAL_FAILURE)
            try:
                ip = await self._resolve_and_decide(conn, "SOCKS", dest, tcp=True)
            except Refused as r:
                code = socks.Reply.NOT_ALLOWED
                if r.reason in ("no_address", "resolve_failed", "resolve_timeout"):
                    code = socks.Reply.HOST_UNREACHABLE
                raise socks.SocksError(r.reason, code) from None
        except socks.SocksError as exc:
            if exc.reason not in ("client_closed",):
                self._decision("SOCKS", dest, ip, allowed=False, reason=exc.reason)
            if exc.code is not None:
                with contextlib.suppress(OSError, ConnectionError):
                    await client.write(socks.reply(exc.code))
            return
        await self._raw(conn, client, dest, ip, "SOCKS", b"")

    async def _raw(
        self,
        conn: _Conn,
        client: PlainStream,
        dest: HostPort,
        ip: IPAddress,
        method: str,
        initial: bytes,
    ) -> None:
        """Dial exactly ``ip`` and pump raw bytes both ways; the client's first bytes pass the
        egress checks. A SOCKS client is answered here (an HTTP one got its 200 already)."""
        is_socks = method == "SOCKS"
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                # Dial exactly the checked address (invariant 2), never the name.
                pump = await open_pump(
                    str(ip), dest.port, client.writer, lambda n: conn.count(down=n)
                )
        except (OSError, TimeoutError):
            self._decision(method, dest, ip, allowed=False, reason="upstream_connect_failed")
            if is_socks:
                with contextlib.suppress(OSError, ConnectionError):
                    await client.write(socks.reply(socks.Reply.CONNECTION_REFUSED))
            return
        row = self._decision(method, dest, ip, allowed=True, reason="tcp")
        checked = _Inspected(client, self._check_raw)
        checked.seed(initial)  # a value split between the CONNECT head and the next read
        try:
            if is_socks:
                await client.write(socks.reply(socks.Reply.SUCCEEDED))
            if initial:  # pipelined after the CONNECT head (counted with it)
                self._check_raw(initial)
                await pump.write(initial)
            await self._tunnel(conn, checked, pump)
        except LeakBlockedError as exc:
            conn.end_reason = conn.end_reason or exc.channel
        except (OSError, ConnectionError):
            pass
        finally:
            pump.close()
            if checked.blocked is not None:
                conn.end_reason = conn.end_reason or checked.blocked
            self._finish(row, conn, "tcp")

    def _check_raw(self, data: bytes) -> None:
        """Egress checks on a raw TCP client's first bytes: a secret placeholder (no credential
        ever travels over raw TCP) or what the guard flags (canaries, registered values)."""
        if self._broker.foreign_placeholders(data, None):
            raise LeakBlockedError(["placeholder"], "secret_exfiltration")
        if self._inspect is not None:
            try:
                self._inspect(data)
            except LeakBlockedError:
                raise LeakBlockedError(["guard"], "blocked_by_guard") from None

    async def _check_hello(
        self, conn: _Conn, client: PlainStream, dest: HostPort, initial: bytes, intercept: bool
    ) -> ClientHello | str:
        """Read the first bytes of the tunnel; return a ClientHello or a refusal reason."""
        must_tls = intercept or dest.port in (80, 443)
        try:
            if must_tls or initial:
                async with asyncio.timeout(self.config.handshake_timeout):
                    hello = await read_client_hello(client, initial)
            else:
                # Other ports (explicitly allowed): a server-speaks-first protocol may wait.
                try:
                    async with asyncio.timeout(self.config.first_bytes_timeout):
                        hello = await read_client_hello(client, initial)
                except TimeoutError:
                    return ClientHello(b"", False, None)
        except (HelloError, TimeoutError):
            return "bad_tls_hello"
        except (EOFError, OSError, ConnectionError):
            return "client_closed"
        conn.touch()
        if not hello.is_tls:
            return "not_tls" if must_tls else hello
        if hello.sni is None:
            return hello if dest.is_ip else "sni_missing"
        try:
            sni = parse_authority(hello.sni, dest.port)
        except InvalidArgumentError:
            return "sni_mismatch"
        if sni.host != dest.host:
            return "sni_mismatch"
        return hello

    async def _tunnel(
        self, conn: _Conn, client: PlainStream, pump: UpstreamPump | SplicePump
    ) -> None:
        """Pump both ways until the upstream is done (a client half-close only half-closes)."""

        async def up() -> None:
            while data := await client.read(READ_SIZE):
                conn.count(up=len(data))
                await pump.write(data)
            pump.write_eof()

        t_up = asyncio.create_task(up())
        try:
            await asyncio.wait({t_up, pump.done}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done.done() and t_up.exception() is None:
                await pump.done
            with contextlib.suppress(OSError, ConnectionError, RuntimeError):
                async with asyncio.timeout(self.config.idle_timeout):
                    await client.writer.drain()
        finally:
            t_up.cancel()
            await asyncio.gather(t_up, return_exceptions=True)

    # -- interception (secret-bound hosts) -------------------------------------------------

    async def _intercept(
        self, conn: _Conn, client: PlainStream, dest: HostPort, ip: IPAddress, hello: bytes
    ) -> None:
        conn.count(up=len(hello))
        tls = TLSStream(self._ca.server_context(dest.host), client, server_side=True)
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                await tls.handshake(hello)
        except (ssl.SSLError, TimeoutError, OSError):
            self._decision("CONNECT", dest, ip, allowed=False, reason="client_tls_failed")
            return
        await self._broker.ready()  # the scrubber's matcher, compiled off the loop once
        upstream: PlainStream | None = None
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes)
        forwarder = self._forwarder(conn, tls, h, dest, ip, tls=True)
        try:
            while True:
                try:
                    event = await next_request(h, tls, conn, self.config.max_header_bytes)
                except FramingError as exc:
                    # Refused before the request reaches (or reuses) any upstream (issue 17).
                    self._decision(None, dest, ip, allowed=False, reason=exc.reason)
                    await send_refusal(tls, 400, exc.reason)
                    return
                if not isinstance(event, h11.Request):
                    return
                upstream = await forwarder.exchange(event, upstream, self._inspect)
                if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                    return
                h.start_next_cycle()
        except h11.RemoteProtocolError:
            # A malformed body (bad chunk framing): the exchange already cut its upstream.
            if h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                self._decision(None, dest, ip, allowed=False, reason="bad_request:body")
                await send_refusal(tls, 400, "bad_request:body")
            return
        except (Ended, h11.ProtocolError, ssl.SSLError, OSError, ConnectionError):
            return
        finally:
            if upstream is not None:
                await upstream.aclose()
            tls.close()

    # -- plain HTTP ------------------------------------------------------------------------

    async def _plain(
        self, conn: _Conn, client: PlainStream, h: h11.Connection, req: h11.Request
    ) -> None:
        method = req.method.decode("ascii", "replace")
        target = req.target.decode("ascii", "replace")
        if not target.lower().startswith(("http://", "https://")):
            self._decision(method, None, None, allowed=False, reason="not_a_proxy_request")
            await send_refusal(client, 400, "not_a_proxy_request")
            return
        try:
            scheme, dest, _path = parse_absolute_url(target)
        except InvalidArgumentError:
            self._decision(method, None, None, allowed=False, reason="bad_target")
            await send_refusal(client, 400, "bad_target")
            return
        if scheme != "http":
            self._decision(method, dest, None, allowed=False, reason="https_needs_connect")
            await send_refusal(client, 400, "https_needs_connect")
            return
        try:
            ip = await self._resolve_and_decide(conn, method, dest)
        except Refused as r:
            self._decision(method, dest, None, allowed=False, reason=r.reason)
            await send_refusal(client, r.status, r.reason)
            return
        upstream: PlainStream | None = None
        try:
            await self._broker.ready()  # the scrubber's matcher, compiled off the loop once
            forwarder = self._forwarder(conn, client, h, dest, ip, tls=False)
            upstream = await forwarder.exchange(req, None, self._inspect)
        except (Ended, h11.ProtocolError, OSError, ConnectionError):
            return
        finally:
            if upstream is not None:
                await upstream.aclose()


class _Prefixed(PlainStream):
    """A client stream whose first bytes were read already (to tell SOCKS from HTTP)."""

    def __init__(self, inner: PlainStream, prefix: bytes) -> None:
        super().__init__(inner.reader, inner.writer)
        self._prefix = prefix

    async def read(self, n: int) -> bytes:
        if self._prefix:
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            return out
        return await super().read(n)


class _Inspected(PlainStream):
    """The client side of a raw TCP tunnel: its first :data:`_INSPECT_BYTES` pass ``check``
    (with an overlap, so a value split between two reads is still seen). A refusal ends the
    tunnel; ``blocked`` says why."""

    _OVERLAP = 512

    def __init__(self, inner: PlainStream, check: Callable[[bytes], None]) -> None:
        super().__init__(inner.reader, inner.writer)
        self._inner = inner
        self._check = check
        self._left = _INSPECT_BYTES
        self._tail = b""
        self.blocked: str | None = None

    def seed(self, initial: bytes) -> None:
        """Bytes checked already (pipelined after a CONNECT head): the overlap's start."""
        self._tail = initial[-self._OVERLAP :]
        self._left -= len(initial)

    async def read(self, n: int) -> bytes:
        data = await self._inner.read(n)
        if data and self._left > 0:
            seen = self._tail + data
            try:
                self._check(seen)
            except LeakBlockedError as exc:
                self.blocked = exc.channel
                raise
            self._left -= len(data)
            self._tail = seen[-self._OVERLAP :]
        return data
