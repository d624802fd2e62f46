"""Binary results (PNG, JPEG, PDF, GIF, WebP): what their bytes say, and the parts to scan.

Trust domain: host engine; the bytes are hostile. Pure: parsers only, no guard state. Each
parser is one bounded pass (issue 17 §3): chunk and segment lengths are checked against the
data, decompression is capped per part and per file, and anything malformed or beyond a
cap is *unverifiable*, which the guard treats as a finding to fail closed on (the result is
dropped), never as "nothing found".

``parts(kind, data)`` lists what a scanner must look at besides the raw bytes: PNG text
chunks (zTXt/iTXt inflated), JPEG COM and APPn segments (EXIF, XMP, ICC), PDF literal and
hex strings of the file and of its FlateDecode streams (inflated; images skipped: pixels are
out of reach like PNG's), each with the byte span that holds it and whether that span can
be cut out while the file stays valid (PNG chunks, JPEG segments). ``strip`` lists spans to
cut whatever is found: PNG chunks of no registered type and bytes after the end marker.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from moat.guard import png

#: Signatures per result kind (the E2B result keys, plus GIF and WebP).
MAGIC: dict[str, tuple[bytes, ...]] = {
    "png": (png.PNG_SIGNATURE,),
    "jpeg": (b"\xff\xd8\xff",),
    "pdf": (b"%PDF-",),
    "gif": (b"GIF87a", b"GIF89a"),
    "webp": (b"RIFF",),
}
_MIME = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "application/pdf": "pdf",
    "image/gif": "gif",
    "image/webp": "webp",
}
#: Cap on all the bytes inflated from one file (a zip bomb stops here: unverifiable).
MAX_INFLATED = 32 << 20
#: PNG chunk types kept (PNG 1.2 and the 2022 edition's registered ones); others are cut.
_PNG_KEEP = frozenset(
    t.encode()
    for t in (
        "IHDR PLTE IDAT IEND tRNS cHRM gAMA iCCP sBIT sRGB cICP mDCv cLLi bKGD hIST pHYs "
        "sPLT eXIf tIME acTL fcTL fdAT tEXt zTXt iTXt"
    ).split()
)
_STREAM = re.compile(rb"stream\r?\n")
_STRING_START = re.compile(rb"[(<]")
_ESCAPES = {
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
    ord("b"): b"\b",
    ord("f"): b"\f",
}


class Unverifiable(Exception):
    """The bytes can't be parsed (or inflated) far enough to vouch for them."""


@dataclass(frozen=True)
class Part:
    """Bytes to scan, and the span of the file that holds them (``removable``: cutting the
    span leaves a valid file)."""

    start: int
    end: int
    data: bytes
    removable: bool


def kind_of(mime: str) -> str | None:
    """The result kind for a result key or MIME type ("png", "image/png"), or None."""
    mime = mime.strip().lower()
    if mime in MAGIC:
        return mime
    return _MIME.get(mime)


def magic_ok(kind: str, data: bytes) -> bool:
    """Whether ``data`` starts as a file of ``kind`` must."""
    if not any(data.startswith(m) for m in MAGIC[kind]):
        return False
    return kind != "webp" or data[8:12] == b"WEBP"


def parts(kind: str, data: bytes) -> tuple[list[Part], list[tuple[int, int]]]:
    """The parts of ``data`` to scan, and spans to cut in any case. Raises Unverifiable."""
    if kind == "png":
        return _png(data)
    if kind == "jpeg":
        return _jpeg(data)
    if kind == "pdf":
        return _pdf(data), []
    return [], []  # GIF, WebP: comments and metadata are raw text, found in the raw bytes


def _png(data: bytes) -> tuple[list[Part], list[tuple[int, int]]]:
    try:
        chunks = _png_chunks(data)
        out: list[Part] = []
        cut: list[tuple[int, int]] = []
        end = len(png.PNG_SIGNATURE)
        for chunk in chunks:
            if chunk.type not in _PNG_KEEP:
                cut.append((chunk.start, chunk.end))
            text = png.chunk_text(data, chunk)
            if text is not None:
                out.append(Part(chunk.start, chunk.end, text.encode("latin-1"), True))
            end = chunk.end
            if chunk.type == b"IEND":
                break
    except Exception as exc:  # InvalidArgumentError, zlib: all mean "can't vouch"
        raise Unverifiable("malformed PNG") from exc
    if end < len(data):
        cut.append((end, len(data)))  # bytes after IEND
    return out, cut


def _png_chunks(data: bytes) -> list[png.Chunk]:
    """The chunks of a PNG up to IEND (what follows is the caller's to cut)."""
    out = []
    pos = len(png.PNG_SIGNATURE)
    while pos < len(data):
        if pos + 12 > len(data):
            raise Unverifiable("truncated PNG")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + length
        if end > len(data):
            raise Unverifiable("truncated PNG")
        out.append(png.Chunk(pos, end, data[pos + 4 : pos + 8]))
        if data[pos + 4 : pos + 8] == b"IEND":
            return out
        pos = end
    raise Unverifiable("PNG without IEND")


def _jpeg(data: bytes) -> tuple[list[Part], list[tuple[int, int]]]:
    out: list[Part] = []
    pos = 2
    n = len(data)
    while pos < n:
        if data[pos] != 0xFF or pos + 1 >= n:
            raise Unverifiable("malformed JPEG")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            return out, [(pos + 2, n)] if pos + 2 < n else []
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        if pos + 4 > n:
            raise Unverifiable("truncated JPEG")
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        end = pos + 2 + length
        if length < 2 or end > n:
            raise Unverifiable("truncated JPEG")
        if marker == 0xFE or 0xE0 <= marker <= 0xEF:  # COM, APP0-15 (EXIF, XMP, ICC ...)
            out.append(Part(pos, end, data[pos + 4 : end], True))
        pos = end
        if marker == 0xDA:  # SOS: entropy-coded data up to the next real marker
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    raise Unverifiable("JPEG without an end marker")
                nxt = data[pos + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                    pos += 1 if nxt == 0xFF else 2
                    continue
                break
    raise Unverifiable("JPEG without an end marker")


def _pdf(data: bytes) -> list[Part]:
    """The strings of the file (outside streams) and each inflated non-image stream with
    its strings."""
    out: list[bytes] = []
    outside: list[bytes] = []
    budget = MAX_INFLATED
    pos = 0
    while True:
        m = _STREAM.search(data, pos)
        if m is None:
            outside.append(data[pos:])
            break
        end = data.find(b"endstream", m.end())
        if end < 0:
            raise Unverifiable("PDF stream without endstream")
        obj = data.rfind(b"obj", max(pos, m.start() - 4096), m.start())
        head = data[obj if obj >= 0 else max(pos, m.start() - 4096) : m.start()]
        outside.append(data[pos : m.start()])
        body = data[m.end() : end]
        if b"/Image" not in head:
            inflated = _pdf_stream(head, body, budget)
            budget -= len(inflated)
            out += (inflated, pdf_strings(inflated))
        pos = end + len(b"endstream")
    out.append(pdf_strings(b"".join(outside)))
    # One part for the whole file (a PDF can't lose a piece and stay valid): one scan, not
    # one per stream, however many tiny streams the file has.
    return [Part(0, len(data), b"\n".join(out), False)]


def _pdf_stream(head: bytes, body: bytes, budget: int) -> bytes:
    """A stream's content: as is when unfiltered, inflated for FlateDecode; other filters
    (or chains) are unverifiable."""
    filters = re.findall(rb"/(\w+Decode)\b", head)
    if not filters:
        return body
    if filters != [b"FlateDecode"]:
        raise Unverifiable("PDF stream filter not supported")
    d = zlib.decompressobj()
    try:
        text = d.decompress(body, budget + 1)
    except zlib.error as exc:
        raise Unverifiable("malformed PDF stream") from exc
    if len(text) > budget or d.unconsumed_tail:
        raise Unverifiable("PDF streams inflate past the cap")
    return text


def pdf_strings(data: bytes) -> bytes:
    """Every literal ``(...)`` and hex ``<...>`` string of PDF source, decoded and joined
    without separators (text shown with kerning, ``[(Tok) -20 (en)] TJ``, reads whole)."""
    out = bytearray()
    pos = 0
    n = len(data)
    while True:
        m = _STRING_START.search(data, pos)
        if m is None:
            return bytes(out)
        i = m.start()
        if data[i] == ord("<"):
            if data[i + 1 : i + 2] == b"<":
                pos = i + 2  # a dictionary
                continue
            end = data.find(b">", i)
            if end < 0:
                return bytes(out)
            digits = re.sub(rb"[^0-9A-Fa-f]", b"", data[i + 1 : end])
            if len(digits) % 2:
                digits += b"0"
            out += bytes.fromhex(digits.decode())
            pos = end + 1
            continue
        depth = 0
        j = i + 1
        while j < n:
            c = data[j]
            if c == 0x5C:  # backslash
                nxt = data[j + 1 : j + 2]
                if not nxt:
                    break
                k = nxt[0]
                if k in _ESCAPES:
                    out += _ESCAPES[k]
                    j += 2
                elif 0x30 <= k <= 0x37:
                    octal = re.match(rb"[0-7]{1,3}", data[j + 1 : j + 4])
                    assert octal is not None
                    out.append(int(octal.group(), 8) & 0xFF)
                    j += 1 + len(octal.group())
                elif k in (0x0A, 0x0D):
                    j += 2 + (k == 0x0D and data[j + 2 : j + 3] == b"\n")
                else:
                    out.append(k)
                    j += 2
                continue
            if c == 0x28:
                depth += 1
            elif c == 0x29:
                if depth == 0:
                    break
                depth -= 1
            out.append(c)
            j += 1
        pos = j + 1
