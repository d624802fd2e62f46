"""The private event loop behind the sync SDK.

The sync API is the async one driven from a dedicated loop thread: one implementation, no
hand-kept twins that drift (DESIGN §5's "write async once"; unasync would be the other way).
Sync callbacks run on a thread of their sandbox's (``sync._Callbacks``), not on this one.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures.thread  # noqa: F401 - registers its exit hook before ours (see below)
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="moat-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("the sync moat API can't be called from its own callbacks")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise

    def shutdown(self) -> None:
        """Kill every sandbox still alive (invariant 5), then stop the loop. A program that
        only used a server (the HTTP transport) never loaded the engine: nothing to kill
        here (its sandboxes are the server's, and end with their timeouts)."""
        if self.loop.is_running():
            if "moat.engine.api" in sys.modules:
                from moat.engine.api import kill_everything

                try:
                    asyncio.run_coroutine_threadsafe(kill_everything(), self.loop).result(
                        timeout=30
                    )
                except Exception:  # noqa: BLE001, S110 - best effort at interpreter exit
                    pass
            self.loop.call_soon_threadsafe(self.loop.stop)


_instance: LoopThread | None = None
_mu = threading.Lock()


def loop_thread() -> LoopThread:
    global _instance
    with _mu:
        if _instance is None:
            _instance = LoopThread()
            # Before concurrent.futures shuts its thread pools (asyncio.to_thread, used to
            # kill sandboxes, stops working then): threading's exit hooks run before atexit,
            # newest first, and concurrent.futures.thread (imported above) registered earlier.
            register = getattr(threading, "_register_atexit", atexit.register)
            register(_instance.shutdown)
        return _instance
