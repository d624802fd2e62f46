"""Libraries that would show something on a screen display it instead, as in E2B's code
interpreter.

A sandbox has no screen: ``Image.show()`` sends a PIL image as a display result instead of
starting a viewer, and ``Image.save(path)`` sends it too (E2B's behaviour, which code written
against E2B expects). IPython's ``display`` (``from IPython.display import display``), which
prints a repr when no IPython shell runs, sends its values as display results like the
kernel's own ``display``. Kernels start without these libraries, so each patch waits for its
module to be imported (a meta path finder that costs one set lookup per import).
"""

from __future__ import annotations

import os
import sys

# The agent starts in every sandbox: typing costs ~8 ms of imports, so it is only
# imported for the type checker (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_PIL = "PIL.Image"
#: IPython's modules that define or re-export ``display``.
_IPYTHON = ("IPython.display", "IPython.core.display_functions", "IPython.core.display")


class PILHook:
    """Patches ``PIL.Image`` and IPython's display modules as they are imported (or at once,
    those that already are)."""

    def install(self) -> None:
        for name in (_PIL, *_IPYTHON):
            mod = sys.modules.get(name)
            if mod is not None:
                _PATCHES[name](mod)
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        patch = _PATCHES.get(name)
        if patch is None or name in sys.modules:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path, target)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            patch(module)

        loader.exec_module = exec_module
        return spec


def _display(image: Any) -> None:
    from moat.agent import kernel

    kernel.emit_display(image)


def _patch_pil(module: Any) -> None:
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


def _patch_ipython(module: Any) -> None:
    if callable(getattr(module, "display", None)):
        from moat.agent.kernel import user_display

        module.display = user_display


_PATCHES = {_PIL: _patch_pil, **dict.fromkeys(_IPYTHON, _patch_ipython)}
