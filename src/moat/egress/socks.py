"""SOCKS5 (RFC 1928), the server side of the gateway's raw TCP endpoint (issue 15).

Trust domain: host engine; every byte comes from the sandbox and is hostile. Only what raw TCP
egress needs: no authentication (method 0: the stream is already the sandbox's own), the
CONNECT command, IPv4, IPv6 and domain-name targets. Everything else is refused with the
matching reply code; nothing is dialled here (the gateway decides and dials).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import IntEnum

from moat.egress.hostport import HostPort, parse_authority
from moat.egress.tls import ByteStream
from moat.errors import InvalidArgumentError

__all__ = ["VERSION", "Reply", "SocksError", "read_request", "reply"]

#: The first byte of every SOCKS5 greeting (an HTTP request never starts with it).
VERSION = 0x05
_NO_AUTH = 0x00
_NO_ACCEPTABLE = 0xFF
_CONNECT = 0x01
_IPV4, _NAME, _IPV6 = 0x01, 0x03, 0x04


class Reply(IntEnum):
    """RFC 1928 §6 reply codes moat uses."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class SocksError(Exception):
    """A request refused before any decision: ``reason`` for the audit row, ``code`` for the
    reply (None: the client broke the protocol, close without a reply)."""

    def __init__(self, reason: str, code: Reply | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(frozen=True)
class Request:
    """A checked CONNECT request: its canonical destination and how many bytes it took."""

    dest: HostPort
    size: int


async def _exact(stream: ByteStream, n: int, got: list[int]) -> bytes:
    buf = b""
    while len(buf) < n:
        data = await stream.read(n - len(buf))
        if not data:
            raise SocksError("client_closed", None)
        buf += data
    got[0] += n
    return buf


async def read_request(stream: ByteStream) -> Request:
    """Read the greeting and the CONNECT request after the version byte (already read);
    answer the greeting. Raises :class:`SocksError`."""
    got = [1]
    (count,) = await _exact(stream, 1, got)
    methods = await _exact(stream, count, got) if count else b""
    if _NO_AUTH not in methods:
        await stream.write(bytes([VERSION, _NO_ACCEPTABLE]))
        raise SocksError("socks_no_acceptable_method", None)
    await stream.write(bytes([VERSION, _NO_AUTH]))
    version, command, _reserved, kind = await _exact(stream, 4, got)
    if version != VERSION:
        raise SocksError("socks_bad_version", None)
    if command != _CONNECT:
        raise SocksError("socks_command_not_supported", Reply.COMMAND_NOT_SUPPORTED)
    if kind == _IPV4:
        host = str(ipaddress.IPv4Address(await _exact(stream, 4, got)))
    elif kind == _IPV6:
        host = f"[{ipaddress.IPv6Address(await _exact(stream, 16, got))}]"
    elif kind == _NAME:
        (length,) = await _exact(stream, 1, got)
        raw = await _exact(stream, length, got)
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            raise SocksError("bad_target", Reply.HOST_UNREACHABLE) from None
        if not host or any(c in host for c in ":/[]@ \\"):  # a name, nothing smuggled in
            raise SocksError("bad_target", Reply.HOST_UNREACHABLE)
    else:
        raise SocksError("socks_address_type_not_supported", Reply.ADDRESS_TYPE_NOT_SUPPORTED)
    port = int.from_bytes(await _exact(stream, 2, got), "big")
    if port == 0:
        raise SocksError("bad_target", Reply.HOST_UNREACHABLE)
    try:
        dest = parse_authority(f"{host}:{port}", None)
    except InvalidArgumentError:
        raise SocksError("bad_target", Reply.HOST_UNREACHABLE) from None
    return Request(dest, got[0])


def reply(code: Reply) -> bytes:
    """A reply with a zero bound address (the client learns nothing of the host's)."""
    return bytes([VERSION, code, 0x00, _IPV4, 0, 0, 0, 0, 0, 0])
