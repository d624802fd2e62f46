"""A template's start command and ready check (issue 12), run when its sandbox starts.

A template may name a command that starts with every sandbox of it (a dev server, a
database) and a check that says when the sandbox is ready (E2B's ``set_start_cmd(start,
ready)``). The start command runs in the background as the sandbox's user, like any
command (its output is not kept; it shows in the process list); the ready check runs
again every ``READY_POLL_S`` until it exits 0. The create returns only then, and a check
that has not passed within ``READY_TIMEOUT_S`` fails the create with TimeoutError (the
caller kills the sandbox: nothing half-ready is handed out). Everything runs inside the
sandbox, under its limits; nothing here runs on the host.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from moat.errors import TimeoutError

if TYPE_CHECKING:
    from moat.engine.session import Session

#: How long a template's ready check may take to pass, in all.
READY_TIMEOUT_S = 60.0
#: Between two tries of the ready check.
READY_POLL_S = 0.2


async def run(session: Session, start_cmd: str | None, ready_cmd: str | None) -> None:
    """Start ``start_cmd`` in the background, then wait for ``ready_cmd`` to pass."""
    if start_cmd:
        _pid, call, _sink = await session.start_command(start_cmd, {}, None, False, None, None)
        call.close()  # it runs on; its frames go nowhere (no output kept for nobody)
    if not ready_cmd:
        return
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        pid, call, sink = await session.start_command(ready_cmd, {}, None, False, None, None)
        try:
            result = await session.wait_command(call, sink, left, pid)
        except TimeoutError:
            break
        if result.exit_code == 0:
            return
        await asyncio.sleep(min(READY_POLL_S, max(0.0, deadline - time.monotonic())))
    raise TimeoutError(
        f"the template's ready check did not pass within {READY_TIMEOUT_S:g}s; the sandbox "
        "was not started"
    )


def restarts_processes(tier: str, memory: bool) -> bool:
    """Whether a sandbox restored from a pause or snapshot taken with ``memory`` comes back
    without its processes (files only), so its template's start command runs again. The
    microVM keeps its memory either way (its files live in guest RAM)."""
    return not memory and tier != "microvm"


async def after_restore(session: Session, template: str, tier: str, memory: bool) -> None:
    """Run the template's start command and ready check again where the restore did not
    bring the processes back."""
    if not restarts_processes(tier, memory):
        return
    from moat.engine import templating

    found = await asyncio.to_thread(templating.lookup, template)
    if found is not None and (found.start_cmd or found.ready_cmd):
        await run(session, found.start_cmd, found.ready_cmd)
