"""The default templates, built by ``moat template build --defaults``.

``base``: Debian bookworm with Python, pip, venv, git, curl, the build tools and Node (all
from Debian). ``code-interpreter`` (also ``code-interpreter-v1``, E2B's name): ``base`` plus
numpy, pandas and matplotlib, which ``run_code``'s rich display uses (moat.agent.display,
moat.agent.mplbackend), and IPython, whose ``IPython.display`` code written for Jupyter or E2B
imports (its ``display`` sends results: moat.agent.imagehooks). Both are defined from the
Debian base, so ``code-interpreter``'s first layers are ``base``'s (same keys: built once,
shared in the cache).
"""

from __future__ import annotations

from moat.templates.define import Base, Step, TemplateDef

BASE_PACKAGES = (
    "python3", "python3-pip", "python3-venv", "git", "curl", "build-essential", "nodejs",
    "npm", "procps", "less", "nano", "unzip", "xz-utils",
)  # fmt: skip
CODE_INTERPRETER_PACKAGES = (
    "python3-numpy", "python3-pandas", "python3-matplotlib", "python3-pil",
    "python3-requests", "python3-bs4",
)  # fmt: skip
IPYTHON_PACKAGES = ("python3-ipython",)
_ENV = (("PYTHONUNBUFFERED", "1"),)

BASE = TemplateDef(
    base=Base("debian", "bookworm"),
    steps=(Step("apt", BASE_PACKAGES),),
    env=_ENV,
)
CODE_INTERPRETER = TemplateDef(
    base=Base("debian", "bookworm"),
    # IPython in a step of its own: the numpy/pandas layer before it stays cached
    steps=(
        Step("apt", BASE_PACKAGES),
        Step("apt", CODE_INTERPRETER_PACKAGES),
        Step("apt", IPYTHON_PACKAGES),
    ),
    env=_ENV,
)

#: (definition, names), in build order
DEFAULTS: tuple[tuple[TemplateDef, tuple[str, ...]], ...] = (
    (BASE, ("base",)),
    (CODE_INTERPRETER, ("code-interpreter", "code-interpreter-v1")),
)
