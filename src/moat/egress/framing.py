"""Strict HTTP/1.1 request heads: one reading of every message's framing, or a refusal.

Trust domain: host engine, pure (no I/O). A request head comes from the sandbox and is
hostile. A gateway that reads a message's length one way while the server behind it reads
it another way lets the sandbox hide a second request inside the first (request smuggling),
which the upstream then completes with the gateway's *next* request, headers and substituted
credential included (DESIGN invariant 3). h11 parses what it is given leniently (it accepts
``Content-Length`` together with ``Transfer-Encoding``, repeated equal lengths, bare LF line
ends and obs-fold), so every head passes :func:`check_request_head` before h11 sees it.

The rules follow RFC 9112 and the strictest proxies: refuse rather than repair.

- lines end in CRLF: a bare LF or a bare CR anywhere in the head is refused;
- no obs-fold (a field line starting with SP or HTAB);
- the request line is ``token SP target SP HTTP/1.x`` with a visible-ASCII target;
- field names are tokens, with nothing between the name and the colon;
- field values are visible ASCII or obs-text with inner SP/HTAB only: no NUL, CR, LF or
  other control bytes;
- at most one ``Content-Length``, a plain decimal number (no list, no sign);
- at most one ``Transfer-Encoding``, and then exactly ``chunked`` (the only coding the
  gateway decodes), never in an HTTP/1.0 request, never alongside ``Content-Length``.

Reasons are ``ambiguous_framing:<what>`` for the message-length rules, ``bad_header:<what>``
for syntax, ``bad_request:<what>`` for the request line.
"""

from __future__ import annotations

import re

__all__ = ["FramingError", "check_request_head", "head_end"]

#: RFC 9110 token characters.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Field value: visible ASCII and obs-text, SP/HTAB only between them (OWS already trimmed).
_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[ \t]*[\x21-\x7e\x80-\xff])*)?")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_DIGITS = re.compile(rb"[0-9]{1,18}")
#: The end of a head as h11 finds it (a blank line, with or without CR): everything up to
#: here is what h11 would parse as one head, so it is what must be checked.
_BLANK = re.compile(rb"\n\r?\n")


class FramingError(Exception):
    """A request head the gateway refuses (400); ``reason`` is the audit token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def head_end(buf: bytes | bytearray, pos: int = 0) -> int | None:
    """Length of the first head in ``buf`` (through its blank line), None if incomplete.

    A buffer starting with a line end is one (empty, invalid) head on its own. ``pos``:
    where to resume the search (no blank line starts before it).
    """
    if buf[:1] == b"\n":
        return 1
    if buf[:2] == b"\r\n":
        return 2
    m = _BLANK.search(buf, pos)
    return None if m is None else m.end()


def check_request_head(head: bytes) -> None:
    """Refuse (raise :class:`FramingError`) any head but one strict HTTP/1.1 reading.

    ``head`` is everything through the blank line (see :func:`head_end`).
    """
    if head in (b"\n", b"\r\n"):
        raise FramingError("bad_request:empty_line")
    if not head.endswith(b"\r\n\r\n"):
        raise FramingError("bad_header:bare_lf")
    lines = head[:-4].split(b"\r\n")
    for line in lines:
        if b"\n" in line:
            raise FramingError("bad_header:bare_lf")
    _check_request_line(lines[0])
    version = lines[0].rsplit(b" ", 1)[-1]
    lengths = 0
    codings: list[bytes] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise FramingError("bad_header:obs_fold")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise FramingError("bad_header:bad_name")
        value = value.strip(b" \t")
        if not _VALUE.fullmatch(value):
            raise FramingError("bad_header:bad_value")
        lname = name.lower()
        if lname == b"content-length":
            lengths += 1
            if lengths > 1:
                raise FramingError("ambiguous_framing:several_content_length")
            if not _DIGITS.fullmatch(value):
                raise FramingError("ambiguous_framing:bad_content_length")
        elif lname == b"transfer-encoding":
            codings.append(value)
    if codings:
        if len(codings) > 1:
            raise FramingError("ambiguous_framing:several_transfer_encoding")
        if codings[0].lower() != b"chunked":
            raise FramingError("ambiguous_framing:transfer_encoding_not_chunked")
        if lengths:
            raise FramingError("ambiguous_framing:cl_and_te")
        if version != b"HTTP/1.1":
            raise FramingError("ambiguous_framing:te_in_http10")


def _check_request_line(line: bytes) -> None:
    parts = line.split(b" ")
    if (
        len(parts) != 3
        or not _TOKEN.fullmatch(parts[0])
        or not _TARGET.fullmatch(parts[1])
        or not _VERSION.fullmatch(parts[2])
    ):
        raise FramingError("bad_request:request_line")
