"""The agent's announcement after its sandbox was restored from a checkpoint (issue 11).

Pure, stdlib only (the agent imports it). A restored agent talks to a host that was not there
when the checkpoint was taken: the old host's stream may end mid-frame in either direction.
The agent drops what it had not yet read, then writes ``line(nonce)`` between two frames
(raw bytes, not a frame) and a fresh ``READY`` frame. The host discards everything before
that line. ``nonce`` is fresh per restore and reaches the agent only through guest root (the
microVM's control port), so nothing written before the restore, nor any user code, can forge
the line.
"""

from __future__ import annotations

#: Starts with a NUL: no text a frame's length prefix is followed by.
PREFIX = b"\0MOAT-RESUMED "
#: Bytes of the nonce (hex characters in the line: twice this).
NONCE_BYTES = 16


def line(nonce: str) -> bytes:
    """The announcement for ``nonce`` (hex), newline-terminated."""
    return PREFIX + nonce.encode("ascii") + b"\n"
