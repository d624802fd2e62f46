"""Running the server: uvicorn on one loop that owns the engine, and a clean end.

SIGTERM or SIGINT stops accepting, gives open requests a few seconds, then kills every
sandbox of the engine (invariant 5: nothing survives the server).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from collections.abc import Iterator

import uvicorn

from moat.engine.api import FrontDoor, TenantPolicies, kill_everything, load_tenants
from moat.errors import SandboxError
from moat.server.app import ServerState, make_app
from moat.store.keys import KeyStore

log = logging.getLogger("moat.server")

#: Seconds open requests (a streaming /execute) get after SIGTERM before they are cut.
GRACE_S = 5


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str) -> None:
    if not is_loopback(host):
        bar = "!" * 78
        print(
            f"{bar}\n! moat serve is listening on {host}, not loopback, over PLAIN HTTP.\n"
            "! API keys and sandbox access tokens cross the network in the clear. Put it\n"
            f"! behind TLS (a reverse proxy) or bind 127.0.0.1.\n{bar}",
            file=sys.stderr,
            flush=True,
        )


async def serve(
    host: str, port: int, tier: str | None, policy: TenantPolicies | None = None
) -> None:
    """Serve until a signal; then kill every sandbox this server started."""
    front = FrontDoor(policy=policy or TenantPolicies())
    keys = KeyStore()
    state = ServerState(front, keys, tier)
    config = uvicorn.Config(
        make_app(state),
        host=host,
        port=port,
        lifespan="off",
        log_level="warning",
        timeout_graceful_shutdown=GRACE_S,
        http="h11",
        ws="none",
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Held until the sandboxes are dead: a second signal must not cut the cleanup short.
        loop.add_signal_handler(sig, server.handle_exit, sig, None)
    try:
        await server.serve()
    finally:
        await kill_everything(front.engine)
        keys.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handling: uvicorn re-raises a captured SIGTERM
    when it returns, which would end the process before the sandboxes are killed."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def main(host: str, port: int, tier: str | None, policy_file: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="moat serve: %(message)s")
    policy_file = policy_file or None  # an empty $MOAT_TENANTS_FILE is unset
    try:  # a bad policy file stops the start (invariant 7: never "no limits" by mistake)
        policy = load_tenants(policy_file)
    except SandboxError as exc:
        print(f"moat serve: bad tenant policy: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    warn_if_exposed(host)
    rules = "none" if policy == TenantPolicies() else policy_file or "<state dir>/tenants.toml"
    print(f"moat serve: listening on http://{host}:{port} (tier: {tier or 'by trust'}; "
          f"tenant policy: {rules})", file=sys.stderr, flush=True)  # fmt: skip
    asyncio.run(serve(host, port, tier, policy))
    print("moat serve: stopped; every sandbox was killed", file=sys.stderr, flush=True)
