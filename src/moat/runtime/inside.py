"""A way for a driver to run one command INSIDE a running sandbox, bytes in or out.

Trust domain: host engine. The engine lends it to a sandbox's process once its agent is up
(``proc.inside``), so a driver can have the sandbox itself produce or consume an archive of
its own files (issue 11): the host never walks a sandbox's tree (a symlink planted inside
would point the host's authority elsewhere); it only stores and replays opaque bytes. The
command runs as any command of the sandbox does: its uid, its seccomp filter, its cgroup.
"""

from __future__ import annotations

from typing import BinaryIO, Protocol


class Inside(Protocol):
    """Commands run by the sandbox's agent, as the sandbox's user (never the guard's
    business: these bytes go to the host's disk, never to a caller)."""

    async def output_to(self, cmd: str, dest: BinaryIO, cap: int) -> int:
        """Run ``cmd``, writing its stdout to ``dest``; its exit status. Raises
        QuotaExceededError (the command killed) past ``cap`` bytes."""
        ...

    async def input_from(self, cmd: str, src: BinaryIO) -> int:
        """Run ``cmd`` with ``src``'s bytes on its stdin; its exit status."""
        ...
