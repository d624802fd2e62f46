"""A taken-over agent (invariant 6): speaks the frame protocol, answers as a script says.

Run by ``HostileRuntime`` (tests/test_hostile_agent.py) with ``MOAT_HOSTILE`` set to a JSON
object mapping a request type ("ctx_list", ...) to the frames to send back, each
``[type, fields]`` or ``[type, fields, payload_text, repeat]``; a request it has no script
for gets an empty DONE. ``"silent": true`` stops reading after READY (a stopped agent).
Stdlib plus ``moat.protocol`` only.
"""

from __future__ import annotations

import json
import os
import sys
import time

from moat.protocol import HOST_TO_AGENT, PROTOCOL_VERSION, Decoder, Frame, MsgType, encode


def _expand(value: object) -> object:
    if isinstance(value, dict):
        if set(value) == {"$repeat"}:
            text, n = value["$repeat"]
            return text * n
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def main() -> None:
    script = json.loads(os.environ["MOAT_HOSTILE"])
    out = sys.stdout.buffer

    def send(mtype: str, rid: int, fields: object, payload: bytes = b"") -> None:
        assert isinstance(fields, dict)
        out.write(encode(Frame(MsgType(mtype), rid, fields, payload)))
        out.flush()

    send("ready", 0, {"version": PROTOCOL_VERSION, "pid": os.getpid()})
    if script.get("silent"):
        while True:  # never reads again: the host's writes fill the pipe and stay there
            time.sleep(3600)
    decoder = Decoder(direction=HOST_TO_AGENT)
    while True:
        data = os.read(0, 1 << 20)
        if not data:
            return
        for frame in decoder.feed(data):
            if frame.type in (MsgType.FILE_CHUNK, MsgType.INTERRUPT) and not frame.get("eof"):
                continue
            steps = script.get(frame.type.value, [["done", {}]])
            for step in steps:
                mtype, fields = step[0], _expand(step[1])
                payload = step[2].encode() if len(step) > 2 else b""
                for _ in range(step[3] if len(step) > 3 else 1):
                    send(mtype, frame.id, fields, payload)


if __name__ == "__main__":
    main()
