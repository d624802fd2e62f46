"""Blocking work on a worker thread that a cancellation never leaves half done.

Trust domain: host engine. A driver that makes host state on a thread (a bundle's files, a
cgroup, a mount) must not let its caller's cancellation run the teardown while the thread still
writes: :func:`owned` waits for the thread and undoes what it made, :func:`settle` waits for a
future whatever cancellations arrive (invariant 5: nothing is left behind).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["owned", "settle"]

T = TypeVar("T")


async def owned(fn: Callable[[], T], undo: Callable[[T], None]) -> T:
    """``fn()`` on a worker thread; if the caller is cancelled meanwhile, wait for it anyway
    and ``undo(result)``, then raise the cancellation (invariant 5: nothing it made survives).

    An executor future, never a task: a loop's shutdown (``asyncio.run`` cancels every task,
    once) must not cancel the thread's result away from us; a second cancellation while we
    clean up is absorbed for the same reason.
    """
    loop = asyncio.get_running_loop()
    made = loop.run_in_executor(None, fn)
    try:
        return await asyncio.shield(made)
    except asyncio.CancelledError:
        await settle(made)
        if not made.cancelled() and made.exception() is None:
            await settle(loop.run_in_executor(None, undo, made.result()))
        raise


async def settle(fut: asyncio.Future[Any]) -> bool:
    """Wait until ``fut`` is done, whatever cancellations arrive meanwhile; whether one did."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:  # noqa: BLE001, S110 - the caller reads fut's outcome itself
            pass
    return cancelled
