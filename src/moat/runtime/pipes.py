"""Host pipes of an agent's channel: a wider pipe for what the agent writes to the host.

Trust domain: host engine. The kernel's default pipe holds 64 KiB, less than one window of a
proxied stream: the agent then waits on a host read per frame, and a download through ingress
pays a context switch each time (issue 10's throughput). Pages are taken only while bytes are
in flight, so a wider pipe costs memory only under load, and never more than its size.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

__all__ = ["AGENT_PIPE_SIZE", "widen"]

#: The size of the pipe the agent writes its frames to: a whole ingress window (1 MiB) fits.
AGENT_PIPE_SIZE = 1 << 20


def widen(fd: int) -> None:
    """Give the pipe of ``fd`` AGENT_PIPE_SIZE, best effort (the default size works, only
    slower). Only with root's privilege: an unprivileged user's pipes share a quota
    (fs.pipe-user-pages-soft), and past it the kernel would shrink every new pipe of ours."""
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, AGENT_PIPE_SIZE)
