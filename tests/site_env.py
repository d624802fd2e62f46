"""The admin knobs for a host behind a site mirror (docs/templates.md), when this host is one.

On the development and CI machines the package registries resolve to a reserved address and
TLS is re-signed by a site CA; template builds there need ``MOAT_UNSAFE_BUILD_NETWORKS`` and
``MOAT_BUILD_CA_FILE``. The tests pass them, and ``make install`` uses
``python -m tests.site_env`` (which prints them as ``NAME=value`` words for ``env``) to build
the default templates. On a host that reaches the registries directly it prints nothing.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from pathlib import Path

from moat.egress.addr import AddrClass, classify
from moat.templates.build import BuildOptions


def _addresses(host: str) -> set[str]:
    for _ in range(5):
        try:
            return {str(a[4][0]) for a in socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)}
        except OSError:
            time.sleep(0.3)
    return set()


def site_options(**kw: object) -> BuildOptions:
    """The admin knobs for a host behind a site mirror, when this host is one."""
    nets = set()
    for host in ("deb.debian.org", "pypi.org", "files.pythonhosted.org"):
        for a in _addresses(host):
            if classify(ipaddress.ip_address(a)) is not AddrClass.PUBLIC:
                nets.add(ipaddress.ip_network(a))
    site_ca = any(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    ca = Path("/etc/ssl/certs/ca-certificates.crt") if site_ca else None
    return BuildOptions(unsafe_allow_networks=tuple(sorted(nets, key=str)), ca_file=ca, **kw)  # type: ignore[arg-type]


def site_env() -> dict[str, str]:
    """The same knobs as the environment variables ``moat template build`` reads."""
    opts = site_options()
    env = {}
    if opts.unsafe_allow_networks:
        env["MOAT_UNSAFE_BUILD_NETWORKS"] = ",".join(map(str, opts.unsafe_allow_networks))
    if opts.ca_file:
        env["MOAT_BUILD_CA_FILE"] = str(opts.ca_file)
    return env


if __name__ == "__main__":
    print(" ".join(f"{k}={v}" for k, v in site_env().items()))
