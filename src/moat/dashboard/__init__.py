"""The operator dashboard of ``moat serve``: which sandboxes run, what they ran, what they
tried to reach and what was refused, what the guard redacted (docs/dashboard.md).

Trust domain: host (a face over the front door, mounted in the server's listener at ``/``
and ``/ui/``). Server-rendered pages, a small static script for live updates (server-sent
events), logins by API key (``moat.dashboard.auth``).
"""

from moat.dashboard.app import dashboard_app, is_dashboard_path

__all__ = ["dashboard_app", "is_dashboard_path"]
