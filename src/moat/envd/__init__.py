"""E2B envd's wire contract: messages and Connect RPC stubs (server and client) generated from
moat's ``proto/moat_envd`` by ``make proto``. Pure generated code, imported by the server's
handlers (``moat.server.rpc``) and by the SDK's HTTP transport; it imports nothing of moat.
"""

from __future__ import annotations
