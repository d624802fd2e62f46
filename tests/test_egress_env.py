"""The sandbox environment helper (pure)."""

from __future__ import annotations

import pytest

from moat.egress import proxy_env
from moat.errors import InvalidArgumentError


def test_proxy_env() -> None:
    env = proxy_env(3128, "/etc/ssl/moat-bundle.pem")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "PIP_PROXY"):
        assert env[name] == "http://127.0.0.1:3128"
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "NODE_EXTRA_CA_CERTS"):
        assert env[name] == "/etc/ssl/moat-bundle.pem"
    assert "127.0.0.1" in env["NO_PROXY"]


@pytest.mark.parametrize(("port", "path"), [(0, "/x"), (70000, "/x"), (True, "/x"), (80, "rel")])
def test_proxy_env_validates(port: int, path: str) -> None:
    with pytest.raises(InvalidArgumentError):
        proxy_env(port, path)
