"""A world-readable copy of the in-sandbox code (``moat.protocol`` + ``moat.agent``).

Sandboxes bind this directory read-only at AGENT_DIR. Only those two stdlib-only packages are
copied: host-side code never enters a sandbox. The copy is keyed by a hash of the sources so
that concurrent engines and upgrades never see a half-written tree.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from moat.paths import state_dir
from moat.runtime.spec import AGENT_DIR, HOME

_PACKAGES = ("protocol", "agent")


def _sources() -> list[Path]:
    root = Path(__file__).resolve().parent.parent
    files: list[Path] = []
    for pkg in _PACKAGES:
        files.extend(sorted(p for p in (root / pkg).rglob("*.py")))
        files.extend(sorted(p for p in (root / pkg).rglob("*.js")))  # the JS kernel
    return files


@functools.cache
def prepare() -> Path:
    """Return the host directory to bind at AGENT_DIR (contains ``moat/``), creating it once."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    sources = _sources()
    for f in sources:
        digest.update(str(f.relative_to(root)).encode())
        digest.update(f.read_bytes())
    target = state_dir() / "agent" / digest.hexdigest()[:16]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    pkg = tmp / "moat"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""moat in-sandbox code (agent and protocol only)."""\n')
    for f in sources:
        dest = pkg / f.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    # Byte-compile now: inside, the tree is read-only and every start would compile it again.
    # The sandbox's /usr/bin/python3 is the host's, so its cache tag matches; compile with it.
    subprocess.run(
        ["/usr/bin/python3", "-I", "-m", "compileall", "-q", str(pkg)],
        check=False,
        capture_output=True,
        timeout=60,
    )
    for dirpath, _dirnames, filenames in os.walk(tmp):
        os.chmod(dirpath, 0o755)  # noqa: S103 - the sandbox uid must read it
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    try:
        os.rename(tmp, target)
    except OSError:
        # Another engine won the race with identical content.
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def agent_argv(
    python: str = "/usr/bin/python3",
    channel: str | None = None,
    workdir: str = HOME,
    split_root: bool = False,
) -> list[str]:
    """The command that starts the agent inside a sandbox.

    With ``channel`` the agent speaks on that device (a virtio serial port in a microVM);
    otherwise on its stdin/stdout. ``workdir``: the default working directory of commands and
    code (a template's, issue 12).
    """
    boot = (
        f"import sys; sys.path.insert(0, {AGENT_DIR!r}); from moat.agent.main import main; main()"
    )
    argv = [python, "-I", "-S", "-c", boot]
    if channel:
        argv += ["--channel", channel]
    if workdir != HOME:
        argv += ["--workdir", workdir]
    if split_root:  # started as uid 0 of the sandbox's namespace (moat.agent.shield.harden)
        argv += ["--split-root", "1"]
    return argv
