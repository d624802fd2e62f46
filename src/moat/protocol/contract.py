"""The sandbox contract: fixed places and ports every tier, the agent and the host agree on.

Pure constants, stdlib only: the in-sandbox agent imports them too (it ships with
``moat.protocol``), and ``moat.model`` re-exports them for callers.
"""

from __future__ import annotations

#: Where the agent's code is bound read-only inside every sandbox.
AGENT_DIR = "/opt/moat"
#: The sandbox user's home and working directory (writable, size-capped).
HOME = "/home/user"
#: uid/gid the sandboxed processes see (mapped to an unprivileged host id).
SANDBOX_UID = 1000
SANDBOX_GID = 1000
#: The sandbox-side proxy port the agent serves (HTTP(S)_PROXY points here).
PROXY_PORT = 3128
#: Where the agent writes the CA bundle (system roots + this sandbox's interception CA).
CA_BUNDLE_PATH = "/tmp/.moat/ca-bundle.pem"  # noqa: S108 - a path inside the sandbox

__all__ = ["AGENT_DIR", "CA_BUNDLE_PATH", "HOME", "PROXY_PORT", "SANDBOX_GID", "SANDBOX_UID"]
