"""PIL images shown or saved to a file are displayed, as in E2B's code interpreter.

A sandbox has no screen: ``Image.show()`` sends the image as a display result instead of
starting a viewer, and ``Image.save(path)`` sends it too (E2B's behaviour, which code written
against E2B expects). Kernels start without PIL, so the patch waits for ``PIL.Image`` to be
imported (a meta path finder that costs one string compare per import).
"""

from __future__ import annotations

import os
import sys

# The agent starts in every sandbox: typing costs ~8 ms of imports, so it is only
# imported for the type checker (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_MODULE = "PIL.Image"


class PILHook:
    """Patches ``PIL.Image`` as it is imported (or at once, if it already is)."""

    def install(self) -> None:
        mod = sys.modules.get(_MODULE)
        if mod is not None:
            _patch(mod)
        elif self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _MODULE:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path, target)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _patch(module)

        loader.exec_module = exec_module
        return spec


def _display(image: Any) -> None:
    from moat.agent import kernel

    kernel.emit_display(image)


def _patch(module: Any) -> None:
    cls = getattr(module, "Image", None)
    if cls is None or getattr(cls, "_moat_patched", False):
        return
    save = cls.save

    def save_and_display(self: Any, fp: Any, format: Any = None, **params: Any) -> Any:
        out = save(self, fp, format, **params)
        if isinstance(fp, (str, os.PathLike)):  # a file, not a buffer (_repr_png_ uses one)
            _display(self)
        return out

    def show(self: Any, title: Any = None) -> None:
        _display(self)

    cls.save = save_and_display
    cls.show = show
    cls._moat_patched = True
