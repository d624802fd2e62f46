"""A matplotlib backend for sandboxes: Agg rendering, ``plt.show()`` emits PNG results.

Selected with ``MPLBACKEND=module://moat.agent.mplbackend`` in kernels.
"""

from __future__ import annotations

from typing import Any

from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg

FigureCanvas = FigureCanvasAgg
FigureManager = FigureManagerBase


def show(*args: Any, **kwargs: Any) -> None:
    from moat.agent import kernel

    kernel.emit_open_figures()
