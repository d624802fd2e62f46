"""moat's MCP server: code execution tools for agent hosts (Claude, Cursor, VS Code, ...).

Trust domain: a face, like ``moat.server``: it calls only the engine's front door with the
caller's tenant, so the guard, egress policy, tier choice and limits apply unchanged
(DESIGN §3). ``moat mcp`` serves it over stdio; ``moat serve`` at ``/mcp`` (docs/mcp.md).
"""

from moat.mcp.server import McpHttp, build_server, serve_stdio
from moat.mcp.tools import Caller, Scope, Settings, Tools

__all__ = ["Caller", "McpHttp", "Scope", "Settings", "Tools", "build_server", "serve_stdio"]
