"""Content codings of ``/files``: gzip both ways, as envd offers them (E2B-WIRE.md §2b).

``accepted`` picks the response coding from ``Accept-Encoding`` (RFC 9110 §12.5.3: identity
is acceptable unless refused with q=0); ``Inflater`` decodes a gzip request body piece by
piece with a hard cap on what it produces, so a small "gzip bomb" fails at the cap instead of
inflating in memory. Pure.
"""

from __future__ import annotations

import zlib

#: The codings moat serves and accepts besides identity.
SUPPORTED = ("gzip",)


class EncodingRefused(Exception):
    """No acceptable coding (406), or an unsupported or broken request coding (400)."""


class InflatedTooLarge(Exception):
    """The decoded body passed its cap."""


def _coding(item: str) -> tuple[str, float]:
    name, _, params = item.partition(";")
    quality = 1.0
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "q":
            try:
                quality = float(value)
            except ValueError:
                quality = 0.0
            if not 0.0 <= quality <= 1.0:  # also NaN
                quality = 0.0
    return name.strip().lower(), quality


def accepted(header: str | None) -> str | None:
    """The coding to answer with ("gzip", or None for identity); EncodingRefused if the
    client refuses identity and accepts nothing moat has."""
    if not header or not header.strip():
        return None
    codings = sorted((_coding(i) for i in header.split(",") if i.strip()), key=lambda c: -c[1])
    refused = {name for name, q in codings if q == 0.0}
    for name, quality in codings:
        if quality == 0.0:
            continue
        if name == "identity":
            return None
        if name in SUPPORTED:
            return name
        if name == "*":
            return SUPPORTED[0] if "identity" in refused else None
    if "identity" in refused or "*" in refused:
        raise EncodingRefused("no acceptable encoding found, supported: gzip")
    return None


def request_coding(header: str | None) -> str | None:
    """The request body's coding ("gzip" or None); EncodingRefused for anything else."""
    name = _coding(header or "")[0]
    if name in ("", "identity"):
        return None
    if name not in SUPPORTED:
        raise EncodingRefused("unsupported Content-Encoding, supported: gzip")
    return name


class Inflater:
    """gzip (one member or several in a row) to bytes, never more than ``cap`` in all."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.total = 0
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._members = 0  # members decoded to their end
        self._open = False  # bytes of the current member were fed

    def feed(self, data: bytes) -> bytes:
        """The bytes ``data`` decodes to; InflatedTooLarge past the cap, EncodingRefused if
        it is not gzip."""
        out = bytearray()
        while data:
            self._open = True
            room = self.cap - self.total + 1  # one byte more than allowed: shows the excess
            try:
                piece = self._d.decompress(data, room)
            except zlib.error:
                raise EncodingRefused("the request body is not valid gzip") from None
            self.total += len(piece)
            if self.total > self.cap:
                raise InflatedTooLarge
            out += piece
            if self._d.eof:  # a member ended: what follows is the next member
                data = self._d.unused_data
                self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._members += 1
                self._open = False
            else:
                data = self._d.unconsumed_tail
        return bytes(out)

    def finish(self) -> None:
        """The body ended: EncodingRefused if it was empty or stopped inside a member."""
        if self._open or self._members == 0:
            raise EncodingRefused("the gzip body is truncated")
