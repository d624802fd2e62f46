"""A way for a driver to have a sandbox's agent hold still while it is checkpointed.

Trust domain: host engine. The engine lends it to a sandbox's process once its agent is up
(``proc.agent_gate``; the agent client implements it). ``quiesce`` sends ``QUIESCE`` and
waits (bounded) for the agent's answer, then holds back everything else the host would
send: the stream is at a frame boundary both ways, so a checkpoint taken now never holds a
half-written or half-read frame (moat.protocol.resume). ``release`` ends it on the same
stream (``RESUME`` without a nonce, then what was held back). A restore onto a new stream
sends its own ``RESUME`` with a nonce (the driver's, before any client exists).
"""

from __future__ import annotations

from typing import Protocol


class AgentGate(Protocol):
    """The agent's side of a checkpoint, as the driver asks for it."""

    async def quiesce(self, timeout: float) -> None:
        """Quiesce the agent; raises moat.errors.TimeoutError (released again, the sandbox
        running) when it does not answer within ``timeout`` seconds."""
        ...

    def release(self) -> None:
        """Let the agent and the held-back requests go on (no-op unless quiesced)."""
        ...
