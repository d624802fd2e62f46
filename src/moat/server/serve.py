"""Running the server: uvicorn on one loop that owns the engine, and a clean end.

SIGTERM or SIGINT stops accepting, kills every sandbox of the engine (invariant 5: nothing
survives the server), then gives open requests a few seconds to end.

``MOAT_SERVE_LOG=info`` turns on uvicorn's access log (one line per request, with the
client's address); the default is ``warning``. ``MOAT_SERVE_HEAD_TIMEOUT_S`` (default 30) is
how long a request's head may take to arrive, ``MOAT_SERVE_BODY_TIMEOUT_S`` (default 60) how
long its body may pause, before its connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import signal
import socket
import ssl
import sys
from collections.abc import Iterator

import uvicorn

from moat.engine.api import (
    FrontDoor,
    TenantPolicies,
    default_template,
    kill_everything,
    load_tenants,
    require_template,
)
from moat.errors import InvalidArgumentError, SandboxError
from moat.mcp import McpHttp, Settings
from moat.server import cut_log
from moat.server.app import ServerState, make_app
from moat.server.httpproto import BODY_TIMEOUT_S, HEAD_TIMEOUT_S, with_timeouts
from moat.store.keys import KeyStore

log = logging.getLogger("moat.server")

#: uvicorn's log levels that ``MOAT_SERVE_LOG`` may name.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

#: Seconds open requests (a streaming /execute) get after SIGTERM before they are cut.
GRACE_S = 5
#: Seconds an idle kept-alive connection stays open. Longer than the clients' own pools keep
#: one (the E2B Python SDK's transport, reqwest: 90 s; httpx 5 s; Node 4 s), so the client
#: always closes first. With uvicorn's 5 s, a call made ~5 s after the last one raced the
#: server's close and failed with "connection reset" (seen in E2B's own suite).
KEEP_ALIVE_S = 120


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, tls: bool = False) -> None:
    if not is_loopback(host) and not tls:
        bar = "!" * 78
        print(
            f"{bar}\n! moat serve is listening on {host}, not loopback, over PLAIN HTTP.\n"
            "! API keys and sandbox access tokens cross the network in the clear. Give it\n"
            "! --tls-cert/--tls-key, put it behind a TLS proxy, or bind 127.0.0.1.\n"
            f"{bar}",
            file=sys.stderr,
            flush=True,
        )


def log_level() -> str:
    level = os.environ.get("MOAT_SERVE_LOG", "warning").strip().lower()
    if level not in LOG_LEVELS:
        raise InvalidArgumentError(f"MOAT_SERVE_LOG must be one of {', '.join(LOG_LEVELS)}")
    return level


def read_timeouts() -> tuple[float, float]:
    """The head and body timeouts (``MOAT_SERVE_HEAD_TIMEOUT_S``, ``MOAT_SERVE_BODY_TIMEOUT_S``)."""
    out = []
    for name, default in (
        ("MOAT_SERVE_HEAD_TIMEOUT_S", HEAD_TIMEOUT_S),
        ("MOAT_SERVE_BODY_TIMEOUT_S", BODY_TIMEOUT_S),
    ):
        raw = os.environ.get(name, "").strip()
        try:
            value = float(raw) if raw else default
        except ValueError:
            value = 0.0
        if not 0 < value <= 3600:  # also refuses nan and inf
            raise InvalidArgumentError(f"{name} must be a number of seconds, 0 < s <= 3600")
        out.append(value)
    return out[0], out[1]


async def serve(
    host: str,
    port: int,
    tier: str | None,
    policy: TenantPolicies | None = None,
    tls: tuple[str, str] | None = None,
    mcp: Settings | None = None,
    cluster: str | None = None,
) -> None:
    """Serve until a signal; then kill every sandbox this server started. ``cluster``: the
    Ray address whose moat nodes host the sandboxes (``moat.cluster``)."""
    if cluster is not None:
        from moat.cluster.door import ClusterFrontDoor

        front: FrontDoor = ClusterFrontDoor(cluster, policy or TenantPolicies())  # type: ignore[assignment]
        await front.start(min_nodes=1)  # type: ignore[attr-defined]
    else:
        front = FrontDoor(policy=policy or TenantPolicies())
    keys = KeyStore()
    # Ingress host names (get_host): <port>-<sandbox id>.<domain>; under localhost by default,
    # which browsers and curl resolve to loopback without any DNS setup.
    domain = os.environ.get("MOAT_SERVE_DOMAIN") or f"moat.localhost:{port}"
    if not re.fullmatch(r"[a-z0-9.-]{1,200}(:[0-9]{1,5})?", domain):
        raise SystemExit("MOAT_SERVE_DOMAIN must be a lower-case host name with an optional :port")
    state = ServerState(front, keys, tier, domain)
    mcp_app = McpHttp(front, keys, mcp or Settings())
    state.mcp = mcp_app
    # Paused sandboxes outlive the server (issue 11): load them now, and report what a crash
    # left half-written (the scan removed it; the sandbox was still running then).
    for name in await asyncio.to_thread(front.paused_report):
        log.warning("removed a half-written paused state left by a crash: %s", name)
    builds = getattr(front, "template_builds", None)  # a cluster front door builds none
    if builds is not None:  # builds a dead server left read as interrupted (issue 12)
        if n := await asyncio.to_thread(builds.recover):
            log.warning("%d template build(s) were interrupted by the last stop", n)
    config = uvicorn.Config(
        make_app(state),
        host=host,
        port=port,
        lifespan="off",
        log_level=log_level(),
        timeout_graceful_shutdown=GRACE_S,
        timeout_keep_alive=KEEP_ALIVE_S,
        # llhttp through httptools, with h11's bound on a head and a time limit on it
        # (moat.server.httpproto)
        http=with_timeouts(*read_timeouts()),
        ws="wsproto",  # ingress WebSockets only (moat.server.ingress)
        server_header=False,  # nothing to advertise; an app's own Server header goes through
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
    )
    cut_log.install()  # after uvicorn's logging setup (moat.server.cut_log)
    server = _Server(config, front)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Held until the sandboxes are dead: a second signal must not cut the cleanup short.
        loop.add_signal_handler(sig, server.handle_exit, sig, None)
    try:
        async with mcp_app.running():  # the MCP sessions' task group (moat.mcp.server)
            await server.serve()
    finally:
        if cluster is not None:
            await front.engine.end_loop()  # the cluster's sandboxes (moat.cluster.door)
        else:
            await kill_everything(front.engine)
        keys.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handling: uvicorn re-raises a captured SIGTERM
    when it returns, which would end the process before the sandboxes are killed."""

    def __init__(self, config: uvicorn.Config, front: FrontDoor) -> None:
        super().__init__(config)
        self._front = front

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop accepting, kill the sandboxes (invariant 5), then let open requests end.

        Killed first, a sandbox ends the streams open on it (a background command, a
        running /execute) with its own end, so they close cleanly at once instead of
        being cut, mid-response, when the grace period runs out."""
        for server in self.servers:
            server.close()
        await self._front.engine.end_loop()
        await super().shutdown(sockets)


def _tls(cert: str | None, key: str | None) -> tuple[str, str] | None:
    """The certificate and key to serve HTTPS with, checked before anything starts: both or
    neither, each a readable PEM file that loads as a pair (else exit 2, never plain HTTP
    by mistake: invariant 7)."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        print("moat serve: --tls-cert and --tls-key go together", file=sys.stderr, flush=True)
        raise SystemExit(2)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        print(f"moat serve: the TLS certificate and key don't load: {exc}", file=sys.stderr,
              flush=True)  # fmt: skip
        raise SystemExit(2) from None
    return cert, key


def main(
    host: str,
    port: int,
    tier: str | None,
    policy_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    cluster: str | None = None,
) -> None:
    logging.basicConfig(level=logging.INFO, format="moat serve: %(message)s")
    tls = _tls(tls_cert, tls_key)
    try:
        log_level()  # a bad setting fails before anything starts
        read_timeouts()
    except InvalidArgumentError as exc:
        print(f"moat serve: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    policy_file = policy_file or None  # an empty $MOAT_TENANTS_FILE is unset
    try:  # a bad policy file stops the start (invariant 7: never "no limits" by mistake)
        policy = load_tenants(policy_file)
    except SandboxError as exc:
        print(f"moat serve: bad tenant policy: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:  # a bad MCP setting stops the start too (invariant 7)
        mcp = Settings.from_env()
        mcp.check()
    except SandboxError as exc:
        print(f"moat serve: bad MCP setting: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:  # a bad default template setting stops the start (invariant 7)
        default_template()
    except InvalidArgumentError as exc:
        print(f"moat serve: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    try:  # not built yet: creates that name no template fail clearly until it is
        require_template("default")
    except InvalidArgumentError as exc:
        print(f"moat serve: warning: {exc}", file=sys.stderr, flush=True)
    warn_if_exposed(host, tls is not None)
    rules = "none" if policy == TenantPolicies() else policy_file or "<state dir>/tenants.toml"
    scheme = "https" if tls else "http"
    print(f"moat serve: listening on {scheme}://{host}:{port} (tier: {tier or 'by trust'}; "
          f"tenant policy: {rules})", file=sys.stderr, flush=True)  # fmt: skip
    head = None
    if cluster == "local":  # a head on this host, itself a node (moat.cluster.launch)
        from moat.cluster.launch import start_local_head

        cluster, head = start_local_head()
    try:
        asyncio.run(serve(host, port, tier, policy, tls, mcp, cluster))
    finally:
        if head is not None:
            head()
    print("moat serve: stopped; every sandbox was killed", file=sys.stderr, flush=True)
