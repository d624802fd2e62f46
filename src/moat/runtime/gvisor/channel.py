"""The agent's byte stream on the gvisor tier: two host pipes that outlive one runsc process.

Trust domain: host engine. ``runsc run`` (and ``runsc restore``) passes its stdin/stdout to
the sandbox's first process, the agent; the sentry holds them as host file descriptors, and a
restored sentry binds the restoring process's stdin/stdout in their place. The engine must
see one stream across such a swap (a snapshot with ``leave_running``: this runsc's checkpoint
always stops the sandbox, so the driver restores it in place), so the host makes the pipes
itself and keeps their sandbox ends while a swap is possible. Bytes either side has written
and the other not yet read stay in the pipes across the swap: the old sentry stopped every
task before saving (runsc 20221219, ``state.Save``), so none are lost or read twice.

The sandbox ends are closed (:meth:`AgentPipes.release`) as soon as the runsc process exits
outside a swap, or at kill: the engine's reader then sees EOF once the sentry has gone, as
before (a dead agent is noticed, invariant 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from moat.runtime import pipes

__all__ = ["AgentPipes"]


class AgentPipes:
    """stdin and stdout pipes of one sandbox's agent; the host end as asyncio streams."""

    def __init__(self) -> None:
        self._in_r, self._in_w = os.pipe()  # host -> agent
        self._out_r, self._out_w = os.pipe()  # agent -> host
        pipes.widen(self._out_r)  # a whole ingress window in flight (issue 10's throughput)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._read_transport: asyncio.BaseTransport | None = None

    def sandbox_ends(self) -> tuple[int, int]:
        """(stdin, stdout) for a runsc process; raises OSError once released."""
        if self._in_r < 0 or self._out_w < 0:
            raise OSError("the sandbox ends of the agent's pipes are closed")
        return self._in_r, self._out_w

    async def connect(self) -> None:
        """Wrap the host ends in asyncio streams (once)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20, loop=loop)
        rtrans, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
            os.fdopen(self._out_r, "rb", buffering=0),
        )
        self._out_r = -1  # owned by the transport now
        wtrans, wproto = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(self._in_w, "wb", buffering=0)
        )
        self._in_w = -1
        self.reader = reader
        self.writer = asyncio.StreamWriter(wtrans, wproto, reader, loop)
        self._read_transport = rtrans

    def release(self) -> None:
        """Close the host's copies of the sandbox ends: EOF/EPIPE once the sentry has gone."""
        for name in ("_in_r", "_out_w"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def close(self) -> None:
        """Close everything (kill, or a failed start)."""
        self.release()
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        elif self._in_w >= 0:
            os.close(self._in_w)
            self._in_w = -1
        if self._read_transport is not None:
            self._read_transport.close()
        elif self._out_r >= 0:
            os.close(self._out_r)
            self._out_r = -1
