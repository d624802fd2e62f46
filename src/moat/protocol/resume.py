"""The agent's announcement after its sandbox was restored from a checkpoint (issue 11).

Pure, stdlib only (the agent imports it). A restored agent talks to a host that was not there
when the checkpoint was taken: the old host's stream may end mid-frame in either direction.
The agent drops what it had not yet read, then writes ``line(nonce)`` between two frames
(raw bytes, not a frame) and a fresh ``READY`` frame. The host discards everything before
that line. ``nonce`` is fresh per restore, so nothing written before the restore can pass
for the line. It reaches the agent out of band: through guest root on the microVM (its control
port), and in the ``RESUME`` frame on gVisor, whose agent was quiesced before the checkpoint
(``QUIESCE``: at a frame boundary both ways, writing nothing), so that frame is the first thing
on its new stdin and the line the first thing it writes.
"""

from __future__ import annotations

#: Starts with a NUL: no text a frame's length prefix is followed by.
PREFIX = b"\0MOAT-RESUMED "
#: Bytes of the nonce (hex characters in the line: twice this).
NONCE_BYTES = 16


def line(nonce: str) -> bytes:
    """The announcement for ``nonce`` (hex), newline-terminated."""
    return PREFIX + nonce.encode("ascii") + b"\n"


def valid_nonce(nonce: object) -> bool:
    """Whether ``nonce`` is the shape the host makes (NONCE_BYTES as lowercase hex)."""
    return (
        isinstance(nonce, str)
        and len(nonce) == 2 * NONCE_BYTES
        and all(c in "0123456789abcdef" for c in nonce)
    )
