"""Sans-I/O codec: ``encode(frame) -> bytes`` and ``Decoder.feed(bytes) -> [Frame]``.

Wire format of one frame::

    u32 big-endian  total length of what follows (header length field + header + payload)
    u32 big-endian  header length
    header          UTF-8 JSON object {"t": type, "i": id, "f": {fields}}
    payload         raw bytes (output chunks, file data), possibly empty

Raw payloads spare the base64 cost on the hot path (10 MB of printed output).
"""

from __future__ import annotations

import struct

from moat.protocol import jsonfast
from moat.protocol.frames import MAX_FRAME, Frame, MsgType, ProtocolError, validate

_LEN = struct.Struct(">II")


def encode(frame: Frame) -> bytes:
    """Serialise one frame. Raises ProtocolError if it would exceed MAX_FRAME."""
    # json.dumps(..., separators=(",", ":"), ensure_ascii=False), without importing json
    header = jsonfast.dumps({"t": frame.type.value, "i": frame.id, "f": frame.fields}).encode(
        "utf-8", "surrogatepass"
    )
    total = 4 + len(header) + len(frame.payload)
    if total + 4 > MAX_FRAME:
        raise ProtocolError("frame too large")
    return _LEN.pack(total, len(header)) + header + frame.payload


class Decoder:
    """Incremental decoder. Feed it bytes in any split; it returns whole, validated frames.

    After a ProtocolError the decoder is poisoned: the stream can no longer be trusted.
    """

    def __init__(
        self,
        *,
        max_frame: int = MAX_FRAME,
        direction: frozenset[MsgType] | None = None,
    ) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self._direction = direction
        self._broken = False

    def feed(self, data: bytes) -> list[Frame]:
        if self._broken:
            raise ProtocolError("stream already broken")
        self._buf += data
        frames: list[Frame] = []
        try:
            while len(self._buf) >= 4:
                (total,) = struct.unpack_from(">I", self._buf)
                if total < 4 or total + 4 > self._max:
                    raise ProtocolError("bad frame length")
                if len(self._buf) < 4 + total:
                    break
                (hlen,) = struct.unpack_from(">I", self._buf, 4)
                if hlen > total - 4 or hlen < 2:
                    raise ProtocolError("bad header length")
                header = bytes(self._buf[8 : 8 + hlen])
                payload = bytes(self._buf[8 + hlen : 4 + total])
                del self._buf[: 4 + total]
                frames.append(self._parse(header, payload))
        except ProtocolError:
            self._broken = True
            raise
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _parse(self, header: bytes, payload: bytes) -> Frame:
        try:
            obj = jsonfast.loads(header.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError("header is not JSON") from exc
        if not isinstance(obj, dict) or set(obj) - {"t", "i", "f"}:
            raise ProtocolError("header is not a frame object")
        try:
            mtype = MsgType(str(obj.get("t")))
        except ValueError as exc:
            raise ProtocolError("unknown frame type") from exc
        fields = obj.get("f", {})
        if not isinstance(fields, dict):
            raise ProtocolError("fields must be an object")
        frame = Frame(mtype, obj.get("i"), fields, payload)  # type: ignore[arg-type]
        return validate(frame, direction=self._direction)
