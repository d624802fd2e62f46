"""The sans-I/O codec: round trips at every split, and refusal of every malformed frame."""

from __future__ import annotations

import json
import struct

import pytest

from moat.protocol import (
    AGENT_TO_HOST,
    HOST_TO_AGENT,
    MAX_FRAME,
    Decoder,
    Frame,
    MsgType,
    ProtocolError,
    encode,
    validate,
)


def raw(header: object, payload: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack(">II", 4 + len(h) + len(payload), len(h)) + h + payload


FRAMES = [
    Frame(MsgType.EXEC, 1, {"context": "default", "language": "python", "code": "print('é')"}),
    Frame(MsgType.STDOUT, 1, {}, b"\x00\xff" * 100),
    Frame(MsgType.DONE, 1, {"restarted": False}),
    Frame(MsgType.FILE_CHUNK, 7, {"eof": True}, b"data"),
]


def test_round_trip_split_at_every_byte() -> None:
    blob = b"".join(encode(f) for f in FRAMES)
    for cut in range(len(blob) + 1):
        d = Decoder()
        out = d.feed(blob[:cut]) + d.feed(blob[cut:])
        assert out == FRAMES


def test_byte_by_byte() -> None:
    blob = b"".join(encode(f) for f in FRAMES)
    d = Decoder()
    out = []
    for i in range(len(blob)):
        out += d.feed(blob[i : i + 1])
    assert out == FRAMES and d.buffered == 0


@pytest.mark.parametrize(
    "blob",
    [
        struct.pack(">I", MAX_FRAME) + b"x",  # too long
        struct.pack(">I", 2) + b"xx",  # shorter than the header length field
        struct.pack(">II", 10, 100) + b"x" * 6,  # header length beyond the frame
        raw([1, 2]),  # not an object
        raw({"t": "nope", "i": 1, "f": {}}),  # unknown type
        raw({"t": "exec", "i": 1, "f": {"context": "d", "language": "python"}}),  # missing code
        raw({"t": "exec", "i": 1, "f": {"context": 5, "language": "python", "code": ""}}),
        raw({"t": "cmd_kill", "i": 1, "f": {"pid": True}}),  # bool is not an int
        raw({"t": "fail", "i": 1, "f": {"kind": "weird", "message": ""}}),
        raw({"t": "done", "i": "1", "f": {}}),  # id not int
        raw({"t": "done", "i": 1, "f": [], "x": 1}),  # extra key
        raw(
            {
                "t": "exec",
                "i": 1,
                "f": {"context": "d", "language": "p", "code": "", "envs": {"A": 1}},
            }
        ),
        struct.pack(">II", 8, 4) + b"\xff\xfe{}",  # not UTF-8
    ],
)
def test_malformed_frames_are_refused(blob: bytes) -> None:
    d = Decoder()
    with pytest.raises(ProtocolError):
        d.feed(blob)
    with pytest.raises(ProtocolError):  # and the stream stays broken
        d.feed(encode(FRAMES[0]))


def test_direction_is_enforced() -> None:
    host_side = Decoder(direction=AGENT_TO_HOST)
    with pytest.raises(ProtocolError):
        host_side.feed(encode(FRAMES[0]))  # an agent may not send EXEC
    agent_side = Decoder(direction=HOST_TO_AGENT)
    with pytest.raises(ProtocolError):
        agent_side.feed(encode(Frame(MsgType.DONE, 1)))


def test_encode_refuses_oversized() -> None:
    with pytest.raises(ProtocolError):
        encode(Frame(MsgType.STDOUT, 1, {}, b"x" * MAX_FRAME))


def test_positive_control_decoder_accepts_valid() -> None:
    assert Decoder().feed(raw({"t": "done", "i": 3, "f": {"x": 1}})) == [
        Frame(MsgType.DONE, 3, {"x": 1})
    ]


def test_pty_sizes_are_checked_both_ways() -> None:
    """A PTY's size: cols and rows together, each 1..MAX_PTY_SIDE (host and agent alike)."""
    from moat.protocol.frames import MAX_PTY_SIDE

    ok = [
        Frame(MsgType.CMD_START, 1, {"cmd": "sh", "cols": 80, "rows": 24}),
        Frame(MsgType.CMD_RESIZE, 1, {"pid": 3, "cols": MAX_PTY_SIDE, "rows": 1}),
        Frame(MsgType.CMD_START, 1, {"cmd": "sh"}),  # no terminal
    ]
    for frame in ok:
        assert validate(frame, direction=HOST_TO_AGENT) is frame
    bad = [
        Frame(MsgType.CMD_START, 1, {"cmd": "sh", "cols": 80}),
        Frame(MsgType.CMD_START, 1, {"cmd": "sh", "cols": 0, "rows": 24}),
        Frame(MsgType.CMD_START, 1, {"cmd": "sh", "cols": True, "rows": 24}),
        Frame(MsgType.CMD_RESIZE, 1, {"pid": 3, "cols": 80, "rows": MAX_PTY_SIDE + 1}),
        Frame(MsgType.CMD_RESIZE, 1, {"pid": 3, "cols": 80}),
        Frame(MsgType.STARTED, 1, {"pid": 3, "pty": 1}),
    ]
    for frame in bad:
        with pytest.raises(ProtocolError):
            validate(frame)
    with pytest.raises(ProtocolError):  # the agent never resizes anything of the host's
        validate(
            Frame(MsgType.CMD_RESIZE, 1, {"pid": 3, "cols": 8, "rows": 8}), direction=AGENT_TO_HOST
        )
    assert validate(Frame(MsgType.PTY, 1, {}, b"\x1b[H"), direction=AGENT_TO_HOST)
