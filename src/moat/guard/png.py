"""Text metadata of PNG results: pixels pass through, tEXt/zTXt/iTXt chunks are scanned.

Trust domain: host engine; the PNG is hostile. Parsing is bounded: chunk lengths are checked
against the data, zTXt/iTXt decompression is capped, and anything malformed is treated as
"not a PNG we can vouch for" (the caller decides; ``Guard.guard_png`` fails closed).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from moat.errors import InvalidArgumentError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_TYPES = (b"tEXt", b"zTXt", b"iTXt")
#: Cap on one decompressed text chunk (a zip bomb in a zTXt chunk stops here).
MAX_TEXT = 1 << 20


@dataclass(frozen=True)
class Chunk:
    """One PNG chunk: its byte span in the file (length field to CRC) and type."""

    start: int
    end: int
    type: bytes


def chunks(data: bytes) -> list[Chunk]:
    """The chunks of a PNG, bounds-checked. Raises InvalidArgumentError if malformed."""
    if not data.startswith(PNG_SIGNATURE):
        raise InvalidArgumentError("not a PNG image")
    out = []
    pos = len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 12 > len(data):
            raise InvalidArgumentError("truncated PNG image")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + length
        if end > len(data):
            raise InvalidArgumentError("truncated PNG image")
        out.append(Chunk(pos, end, data[pos + 4 : pos + 8]))
        pos = end
    return out


def _inflate(payload: bytes) -> bytes:
    d = zlib.decompressobj()
    try:
        text = d.decompress(payload, MAX_TEXT)
    except zlib.error as exc:
        raise InvalidArgumentError("malformed PNG text chunk") from exc
    return text


def chunk_text(data: bytes, chunk: Chunk) -> str | None:
    """The keyword and text of a tEXt/zTXt/iTXt chunk, or None for other chunk types."""
    if chunk.type not in _TEXT_TYPES:
        return None
    body = data[chunk.start + 8 : chunk.end - 4]
    keyword, sep, rest = body.partition(b"\0")
    if not sep:
        raise InvalidArgumentError("malformed PNG text chunk")
    if chunk.type == b"tEXt":
        text = rest
    elif chunk.type == b"zTXt":
        text = _inflate(rest[1:])
    else:  # iTXt: flag, method, language\0, translated keyword\0, text
        if len(rest) < 2:
            raise InvalidArgumentError("malformed PNG text chunk")
        compressed = rest[0] == 1
        parts = rest[2:].split(b"\0", 2)
        if len(parts) != 3:
            raise InvalidArgumentError("malformed PNG text chunk")
        text = _inflate(parts[2]) if compressed else parts[2]
        keyword = keyword + b"\0" + parts[0] + b"\0" + parts[1]
    return (keyword + b"\0" + text).decode("latin-1")
