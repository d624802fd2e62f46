"""``moat mcp``: the MCP server on stdio, with its settings checked before it starts."""

from __future__ import annotations

import asyncio
import logging
import sys

from moat.errors import SandboxError
from moat.mcp.server import serve_stdio
from moat.mcp.tools import Settings
from moat.store.keys import TENANT_PATTERN

__all__ = ["main"]


def main(
    tenant: str,
    trust: str | None,
    isolation: str | None,
    profile: str | None,
    policy_file: str | None,
) -> None:
    # stdout is the MCP stream: every log line goes to stderr (the agent host's log).
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="moat mcp: %(message)s")
    if not TENANT_PATTERN.fullmatch(tenant):
        _fail("--tenant must be 1-64 letters, digits, '_', '.' or '-'")
    settings = Settings(profile=profile, trust=trust, isolation=isolation, policy_file=policy_file)
    try:  # a bad profile stops the start (invariant 7: never a default tier by mistake)
        settings.check()
    except SandboxError as exc:
        _fail(f"{type(exc).__name__}: {exc}")
    asyncio.run(serve_stdio(settings, tenant))


def _fail(message: str) -> None:
    print(f"moat mcp: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)
