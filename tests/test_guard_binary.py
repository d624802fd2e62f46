"""Binary results carry no registered value or canary to the caller (issue 17 §2).

Real files: PNG and PDF built with zlib and struct as their specifications lay them out, a
JPEG made by Pillow (``tests/golden/guard_tiny.jpg``), and figures saved by the system
Python's matplotlib (``savefig`` with metadata). Each carries a registered value or a canary
in a place a viewer shows or a parser reads; the guard must cut it or drop the result,
and must drop bytes that are not what their MIME type says.
"""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from tests.conftest import require

from moat.errors import LeakBlockedError
from moat.guard import Guard, GuardPolicy
from moat.guard import binary as gbin

VALUE = "Tok3n_Secret-Value/42+x"
JPEG = (Path(__file__).parent / "golden" / "guard_tiny.jpg").read_bytes()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def make_png(*extra: bytes, trailer: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + b"".join(extra)
        + _chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + _chunk(b"IEND", b"")
        + trailer
    )


def with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """``jpeg`` with one more segment right after SOI."""
    seg = bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + seg + jpeg[2:]


def make_pdf(text: str, *, title: str = "plot", compress: bool = True) -> bytes:
    """A one-page PDF showing ``text`` (split by kerning, as TJ arrays are) and a title."""
    half = len(text) // 2
    content = f"BT /F1 12 Tf 10 10 Td [({text[:half]}) -30 ({text[half:]})] TJ ET".encode()
    body = zlib.compress(content) if compress else content
    filt = b" /Filter /FlateDecode" if compress else b""
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 50] /Contents 4 0 R >>",
        b"<< /Length %d%s >>\nstream\n" % (len(body), filt) + body + b"\nendstream",
        b"<< /Title (" + title.encode() + b") /Producer <6d6f6174> >>",
    ]
    out = b"%PDF-1.4\n"
    for i, obj in enumerate(objs, 1):
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    return out + b"trailer << /Root 1 0 R /Info 5 0 R >>\n%%EOF\n"


def _guard(mode: str = "redact") -> tuple[Guard, list[str]]:
    g = Guard(GuardPolicy(mode=mode))  # type: ignore[arg-type]
    g.register(VALUE, "TOKEN")
    return g, [VALUE, g.canary("aws"), g.canary("github")]


def _clean(out: bytes | None, value: str) -> bool:
    if out is None:
        return True
    text = out.decode("latin-1")
    return value not in text and value.encode("utf-16-be").decode("latin-1") not in text


@pytest.mark.parametrize(
    "where", ["tEXt", "zTXt", "iTXt", "iTXt/compressed", "private chunk", "after IEND"]
)
def test_png_metadata_is_cut_and_the_image_stays(where: str) -> None:
    g, values = _guard()
    for value in values:
        v = value.encode()
        extra = {
            "tEXt": _chunk(b"tEXt", b"Comment\0" + v),
            "zTXt": _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(v)),
            "iTXt": _chunk(b"iTXt", b"Comment\0\0\0en\0\0" + v),
            "iTXt/compressed": _chunk(b"iTXt", b"Comment\0\1\0en\0\0" + zlib.compress(v)),
            "private chunk": _chunk(b"prVt", zlib.compress(v)),
            "after IEND": b"",
        }[where]
        data = make_png(extra, trailer=v if where == "after IEND" else b"")
        assert v in data or where in ("zTXt", "iTXt/compressed", "private chunk")
        out, findings = g.scan_binary_result("png", data)
        assert out is not None and out.startswith(b"\x89PNG")
        assert out == make_png(), where  # exactly the clean image
        if where != "private chunk":  # cut unseen: unregistered chunks go in any case
            assert findings and all(value not in repr(f) for f in findings)


def test_png_without_findings_passes_unchanged() -> None:
    g, _ = _guard()
    data = make_png(_chunk(b"tEXt", b"Software\0matplotlib"))
    assert g.scan_binary_result("image/png", data) == (data, [])


@pytest.mark.parametrize("marker", [0xFE, 0xE1, 0xED])
def test_jpeg_comment_and_app_segments_are_cut(marker: int) -> None:
    g, values = _guard()
    for value in values:
        payload = {
            0xFE: value.encode(),
            0xE1: b"Exif\0\0MM\0*" + b"\0" * 8 + value.encode("utf-16-le"),
            0xED: b"<x:xmpmeta><dc:title>" + value.encode() + b"</dc:title></x:xmpmeta>",
        }[marker]
        data = with_segment(JPEG, marker, payload)
        out, findings = g.scan_binary_result("jpeg", data)
        assert out == JPEG
        assert findings


def test_among_many_segments_only_the_one_holding_a_value_is_cut() -> None:
    """The parts of a file are scanned together (one pass, not one per part): a value is
    still found at a part's edge, after a part that ends in a word character, and only its
    own segment is cut."""
    g, values = _guard()
    filler = [with_segment(b"\xff\xd8", 0xFE, b"abc%d" % i)[2:] for i in range(2000)]
    clean = JPEG[:2] + b"".join(filler) + JPEG[2:]
    assert g.scan_binary_result("jpeg", clean) == (clean, [])  # control: nothing to cut
    for value in values:
        seg = with_segment(b"\xff\xd8", 0xFE, value.encode())[2:]
        data = JPEG[:2] + b"".join(filler[:1000]) + seg + b"".join(filler[1000:]) + JPEG[2:]
        out, findings = g.scan_binary_result("jpeg", data)
        assert findings, value
        assert out == clean


def test_jpeg_trailer_after_eoi_is_cut() -> None:
    g, values = _guard()
    out, findings = g.scan_binary_result("image/jpeg", JPEG + values[1].encode())
    assert out == JPEG and findings


@pytest.mark.parametrize("where", ["content", "content/uncompressed", "title", "hex"])
def test_pdf_with_a_value_is_dropped(where: str) -> None:
    g, values = _guard()
    for value in values:
        if where == "content":
            data = make_pdf(value)
        elif where == "content/uncompressed":
            data = make_pdf(value, compress=False)
        elif where == "title":
            data = make_pdf("hello", title=value.replace("(", "\\("))
        else:
            data = make_pdf("hello").replace(
                b"<6d6f6174>", b"<" + value.encode().hex().encode() + b">"
            )
        if where == "content":
            assert value.encode() not in data  # only inflated and joined can it be read
        out, findings = g.scan_binary_result("pdf", data)
        assert out is None, where
        assert findings


def test_clean_pdf_passes() -> None:
    g, _ = _guard()
    data = make_pdf("hello world")
    assert g.scan_binary_result("application/pdf", data) == (data, [])


@pytest.mark.parametrize(
    ("mime", "data"),
    [
        ("png", make_pdf("hello")),
        ("pdf", make_png()),
        ("jpeg", make_png()),
        ("png", b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR"),  # truncated
        ("jpeg", JPEG[:-2]),  # no end marker
        ("pdf", b"%PDF-1.4\n1 0 obj << /Filter /LZWDecode >> stream\nxx\nendstream"),
        ("image/tiff", b"II*\0"),
    ],
)
def test_mismatched_malformed_or_unknown_is_dropped(mime: str, data: bytes) -> None:
    g, _ = _guard()
    out, findings = g.scan_binary_result(mime, data)
    assert out is None
    assert findings and findings[0].detector.startswith("format:")


def test_zip_bomb_in_pdf_is_dropped_not_inflated() -> None:
    g, _ = _guard()
    bomb = zlib.compress(b"\0" * (gbin.MAX_INFLATED + 1024), 9)
    data = (
        b"%%PDF-1.4\n1 0 obj\n<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(bomb)
        + bomb
        + b"\nendstream\nendobj\n"
    )
    out, findings = g.scan_binary_result("pdf", data)
    assert out is None and findings[0].detector == "format:pdf"


def test_block_mode_raises() -> None:
    g, values = _guard("block")
    with pytest.raises(LeakBlockedError):
        g.scan_binary_result("png", make_png(_chunk(b"tEXt", b"c\0" + values[2].encode())))
    with pytest.raises(LeakBlockedError):
        g.scan_binary_result("pdf", make_pdf(values[1]))
    data = make_png()
    assert g.scan_binary_result("png", data) == (data, [])


def test_off_mode_passes() -> None:
    g = Guard(GuardPolicy(mode="off"))
    assert g.scan_binary_result("png", b"anything") == (b"anything", [])


_SYSTEM_PY = shutil.which("python3", path="/usr/bin")
_MPL = """
import io, sys, base64, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
value, fmt = sys.argv[1], sys.argv[2]
fig, ax = plt.subplots(figsize=(2, 1))
ax.plot([1, 2, 3])
meta = {"png": {"Comment": value}, "pdf": {"Title": value, "Subject": value},
        "jpg": None}[fmt]
if fmt == "pdf":
    ax.set_title(value)
buf = io.BytesIO()
kwargs = {"metadata": meta} if meta else {"pil_kwargs": {"comment": value.encode()}}
fig.savefig(buf, format=fmt, **kwargs)
sys.stdout.write(base64.b64encode(buf.getvalue()).decode())
"""


def _matplotlib(value: str, fmt: str) -> bytes:
    """A figure saved by the system Python's matplotlib (`make install` adds Debian's
    python3-matplotlib); missing, the test fails like any missing prerequisite."""
    require(None if _SYSTEM_PY else "no system Python", "the system Python (make install)")
    assert _SYSTEM_PY is not None
    proc = subprocess.run(
        [_SYSTEM_PY, "-c", _MPL, value, fmt], capture_output=True, text=True, timeout=120
    )
    require(
        None if proc.returncode == 0 else proc.stderr[-300:],
        "matplotlib in the system Python (Debian's python3-matplotlib, make install)",
    )
    return base64.b64decode(proc.stdout)


@pytest.mark.parametrize(("fmt", "mime"), [("png", "png"), ("jpg", "jpeg"), ("pdf", "pdf")])
def test_matplotlib_figures(fmt: str, mime: str) -> None:
    g, values = _guard()
    value = values[1]
    data = _matplotlib(value, fmt)
    out, findings = g.scan_binary_result(mime, data)
    assert findings
    assert _clean(out, value)
    if mime == "pdf":
        assert out is None
    else:
        assert out is not None and gbin.magic_ok(mime, out)
    clean = _matplotlib("just a title", fmt)
    assert clean is not None
    assert g.scan_binary_result(mime, clean)[0] is not None  # positive control: passes
