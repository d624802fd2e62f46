"""The polling form's watches (E2B's CreateWatcher / GetWatcherEvents / RemoveWatcher).

Each watch is kept under a random id, per tenant and sandbox: an id of another sandbox or
tenant is unknown here (invariant 11). Bounded: the front door caps watches per sandbox, and a
watch that has ended (its sandbox gone, its directory removed) is dropped at the next
CreateWatcher of any sandbox, so the ended ones of sandboxes nobody polls again don't pile up.
"""

from __future__ import annotations

import secrets

from moat.engine.api import WatchStream

__all__ = ["Watchers"]


class Watchers:
    def __init__(self) -> None:
        self._items: dict[tuple[str, str, str], WatchStream] = {}

    def add(self, tenant: str, sandbox_id: str, stream: WatchStream) -> str:
        for key in [k for k, s in self._items.items() if s.done]:
            del self._items[key]
        watcher_id = secrets.token_hex(8)
        self._items[(tenant, sandbox_id, watcher_id)] = stream
        return watcher_id

    def get(self, tenant: str, sandbox_id: str, watcher_id: str) -> WatchStream | None:
        return self._items.get((tenant, sandbox_id, watcher_id))

    def pop(self, tenant: str, sandbox_id: str, watcher_id: str) -> WatchStream | None:
        return self._items.pop((tenant, sandbox_id, watcher_id), None)
