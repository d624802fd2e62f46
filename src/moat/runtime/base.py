"""The Runtime protocol every isolation tier implements."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol, runtime_checkable

from moat.runtime.spec import SandboxSpec


@runtime_checkable
class SandboxProcess(Protocol):
    """A running sandbox as its driver sees it: a byte stream to the agent, and a way to end it."""

    @property
    def reader(self) -> asyncio.StreamReader:
        """Bytes written by the agent (its framed protocol)."""

    @property
    def writer(self) -> ByteSink:
        """Bytes to the agent."""

    async def kill(self) -> None:
        """End the sandbox now and release all its resources. Idempotent.

        When it returns nothing of the sandbox can run or be reached: its processes are
        frozen or have SIGKILL pending, its channel is closed. Reaping and removal finish on
        :mod:`moat.runtime.reaper` moments later (drained at interpreter exit; after a crash
        the next start's ``sweep`` removes what is left), so that no process, cgroup, mount,
        VM, socket or temp file of it remains (DESIGN invariant 5).
        """

    def alive(self) -> bool:
        """Whether the sandbox's process tree is still running."""

    def stats(self) -> dict[str, int]:
        """Resource figures the driver can read from outside (memory, pids...), may be empty."""


class ByteSink(Protocol):
    """The subset of asyncio.StreamWriter the engine uses to talk to the agent."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


class Runtime(Protocol):
    """One isolation tier."""

    #: "container", "gvisor" or "microvm"
    name: str

    def probe(self) -> str | None:
        """None if this tier can run here, else the reason it can't (shown by `moat doctor`)."""

    async def start(self, spec: SandboxSpec) -> SandboxProcess:
        """Start the sandbox with the agent as its first process; fail closed.

        Raises IsolationUnavailableError if the tier can't run, SandboxDiedError if it started
        but died before handing over its stream. Leaves nothing behind on failure.
        """

    def sweep(self) -> int:
        """Remove what a crashed host process left behind for this tier; return the count."""


@runtime_checkable
class Checkpointable(Protocol):
    """A tier that can save a running sandbox to disk and start sandboxes from it (issue 11).

    The checkpoint directory is opaque to everything above the driver. Its contents are written
    by the driver only (never by anything inside the sandbox with host-side path authority) and
    hold nothing secret: secrets live in the host's gateway, rebuilt from the store on restore
    (invariant 3). The caller owns atomicity: it passes an empty temporary directory and renames
    it into place after ``checkpoint`` returns.
    """

    #: Whether ``checkpoint(memory=True)`` keeps processes and memory on this tier.
    keeps_memory: bool

    async def checkpoint(
        self, proc: SandboxProcess, dest: Path, *, memory: bool, leave_running: bool
    ) -> None:
        """Save ``proc`` into the empty directory ``dest``; fail closed, leaving ``proc`` as it was.

        ``memory=False`` saves the writable filesystem only. ``leave_running=True`` (a snapshot
        or fork) keeps ``proc`` serving afterwards; ``False`` (pause) may leave it stopped, the
        caller kills it next. Raises PolicyError if this tier can't keep what is asked.
        """

    async def restore(self, spec: SandboxSpec, src: Path) -> SandboxProcess:
        """Start a sandbox from the checkpoint in ``src`` (left unchanged, reusable).

        ``spec.sandbox_id`` may differ from the checkpointed one (a fork). The restored agent
        speaks on a fresh channel and must be reseeded (its RNG and every kernel's) so that two
        sandboxes restored from one checkpoint never share randomness.
        """


@runtime_checkable
class ReplaysFiles(Protocol):
    """A Checkpointable tier whose checkpoint is files only, replayed into a fresh sandbox.

    Its ``restore`` is a start plus a replay, so the engine may instead replay the checkpoint
    into a sandbox it already started (the warm pool's: ``moat.engine.persist``). Tiers that
    restore processes and memory (gVisor, the microVM) don't implement it.
    """

    async def restore_into(self, proc: SandboxProcess, src: Path) -> None:
        """Replay the checkpoint in ``src`` (left unchanged) into the running ``proc``, whose
        agent is up and has run nothing; fail closed (the caller then kills ``proc``)."""
