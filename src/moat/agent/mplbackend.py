"""A matplotlib backend for sandboxes: Agg rendering, ``plt.show()`` emits PNG results.

Selected with ``MPLBACKEND=module://moat.agent.mplbackend`` in kernels.
"""

from __future__ import annotations

from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg

# The agent starts in every sandbox: typing costs ~8 ms of imports, so it is only
# imported for the type checker (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FigureCanvas = FigureCanvasAgg
FigureManager = FigureManagerBase


def show(*args: Any, **kwargs: Any) -> None:
    from moat.agent import kernel

    kernel.emit_open_figures()
