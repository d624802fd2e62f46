"""The environment a sandbox needs to use its egress gateway (pure).

Trust domain: host engine (builds values the sandbox will see; holds nothing secret).
"""

from __future__ import annotations

from moat.errors import InvalidArgumentError

__all__ = ["proxy_env"]


def proxy_env(proxy_port: int, ca_bundle_path: str) -> dict[str, str]:
    """Proxy and trust variables pointing at the agent's local proxy port and CA bundle.

    ``ca_bundle_path`` is the in-sandbox path of :meth:`Gateway.ca_bundle_pem` (system roots
    plus the per-sandbox CA). Secret placeholders come from :meth:`Gateway.placeholders`.
    """
    if isinstance(proxy_port, bool) or not isinstance(proxy_port, int):
        raise InvalidArgumentError("proxy port must be an integer")
    if not 1 <= proxy_port <= 65535:
        raise InvalidArgumentError("proxy port out of range")
    if not isinstance(ca_bundle_path, str) or not ca_bundle_path.startswith("/"):
        raise InvalidArgumentError("CA bundle path must be absolute")
    url = f"http://127.0.0.1:{proxy_port}"
    env = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = url
        env[name.lower()] = url
    env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1,::1"
    env["PIP_PROXY"] = url
    env["npm_config_proxy"] = env["npm_config_https_proxy"] = url
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT",
                 "NODE_EXTRA_CA_CERTS", "npm_config_cafile", "GIT_SSL_CAINFO"):  # fmt: skip
        env[name] = ca_bundle_path
    return env
