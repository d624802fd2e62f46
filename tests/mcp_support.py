"""Helpers of the MCP tests: the official SDK's client over stdio (``moat mcp``) and over
streamable HTTP (``moat serve``'s ``/mcp``), and readers of its results."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, ImageContent, TextContent

#: A sandbox id as the tools print it.
SANDBOX_ID = re.compile(r"sandbox (sbx-[0-9a-f]+) ")


def stdio_params(*args: str) -> StdioServerParameters:
    """``moat mcp`` with ``args``, in this test run's environment (state dir, audit store)."""
    return StdioServerParameters(
        command=sys.executable, args=["-m", "moat.cli", "mcp", *args], env=dict(os.environ)
    )


@asynccontextmanager
async def http_client(
    url: str, key: str | None, *, bearer: bool = False, mode: str = "auto"
) -> AsyncIterator[Client]:
    """The SDK's client on ``url``/mcp with the tenant's key (``X-API-Key``, or
    ``Authorization: Bearer``); ``mode="legacy"`` speaks the session-ful handshake."""
    headers = {}
    if key is not None:
        headers = {"Authorization": f"Bearer {key}"} if bearer else {"X-API-Key": key}
    async with httpx2.AsyncClient(headers=headers, timeout=120) as http:
        transport = streamable_http_client(url + "/mcp", http_client=http)
        async with Client(transport, mode=mode) as client:
            yield client


def text(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


def images(result: CallToolResult) -> list[ImageContent]:
    return [c for c in result.content if isinstance(c, ImageContent)]


async def ok(client: Client, tool: str, **args: Any) -> str:
    """Call a tool that must succeed; its text."""
    result = await client.call_tool(tool, args)
    assert not result.is_error, text(result)
    return text(result)


async def failed(client: Client, tool: str, args: Any) -> str:
    """Call a tool that must fail as a tool error (never a crash); its text."""
    result = await client.call_tool(tool, args)
    assert result.is_error, text(result)
    shown = text(result)
    assert "Traceback (most recent call last)" not in shown or tool == "run_code"
    return shown


async def new_sandbox(client: Client, name: str | None = None) -> str:
    """create_sandbox; the new sandbox's id."""
    shown = await ok(client, "create_sandbox", **({"name": name} if name else {}))
    found = SANDBOX_ID.search(shown)
    assert found, shown
    return found.group(1)
