"""Canonical destinations: one spelling of every host name, address and port.

Trust domain: host engine. Input comes from the sandbox (hostile): CONNECT authorities,
absolute-form request targets and Host headers. Everything is parsed once, here, into a
:class:`HostPort`; the policy decides on that value alone (DESIGN invariant 2), so that
``127.1``, ``0x7f000001``, ``LOCALHOST.``, ``allowed@evil`` or ``[::ffff:7f00:1]`` cannot
mean one thing to the check and another to the dialler.

Rules (WHATWG-URL-like, stricter where it costs nothing):

- names are lower-cased, lose one trailing dot and are IDNA-encoded (UTS 46) to A-labels;
  only letters, digits and inner hyphens survive (no ``_``, ``%``, ``\\``, spaces);
- a name whose last label is numeric (or ``0x…``) is an IPv4 address in one of the
  ``inet_aton`` spellings (decimal, hex, octal, 1 to 4 parts) and is parsed as one; if that
  fails the name is refused rather than handed to a resolver;
- IPv6 literals only in brackets, without zone ids, written back in RFC 5952 form;
- userinfo (``user@host``) is not allowed in a CONNECT authority; in an absolute URL it is
  dropped and the part after the *last* ``@`` is the host (what every client dials).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum

import idna

from moat.errors import InvalidArgumentError

__all__ = [
    "HostKind",
    "HostPort",
    "canonical_host",
    "parse_absolute_url",
    "parse_authority",
]

_MAX_NAME = 253
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_NUMERIC_PART = re.compile(r"^(?:0[xX][0-9a-fA-F]*|[0-9]+)$")
_PORT = re.compile(r"^[0-9]{1,5}$")
# Characters that may appear in an authority before we look closer; anything else
# (whitespace, backslash, NUL, '%', '/', '?', '#') is refused outright.
_AUTHORITY_CHARS = re.compile(r"^[A-Za-z0-9.\-:\[\]@\u0080-\U0010ffff]+$")


class HostKind(StrEnum):
    """What a canonical host is."""

    NAME = "name"
    IPV4 = "ipv4"
    IPV6 = "ipv6"


@dataclass(frozen=True)
class HostPort:
    """A canonical destination. ``host`` is an A-label name, dotted-quad or bare IPv6."""

    host: str
    port: int
    kind: HostKind

    @property
    def is_ip(self) -> bool:
        """True for IPv4 and IPv6 literals."""
        return self.kind is not HostKind.NAME

    def authority(self) -> str:
        """``host:port`` with IPv6 in brackets (for logs and audit rows)."""
        if self.kind is HostKind.IPV6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _bad(what: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"invalid destination: {what}")


def _parse_ipv4_number(part: str) -> int:
    if part.startswith(("0x", "0X")):
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        if not all(c in "01234567" for c in part):
            raise _bad("bad octal IPv4 part")
        return int(part, 8)
    return int(part, 10)


def _parse_ipv4(host: str) -> ipaddress.IPv4Address:
    """The WHATWG IPv4 parser: 1 to 4 parts, each decimal, 0x-hex or 0-octal."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or any(not _NUMERIC_PART.match(p) for p in parts):
        raise _bad("bad IPv4 address")
    nums = [_parse_ipv4_number(p) for p in parts]
    if any(n > 255 for n in nums[:-1]) or nums[-1] >= 256 ** (5 - len(nums)):
        raise _bad("IPv4 address out of range")
    value = nums[-1]
    for i, n in enumerate(nums[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _ends_in_number(host: str) -> bool:
    last = host.split(".")[-1]
    return bool(last) and bool(_NUMERIC_PART.match(last))


def canonical_host(raw: str) -> tuple[str, HostKind]:
    """Canonicalise a host (no port). IPv6 must come in brackets. Raises InvalidArgumentError."""
    if not isinstance(raw, str) or not raw or len(raw) > 1024:
        raise _bad("empty or too long host")
    if raw.startswith("[") or raw.endswith("]"):
        if not (raw.startswith("[") and raw.endswith("]")):
            raise _bad("unbalanced brackets")
        inner = raw[1:-1]
        if "%" in inner or not inner or not all(c in "0123456789abcdefABCDEF:." for c in inner):
            raise _bad("bad IPv6 literal")
        try:
            v6 = ipaddress.IPv6Address(inner)
        except ValueError as exc:
            raise _bad("bad IPv6 literal") from exc
        return v6.compressed, HostKind.IPV6
    if not _AUTHORITY_CHARS.match(raw) or any(c in raw for c in ":[]@"):
        raise _bad("forbidden character in host")
    host = raw.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host or ".." in host or host.startswith("."):
        raise _bad("empty label")
    if _ends_in_number(host):
        return str(_parse_ipv4(host)), HostKind.IPV4
    try:
        ascii_host = idna.encode(host, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise _bad("bad international name") from exc
    ascii_host = ascii_host.lower().rstrip(".")
    if len(ascii_host) > _MAX_NAME or not all(_LABEL.match(lb) for lb in ascii_host.split(".")):
        raise _bad("bad host name")
    if _ends_in_number(ascii_host):
        # IDNA mapping can turn full-width digits into ASCII ones: parse again as IPv4.
        return str(_parse_ipv4(ascii_host)), HostKind.IPV4
    return ascii_host, HostKind.NAME


def _split_port(authority: str) -> tuple[str, str | None]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise _bad("unbalanced brackets")
        rest = authority[end + 1 :]
        if not rest:
            return authority, None
        if not rest.startswith(":"):
            raise _bad("garbage after IPv6 literal")
        return authority[: end + 1], rest[1:]
    if authority.count(":") > 1:
        raise _bad("IPv6 literals need brackets")
    host, sep, port = authority.partition(":")
    return host, (port if sep else None)


def _port(text: str | None, default: int | None) -> int:
    if text is None or text == "":
        if default is None:
            raise _bad("port required")
        return default
    if not _PORT.match(text) or not 1 <= int(text) <= 65535:
        raise _bad("bad port")
    return int(text)


def parse_authority(authority: str, default_port: int | None = None) -> HostPort:
    """Parse ``host[:port]`` (a CONNECT target or a Host header). No userinfo allowed."""
    if not isinstance(authority, str) or not authority or len(authority) > 1024:
        raise _bad("empty or too long authority")
    if "@" in authority:
        raise _bad("userinfo not allowed here")
    host_text, port_text = _split_port(authority)
    host, kind = canonical_host(host_text)
    return HostPort(host, _port(port_text, default_port), kind)


_SCHEMES = {"http": 80, "https": 443}


def parse_absolute_url(url: str) -> tuple[str, HostPort, str]:
    """Split an absolute-form request target into (scheme, destination, origin-form target).

    Userinfo is dropped: the host is what follows the last ``@`` of the authority.
    """
    if not isinstance(url, str) or len(url) > 16384 or any(ord(c) < 0x21 for c in url):
        raise _bad("bad request target")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise _bad("not an absolute http URL")
    end = len(rest)
    for stop in "/?#":
        i = rest.find(stop)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    if "\\" in authority:
        raise _bad("backslash in authority")
    authority = authority.rpartition("@")[2]
    dest = parse_authority(authority, _SCHEMES[scheme])
    tail = tail.partition("#")[0]
    if not tail.startswith("/"):
        tail = "/" + tail
    return scheme, dest, tail
