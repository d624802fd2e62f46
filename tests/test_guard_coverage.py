"""Each cheap re-encoding of a registered value or a canary is redacted (issue 17 §5).

A table of evasions, each made with the standard library or a real tool (``hexdump -C``),
not with the guard's own encoders: every form of every value must be gone from what the
guard releases, whole-text and streamed (one character at a time, at every chunk size
below, across chunk boundaries), with a positive control that the raw output held it.
"""

from __future__ import annotations

import base64
import codecs
import functools
import random
import shutil
import subprocess
from collections.abc import Callable
from html.entities import html5

import pytest

from moat.guard import Guard

VALUE = "Tok3n_Secret-Value/42+x"


def _hexdump(data: bytes) -> str:
    """``hexdump -C`` output (the real tool where installed, else its exact format)."""
    tool = shutil.which("hexdump")
    if tool:
        return subprocess.run(
            [tool, "-C"], input=data, capture_output=True, check=True
        ).stdout.decode()
    lines = []
    for off in range(0, len(data), 16):
        row = data[off : off + 16]
        left = " ".join(f"{b:02x}" for b in row[:8])
        right = " ".join(f"{b:02x}" for b in row[8:])
        asc = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{off:08x}  {left:<23}  {right:<23}  |{asc}|")
    lines.append(f"{len(data):08x}")
    return "\n".join(lines) + "\n"


def _entities(value: str) -> str:
    # The last name in alphabetical order of each character that has several.
    names = {v: k for k, v in sorted(html5.items()) if k.endswith(";")}
    return "".join(f"&{names[c]}" if c in names and not c.isalnum() else c for c in value)


def _b32(value: str, align: int) -> str:
    # The value at byte offset ``align`` of a longer base32-encoded stream, upper or lower.
    enc = base64.b32encode(b"ZZZZZ"[:align] + value.encode() + b"!pad!").decode()
    return enc if align % 2 else enc.lower()


def _between(sep: str) -> Callable[[str], str]:
    return lambda v: sep.join(v)


def _mixed_case_percent(v: str) -> str:
    return "".join(f"%{b:02X}" if i % 2 else f"%{b:02x}" for i, b in enumerate(v.encode()))


#: name -> text encoder. Each output must lose every trace of the value.
TEXT_FORMS: dict[str, Callable[[str], str]] = {
    "url/full/upper": lambda v: "".join(f"%{b:02X}" for b in v.encode()),
    "url/full/lower": lambda v: "".join(f"%{b:02x}" for b in v.encode()),
    "url/full/mixed": _mixed_case_percent,
    "json/u/lower": lambda v: "".join(f"\\u{ord(c):04x}" for c in v),
    "json/u/upper": lambda v: "".join(f"\\u{ord(c):04X}" for c in v),
    "c/U": lambda v: "".join(f"\\U{ord(c):08x}" for c in v),
    "c/x": lambda v: "".join(f"\\x{b:02x}" for b in v.encode()),
    "escapes/mixed": lambda v: "".join(
        (f"%{ord(c):02x}", f"\\x{ord(c):02X}", f"&#{ord(c)};", c)[i % 4] for i, c in enumerate(v)
    ),
    "html/dec": lambda v: "".join(f"&#{ord(c)};" for c in v),
    "html/hex": lambda v: "".join(f"&#x{ord(c):x};" for c in v),
    "html/HEX": lambda v: "".join(f"&#X{ord(c):X};" for c in v),
    "html/named": _entities,
    **{f"base32/{a}": functools.partial(_b32, align=a) for a in range(5)},
    "swapcase": str.swapcase,
    "upper": str.upper,
    "lower": str.lower,
    "rot13": lambda v: codecs.encode(v, "rot13"),
    **{f"zero-width/{ord(z):04x}": _between(z) for z in "\u200b\u200c\u200d\u2060\ufeff\u00ad"},
    "fullwidth": lambda v: "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in v),
    "ansi/16": lambda v: "".join(f"\x1b[3{i % 7 + 1}m{c}\x1b[0m" for i, c in enumerate(v)),
    "ansi/256": lambda v: "".join(f"\x1b[38;5;{196 + i % 30}m{c}" for i, c in enumerate(v)),
    "ansi/truecolor": lambda v: "".join(f"\x1b[38;2;255;{i};0m{c}" for i, c in enumerate(v)),
    "ansi/bold+spaces": lambda v: " \x1b[1m ".join(v),
    "hexdump -C": lambda v: _hexdump(b"\x00binary header \x01\x02" + v.encode() + b"\xff tail"),
    "hexdump -C/at 0": lambda v: _hexdump(v.encode()),
    "hex/colon": lambda v: ":".join(f"{b:02x}" for b in v.encode()),
    "hex/COLON": lambda v: ":".join(f"{b:02X}" for b in v.encode()),
    "hex/space": lambda v: " ".join(f"{b:02x}" for b in v.encode()),
}
#: name -> bytes encoder (file reads as bytes).
BYTE_FORMS: dict[str, Callable[[str], bytes]] = {
    "utf16le": lambda v: v.encode("utf-16-le"),
    "utf16be": lambda v: v.encode("utf-16-be"),
    "utf16/bom": lambda v: v.encode("utf-16"),
    "utf32le": lambda v: v.encode("utf-32-le"),
    "utf32be": lambda v: v.encode("utf-32-be"),
    "utf32/bom": lambda v: v.encode("utf-32"),
}


def _values(g: Guard) -> list[str]:
    g.register(VALUE, "TOKEN")
    return [VALUE, g.canary("aws"), g.canary("github"), g.canary("generic")]


def _leaks(out: str, value: str, encode: Callable[[str], str]) -> bool:
    enc = encode(value)
    core = enc[len(enc) // 4 : 3 * len(enc) // 4]  # any large piece of the encoding
    return value in out or enc in out or core in out


@pytest.mark.parametrize("name", sorted(TEXT_FORMS))
def test_text_form_is_redacted_whole(name: str) -> None:
    g = Guard()
    for value in _values(g):
        text = f"output before\n{TEXT_FORMS[name](value)}\nand after\n"
        assert _leaks(text, value, TEXT_FORMS[name])  # positive control
        out = g.redact_text(text, "stdout")
        assert not _leaks(out, value, TEXT_FORMS[name]), (name, out)
        assert "[REDACTED:" in out


@pytest.mark.parametrize("name", sorted(TEXT_FORMS))
def test_text_form_is_redacted_streamed(name: str) -> None:
    g = Guard()
    rng = random.Random(name)
    for value in _values(g):
        text = "x" * rng.randint(0, 3000) + TEXT_FORMS[name](value) + "\nafter\n"
        whole = g.redact_text(text, "stdout")
        for size in (1, 7, 64, 1000, 0):
            s = g.stream("stdout")
            out, pos = [], 0
            while pos < len(text):
                n = size or rng.randint(1, 300)
                out.append(s.feed(text[pos : pos + n]))
                pos += n
            out.append(s.flush())
            streamed = "".join(out)
            assert not _leaks(streamed, value, TEXT_FORMS[name]), (name, size)
            assert streamed == whole, (name, size)


@pytest.mark.parametrize("name", sorted(BYTE_FORMS))
def test_byte_form_is_redacted(name: str) -> None:
    g = Guard()
    for value in _values(g):
        enc = BYTE_FORMS[name](value)
        data = b"\x00\x01binary" + enc + b"\xfe\xff"
        assert enc in data
        out = g.redact_bytes(data, "file")
        assert enc not in out and enc[4:-4] not in out, name
        assert b"[REDACTED:" in out


def test_folding_does_not_hide_a_value_behind_a_bogus_escape() -> None:
    # "\x1b[" followed by digits and a letter reads as one CSI sequence: the value's first
    # characters would vanish if escape sequences were only removed.
    g = Guard()
    value = "1234ABCDsecretvalue"
    g.register(value, "V")
    out = g.redact_text(f"\x1b[{value}", "stdout")
    assert value not in out and "[REDACTED:V]" in out


def test_markdown_table_cells_are_not_hexdump_columns() -> None:
    g = Guard()
    g.register("hunter2hunter2", "PW")
    out = g.redact_text("| pw | hunter2hunter2 |\n00000000  | x |\n", "stdout")
    assert "hunter2hunter2" not in out
