"""TLS pieces of the gateway: ClientHello SNI peeking and TLS over any byte stream.

Trust domain: host engine. The ClientHello comes from the sandbox and is parsed with bounds
checks on every length field; anything malformed is "not TLS" or an error, never a guess.
TLS termination runs over :class:`ssl.SSLObject` and memory BIOs rather than
``loop.start_tls`` so that it works on the lead's virtual streams (agent frames) as well as
on real sockets.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ByteStream", "ClientHello", "TLSStream", "parse_client_hello", "read_client_hello"]

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_MAX_HELLO = 64 * 1024


class HelloError(Exception):
    """The bytes started like TLS but are not a valid ClientHello (internal)."""


class ByteStream(Protocol):
    """A bidirectional byte stream (a plain socket, a virtual stream, or TLS over either)."""

    async def read(self, n: int) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ClientHello:
    """What the gateway learnt from the first bytes of a tunnel."""

    raw: bytes  # every byte read so far (to be passed on)
    is_tls: bool
    sni: str | None


def _u16(b: bytes, i: int) -> int:
    if i + 2 > len(b):
        raise HelloError("truncated")
    return int.from_bytes(b[i : i + 2], "big")


def parse_client_hello(body: bytes) -> str | None:
    """The SNI host name of a ClientHello handshake body (after the 4-byte header)."""
    i = 2 + 32  # legacy_version, random
    if i >= len(body):
        raise HelloError("truncated")
    i += 1 + body[i]  # session id
    i += 2 + _u16(body, i)  # cipher suites
    if i >= len(body):
        raise HelloError("truncated")
    i += 1 + body[i]  # compression methods
    if i == len(body):
        return None  # no extensions at all
    end = i + 2 + _u16(body, i)
    if end > len(body):
        raise HelloError("truncated extensions")
    i += 2
    sni: str | None = None
    seen: set[int] = set()
    while i < end:
        ext_type, ext_len = _u16(body, i), _u16(body, i + 2)
        i += 4
        if i + ext_len > end or ext_type in seen:
            raise HelloError("bad extension")
        seen.add(ext_type)
        if ext_type == 0:
            ext = body[i : i + ext_len]
            list_len = _u16(ext, 0)
            if list_len + 2 != len(ext) or len(ext) < 5 or ext[2] != 0:
                raise HelloError("bad server_name")
            name_len = _u16(ext, 3)
            if name_len + 5 != len(ext):
                raise HelloError("bad server_name")  # exactly one name, nothing else
            try:
                sni = ext[5:].decode("ascii")
            except UnicodeDecodeError as exc:
                raise HelloError("bad server_name") from exc
        i += ext_len
    return sni


async def read_client_hello(
    stream: ByteStream, initial: bytes, max_bytes: int = _MAX_HELLO
) -> ClientHello:
    """Read the first TLS handshake message (reassembled across records) and its SNI.

    Returns ``is_tls=False`` as soon as the first byte is not a TLS handshake record.
    Raises :class:`HelloError` for a malformed or oversized hello, EOFError on early EOF.
    """
    raw = bytearray(initial)

    async def need(n: int) -> None:
        while len(raw) < n:
            if n > max_bytes:
                raise HelloError("hello too large")
            data = await stream.read(65536)
            if not data:
                raise EOFError
            raw.extend(data)

    await need(1)
    if raw[0] != _HANDSHAKE:
        return ClientHello(bytes(raw), False, None)
    hs = bytearray()
    pos = 0
    hs_len: int | None = None
    while hs_len is None or len(hs) < hs_len + 4:
        await need(pos + 5)
        if raw[pos] != _HANDSHAKE or raw[pos + 1] != 3:
            raise HelloError("not a handshake record")
        rec_len = int.from_bytes(raw[pos + 3 : pos + 5], "big")
        if rec_len == 0 or rec_len > 16384 + 256:
            raise HelloError("bad record length")
        await need(pos + 5 + rec_len)
        hs.extend(raw[pos + 5 : pos + 5 + rec_len])
        pos += 5 + rec_len
        if hs_len is None and len(hs) >= 4:
            if hs[0] != _CLIENT_HELLO:
                raise HelloError("not a ClientHello")
            hs_len = int.from_bytes(hs[1:4], "big")
            if hs_len > max_bytes:
                raise HelloError("hello too large")
    if hs_len is None:
        raise HelloError("truncated")
    return ClientHello(bytes(raw), True, parse_client_hello(bytes(hs[4 : 4 + hs_len])))


class PlainStream:
    """:class:`ByteStream` over an asyncio reader and a (possibly virtual) writer."""

    def __init__(self, reader: asyncio.StreamReader, writer: _Writer) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" at EOF."""
        return await self.reader.read(n)

    async def write(self, data: bytes) -> None:
        """Write and wait for the buffer to drain."""
        self.writer.write(data)
        await self.writer.drain()

    def write_eof(self) -> bool:
        """Half-close if the writer can; returns whether it did."""
        can = getattr(self.writer, "can_write_eof", None)
        if can is not None and can():
            self.writer.write_eof()  # type: ignore[attr-defined]
            return True
        return False

    def close(self) -> None:
        """Close the writer (idempotent)."""
        if not self.writer.is_closing():
            self.writer.close()

    async def aclose(self, timeout: float = 2.0) -> None:
        """Close and wait (bounded) until the transport is really gone; past the bound, or
        when cancelled, abort it (a TLS peer that never answers close_notify must not keep
        the socket open: invariant 5)."""
        self.close()
        try:
            async with asyncio.timeout(timeout):
                await self.writer.wait_closed()
        except (OSError, ConnectionError, TimeoutError, ssl.SSLError):
            self.abort()
        except asyncio.CancelledError:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the connection at once (no TLS close_notify exchange)."""
        transport = getattr(self.writer, "transport", None)
        if isinstance(transport, asyncio.BaseTransport) and hasattr(transport, "abort"):
            transport.abort()


class _Writer(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    def is_closing(self) -> bool: ...

    async def wait_closed(self) -> None: ...


class TLSStream:
    """TLS over any :class:`ByteStream` with memory BIOs (server or client side)."""

    def __init__(
        self,
        ctx: ssl.SSLContext,
        inner: ByteStream,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self._inner = inner

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await self._inner.write(data)

    async def _fill(self) -> None:
        data = await self._inner.read(65536)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    async def handshake(self, initial: bytes = b"") -> None:
        """Run the handshake; ``initial`` are bytes already read from the peer."""
        if initial:
            self._in.write(initial)
        while True:
            try:
                self._obj.do_handshake()
                await self._flush()
                return
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()

    async def read(self, n: int) -> bytes:
        """Up to ``n`` plaintext bytes; b"" at EOF (clean or not)."""
        while True:
            try:
                return self._obj.read(n)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def write(self, data: bytes) -> None:
        """Encrypt and send ``data``."""
        view = memoryview(data)
        while view:
            try:
                sent = self._obj.write(view)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            view = view[sent:]
            await self._flush()

    def close(self) -> None:
        """Send close_notify if possible and close the inner stream."""
        try:
            self._obj.unwrap()
        except ssl.SSLError:
            pass
        data = self._out.read()
        if data and isinstance(self._inner, PlainStream) and not self._inner.writer.is_closing():
            self._inner.writer.write(data)
        self._inner.close()
