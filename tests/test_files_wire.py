"""The pure parts of the files wire (E2B-WIRE.md §2b): signatures, codings, multipart, metadata.

Fast, no sandbox: the end-to-end checks through a real ``moat serve`` and the real E2B SDK
are in tests/test_server_files.py.
"""

from __future__ import annotations

import gzip
import zlib

import pytest

from moat.errors import InvalidArgumentError
from moat.model import validate as v
from moat.protocol import metadata as meta
from moat.protocol.frames import MsgType, ProtocolError
from moat.protocol.replies import check_reply
from moat.server.encoding import (
    EncodingRefused,
    InflatedTooLarge,
    Inflater,
    accepted,
    request_coding,
)
from moat.server.files import parse_parts
from moat.server.signing import SignatureRefused, find, sign

# -- signatures ------------------------------------------------------------------------------


def test_signature_matches_e2bs_test_vector() -> None:
    # From E2B's secure.test.ts (E2B-WIRE.md §2b): path, op, user, token -> signature.
    token = "0tQG31xiMp0IOQfaz9dcwi72L1CPo8e0"
    got = sign("hello.txt", "read", "user", token, None)
    assert got == "v1_gUtH/s9YCJWgCizjfUxuWfhFE4QSydOWEIIvfLwDr6E"


def test_signature_matches_the_sdks_own_signer() -> None:
    from e2b.sandbox.signature import get_signature

    for user in (None, "user"):
        for exp in (None, 60):
            want = get_signature("a/b.txt", "write", user, "tok", exp)
            assert sign("a/b.txt", "write", user, "tok", want["expiration"]) == want["signature"]


def test_find_picks_the_signing_sandbox_and_refuses_the_rest() -> None:
    cands = [("s1", "token-one"), ("s2", "token-two")]
    sig = sign("f.txt", "read", None, "token-two", None)
    kw = {"path": "f.txt", "user": None, "expiration": None}
    assert find(cands, sig, ops=("read",), **kw) == "s2"  # type: ignore[arg-type]
    for changed in (
        {"path": "g.txt"},
        {"user": "user"},  # signed for the default user ("")
        {"expiration": 99},
    ):
        with pytest.raises(SignatureRefused, match="invalid signature"):
            find(cands, sig, ops=("read",), **{**kw, **changed})  # type: ignore[arg-type]
    with pytest.raises(SignatureRefused, match="invalid signature"):
        find(cands, sig, ops=("write",), **kw)  # type: ignore[arg-type]
    with pytest.raises(SignatureRefused, match="invalid signature"):
        find([], sig, ops=("read",), **kw)  # type: ignore[arg-type]


def test_an_expired_signature_is_refused_only_once_genuine() -> None:
    cands = [("s1", "tok")]
    sig = sign("f", "write", "user", "tok", 1000)
    kw = {"path": "f", "ops": ("write",), "user": "user"}
    assert find(cands, sig, expiration=1000, now=999, **kw) == "s1"  # type: ignore[arg-type]
    with pytest.raises(SignatureRefused, match="already expired"):
        find(cands, sig, expiration=1000, now=1001, **kw)  # type: ignore[arg-type]
    with pytest.raises(SignatureRefused, match="invalid signature"):
        find(cands, sig + "x", expiration=1000, now=1001, **kw)  # type: ignore[arg-type]


# -- codings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header,want",
    [
        (None, None),
        ("", None),
        ("gzip", "gzip"),
        ("GZIP", "gzip"),
        ("br, gzip;q=0.5", "gzip"),
        ("identity, gzip;q=0.5", None),
        ("gzip;q=0, identity", None),
        ("br", None),  # identity stays acceptable
        ("*", None),
        ("*, identity;q=0", "gzip"),
        ("gzip;q=bad", None),
    ],
)
def test_accept_encoding(header: str | None, want: str | None) -> None:
    assert accepted(header) == want


@pytest.mark.parametrize("header", ["br, identity;q=0", "identity;q=0", "*;q=0"])
def test_accept_encoding_with_nothing_acceptable_is_refused(header: str) -> None:
    with pytest.raises(EncodingRefused):
        accepted(header)


def test_request_coding() -> None:
    assert request_coding(None) is None and request_coding("identity") is None
    assert request_coding("GZip") == "gzip"
    with pytest.raises(EncodingRefused):
        request_coding("br")


def test_inflater_round_trips_in_pieces_and_members() -> None:
    data = bytes(range(256)) * 1000
    blob = gzip.compress(data) + gzip.compress(b"tail")
    inf = Inflater(cap=1 << 20)
    out = b"".join(inf.feed(blob[i : i + 333]) for i in range(0, len(blob), 333))
    inf.finish()
    assert out == data + b"tail"


def test_a_gzip_bomb_stops_at_the_cap_without_inflating() -> None:
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = comp.compress(b"\0" * (64 << 20)) + comp.flush()  # 64 MiB of zeros, ~64 KiB
    assert len(bomb) < 100_000
    inf = Inflater(cap=1 << 20)
    with pytest.raises(InflatedTooLarge):
        inf.feed(bomb)
    assert inf.total == (1 << 20) + 1  # it stopped one byte past the cap


@pytest.mark.parametrize("blob", [b"", b"not gzip at all", gzip.compress(b"abcdef" * 100)[:-9]])
def test_bad_or_truncated_gzip_is_refused(blob: bytes) -> None:
    inf = Inflater(cap=1 << 20)
    with pytest.raises(EncodingRefused):
        inf.feed(blob)
        inf.finish()


# -- multipart -------------------------------------------------------------------------------


def _form(*parts: tuple[str, str | None, bytes], boundary: str = "XyZ") -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_multipart_parts_keep_full_path_filenames() -> None:
    body = _form(("file", "/home/user/d/a.txt", b"one"), ("x", None, b"field"),
                 ("file", "rel/b.txt", b"two\r\n--not-a-boundary"))  # fmt: skip
    parts = parse_parts(body, b"XyZ")
    assert [(p[0], p[1].get(b"filename"), p[2]) for p in parts] == [
        (b"file", b"/home/user/d/a.txt", b"one"),
        (b"x", None, b"field"),
        (b"file", b"rel/b.txt", b"two\r\n--not-a-boundary"),
    ]


def test_multipart_limits_and_malformed_bodies() -> None:
    many = _form(*[("file", f"f{i}", b"x") for i in range(1001)])
    with pytest.raises(InvalidArgumentError, match="more than 1000 parts"):
        parse_parts(many, b"XyZ")
    big_header = b"--XyZ\r\nX-Pad: " + b"a" * (20 << 10) + b"\r\n\r\nx\r\n--XyZ--\r\n"
    with pytest.raises(InvalidArgumentError, match=r"too large|malformed"):  # either limit
        parse_parts(big_header, b"XyZ")
    with pytest.raises(InvalidArgumentError, match="truncated"):
        parse_parts(_form(("file", "a", b"x"))[:-8], b"XyZ")
    with pytest.raises(InvalidArgumentError):
        parse_parts(b"garbage without any boundary", b"XyZ")


# -- metadata --------------------------------------------------------------------------------


def test_metadata_rules() -> None:
    assert meta.problem({}) is None
    assert meta.problem({"author": "mish", "k" * 246: ""}) is None
    assert meta.problem({"k" * 247: ""}) is not None
    for bad in ({"": "v"}, {"a": "b\n"}, {"a\n": "b"}, {"a": "é"}, {"a": 1}, ["a"]):
        assert meta.problem(bad) is not None
    # 4 KiB in all, counted as prefix + key + value per entry (E2B's rule).
    fits = {f"k{i:02}": "v" * (4096 // 10 - 9 - 3) for i in range(10)}
    assert meta.problem(fits) is None
    assert meta.problem({**fits, "x": "y" * 40}) is not None
    with pytest.raises(InvalidArgumentError, match="printable ASCII"):
        v.file_metadata({"a": "\x00"})


def test_an_entry_reply_with_bad_metadata_is_a_protocol_error() -> None:
    entry = {"name": "a", "path": "/home/user/a", "type": "file", "size": 1, "mode": 0o644,
             "permissions": "-rw-r--r--", "mtime": 1.0}  # fmt: skip
    assert check_reply(MsgType.FILE_STAT, {**entry, "metadata": {"a": "b"}})
    for bad in ({"a": "\x1b[31m"}, {"k" * 300: "v"}, {"a": 5}, "a=b", {"a": "v" * 5000}):
        with pytest.raises(ProtocolError):
            check_reply(MsgType.FILE_STAT, {**entry, "metadata": bad})
