"""Every form in which a known sensitive value may show up in output.

Trust domain: host engine, pure functions. The list follows GitHub Actions' log masking (a
secret and its base64 forms at every alignment) and extends it with the encodings a program
reaches for when it prints data: hex, URL and JSON/HTML escaping, UTF-16 and reversal; and
(issue 17 §5) the spellings that escape *every* character as bytes or UTF-16 units (full
``%XX``, ``\\xXX``, ``\\uXXXX``), base32 at its five alignments, ROT13, colon- and
dash-separated hex and UTF-32. Per-character escapes of any mix (``\\UXXXXXXXX``, ``&#N;``,
``&#xN;``, named entities, and ``%XX``/``\\xXX``/``\\uXXXX`` of ASCII) are decoded by the
scanner instead (``moat.guard.scanner``: a decoded reading of the text). Matching is ASCII
case-insensitive, so ``%4b``/``%4B``, ``\\u004B``/``\\u004b``, lower-case base32 and a value
with its case swapped are one form each.
Whitespace obfuscation (one character per line, spaced letters, wrapped base64) is not a
form here: the matcher removes short whitespace runs from both patterns and output.
"""

from __future__ import annotations

import base64
import codecs
import html
import json
from urllib.parse import quote, quote_plus

#: Encoded forms shorter than this are dropped: a 5-character base64 fragment of a short
#: value would turn up by chance in random base64 output (the benign corpus measures it).
MIN_ENCODED_LEN = 8


def _b64_fragments(data: bytes) -> list[str]:
    """Base64 of ``data`` at the three byte alignments it can take inside a longer stream.

    For a value starting at byte offset ``a`` (mod 3) of whatever is encoded, only the
    characters whose 6 bits all come from the value are fixed; we keep exactly those.
    """
    out = []
    n = len(data)
    for a in range(3):
        enc = base64.b64encode(b"\0" * a + data).decode("ascii")
        start = -(-8 * a // 6)  # ceil: first character made only of the value's bits
        end = (8 * (a + n)) // 6  # floor: last character made only of the value's bits
        if end > start:
            out.append(enc[start:end])
    return out


def _b32_fragments(data: bytes) -> list[str]:
    """Base32 of ``data`` at its five byte alignments (5 bytes make 8 characters): only the
    characters made of the value's own bits, as for base64."""
    out = []
    n = len(data)
    for a in range(5):
        enc = base64.b32encode(b"\0" * a + data).decode("ascii")
        start = -(-8 * a // 5)
        end = (8 * (a + n)) // 5
        if end > start:
            out.append(enc[start:end])
    return out


def _utf32_text(value: str) -> str | None:
    """UTF-32 bytes of ``value`` read as UTF-8 (three NULs after each ASCII character)."""
    try:
        text = value.encode("utf-32-le").decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.strip("\0")


def _utf16_text(value: str) -> str | None:
    """UTF-16 bytes of ``value`` as they read once decoded as UTF-8 (NULs between ASCII).

    Little- and big-endian give the same core once the outer NULs are stripped; values
    with non-ASCII characters don't survive a UTF-8 decoding, so they have no text form.
    """
    try:
        text = value.encode("utf-16-le").decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.strip("\0")


def text_forms(value: str) -> dict[str, str]:
    """Forms of ``value`` to look for in text output, keyed by form; raw form first."""
    raw = value.encode("utf-8")
    forms: dict[str, str] = {"raw": value}
    candidates: list[tuple[str, str]] = []
    for i, frag in enumerate(_b64_fragments(raw)):
        candidates.append((f"base64/{i}", frag))
        candidates.append((f"base64url/{i}", frag.replace("+", "-").replace("/", "_")))
    hexed = raw.hex()
    candidates += [("hex", hexed), ("HEX", hexed.upper())]
    candidates += [
        ("url", quote(value, safe="")),
        ("url/path", quote(value, safe="/")),
        ("url/plus", quote_plus(value, safe="")),
        ("url/component", quote(value, safe="!'()*-._~")),
        ("url/lower", _lower_percent(quote(value, safe=""))),
        ("json", json.dumps(value)[1:-1]),
        ("json/ascii", json.dumps(value, ensure_ascii=True)[1:-1]),
        ("json/utf8", json.dumps(value, ensure_ascii=False)[1:-1]),
        ("html", html.escape(value, quote=True)),
        ("html/noquote", html.escape(value, quote=False)),
        ("reversed", value[::-1]),
    ]
    # Every character escaped (issue 17 §5): what an encoder told to escape all emits.
    units = value.encode("utf-16-le", "surrogatepass")
    candidates += [
        ("url/full", "".join(f"%{b:02X}" for b in raw)),
        (
            "json/full",
            "".join(f"\\u{units[i + 1]:02x}{units[i]:02x}" for i in range(0, len(units), 2)),
        ),
        ("c/x", "".join(f"\\x{b:02x}" for b in raw)),
        ("rot13", codecs.encode(value, "rot13")),
        ("hex/colon", ":".join(f"{b:02x}" for b in raw)),
        ("hex/dash", "-".join(f"{b:02x}" for b in raw)),
    ]
    for i, frag in enumerate(_b32_fragments(raw)):
        candidates.append((f"base32/{i}", frag))
    utf16 = _utf16_text(value)
    if utf16 is not None:
        candidates.append(("utf16", utf16))
    utf32 = _utf32_text(value)
    if utf32 is not None:
        candidates.append(("utf32", utf32))
    seen = {value}
    for name, form in candidates:
        if form in seen or len(form) < MIN_ENCODED_LEN:
            continue
        seen.add(form)
        forms[name] = form
    return forms


def _lower_percent(text: str) -> str:
    """``%2F`` → ``%2f``: some encoders emit lower-case escapes."""
    parts = text.split("%")
    return parts[0] + "".join("%" + p[:2].lower() + p[2:] for p in parts[1:])


def byte_forms(value: str) -> dict[str, bytes]:
    """Forms of ``value`` to look for in binary data (file reads in bytes).

    Every text form as UTF-8, plus raw UTF-16 and UTF-32 (both byte orders).
    """
    forms = {name: form.encode("utf-8") for name, form in text_forms(value).items()}
    extra = {
        "utf16le": value.encode("utf-16-le"),
        "utf16be": value.encode("utf-16-be"),
        "utf32le": value.encode("utf-32-le"),
        "utf32be": value.encode("utf-32-be"),
    }
    seen = set(forms.values())
    for name, data in extra.items():
        core = data.strip(b"\0")
        if core not in seen and len(core) >= MIN_ENCODED_LEN:
            seen.add(core)
            forms[name] = core
    return forms
