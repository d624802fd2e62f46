"""The default working directory of commands and code: the template's (issue 12), else HOME.

Trust domain: sandbox. Set once by ``main`` from the agent's command line (the host's choice).
"""

from __future__ import annotations

import os

from moat.protocol.contract import HOME

_default = HOME


def set_default(path: str) -> None:
    global _default
    if path.startswith("/") and "\0" not in path:
        _default = path


def default() -> str:
    """The default working directory, if it exists; else HOME (or / without one)."""
    for path in (_default, HOME):
        if os.path.isdir(path):
            return path
    return "/"
