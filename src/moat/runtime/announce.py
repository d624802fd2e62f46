"""Reading a restored agent's announcement (moat.protocol.resume) off its new channel.

Trust domain: host engine. What comes before the line is dropped unread (it was meant for
the old host, or it is junk); how much may come is bounded, and past that bound, at EOF or
at the deadline the restore fails (invariant 6: never waited for, never parsed).
"""

from __future__ import annotations

import asyncio
import time

from moat.errors import SandboxDiedError
from moat.protocol import resume


async def read_announcement(
    reader: asyncio.StreamReader, nonce: str, deadline: float, limit: int
) -> int:
    """Read up to and including ``resume.line(nonce)``; the bytes dropped before it. The
    next frame on ``reader`` is the agent's READY.

    Raises TimeoutError past ``deadline`` (monotonic), asyncio.IncompleteReadError at EOF,
    SandboxDiedError past ``limit`` bytes dropped.
    """
    marker = resume.line(nonce)
    dropped = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no announcement")
        try:
            async with asyncio.timeout(left):
                data = await reader.readuntil(marker)
            dropped += len(data) - len(marker)
            break
        except asyncio.LimitOverrunError as exc:
            dropped += exc.consumed
            await reader.readexactly(exc.consumed)
        if dropped > limit:
            raise SandboxDiedError("the restored sandbox's agent did not announce itself")
    if dropped > limit:
        raise SandboxDiedError("the restored sandbox's agent did not announce itself")
    return dropped
