"""The engine: sandbox lifecycle, the host side of the agent protocol, timeouts, sweeping.

Trust domain: host engine (privileged). Everything the agent sends is untrusted input.
"""

from moat.engine.engine import Engine, default_engine
from moat.engine.session import Session

__all__ = ["Engine", "Session", "default_engine"]
