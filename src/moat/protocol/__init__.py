"""moat's agent protocol: pure, no I/O, stdlib only, shared by the host and the agent.

Trust domain: both. The host decodes frames written by a compromised agent, so every frame
is length-limited and schema-checked here before anyone looks at it (DESIGN invariant 6).
"""

from moat.protocol.codec import Decoder, encode
from moat.protocol.frames import (
    AGENT_TO_HOST,
    CHUNK_SIZE,
    HOST_TO_AGENT,
    INGRESS_WINDOW,
    MAX_FRAME,
    PROTOCOL_VERSION,
    TCP_CHUNK,
    TCP_WINDOW,
    Frame,
    MsgType,
    ProtocolError,
    validate,
)

__all__ = [
    "AGENT_TO_HOST",
    "CHUNK_SIZE",
    "HOST_TO_AGENT",
    "INGRESS_WINDOW",
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "TCP_CHUNK",
    "TCP_WINDOW",
    "Decoder",
    "Frame",
    "MsgType",
    "ProtocolError",
    "encode",
    "validate",
]
