"""The template store the build tests share (a pytest plugin: tests/conftest.py loads it).

One session-scoped ``store`` for every module that uses it: a fixture imported into two test
modules would be two fixtures, each building its own store and each removing it at the end.
The Debian base (mmdebstrap) and a small test base on it are built once per machine into the
layer cache under /var/cache/moat-test/layers (keyed by content hash, so later runs reuse
them); the tests build small layers on top, into this store.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests import early_release
from tests.conftest import require_tier
from tests.site_env import site_options

from moat.store import AuditLog
from moat.templates.build import Builder
from moat.templates.define import Base, Step, TemplateDef
from moat.templates.ref import TemplateRef
from moat.templates.store import Store, remove_tree

LAYERS = Path(os.environ.get("MOAT_TEST_TEMPLATE_LAYERS", "/var/cache/moat-test/layers"))
TEST_BASE = TemplateDef(Base("debian", "bookworm"), (Step("apt", ("jq", "python3-pip")),))


class Log:
    def __init__(self) -> None:
        self.data = bytearray()

    def __call__(self, chunk: bytes) -> None:
        self.data += chunk


#: every builder the tests made: the layers they added leave the machine's cache afterwards
BUILDERS: list[Builder] = []


def builder(store: Store, **kw: object) -> tuple[Builder, Log]:
    log = Log()
    b = Builder(store, site_options(**kw), audit=AuditLog(), on_output=log)
    BUILDERS.append(b)
    return b, log


def build(store: Store, defn: TemplateDef, name: str | None = None, ctx: Path | None = None,
          **kw: object) -> tuple[TemplateRef, Builder]:  # fmt: skip
    b, _ = builder(store, **kw)
    return asyncio.run(b.build(defn, name, ctx)), b


def seed_base(s: Store) -> None:
    """The Debian base layer (mmdebstrap), copied from the default store's layer cache when
    ``make install``'s default templates built it there (same key: ``TEST_BASE`` and the
    defaults start from ``Base("debian", "bookworm")``): CI builds it once."""
    key = TEST_BASE.layer_keys()[0]
    src = Store.default().layers / key
    if s.layer(key) is not None or not (src / "layer.json").is_file():
        return
    with s.lock(key):  # the lock a build of this layer takes
        if s.layer(key) is None:
            tmp = s.tmpdir(s.layers)
            os.rmdir(tmp)  # a fresh name (gc's pattern for a dead run's leftovers)
            subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(tmp)], check=True)
            os.rename(tmp, s.layers / key)


@pytest.fixture(scope="session")
def store() -> Iterator[Store]:
    require_tier("container")
    d = Path(tempfile.mkdtemp(prefix="moat-test-templates-", dir="/var/tmp"))
    os.chmod(d, 0o755)  # the build ids reach it (pytest's own temp dirs are 0700)
    locks = set(LAYERS.glob("*.lock"))

    def cleanup() -> None:
        # the layers the tests made on top (unique per run) go: the cache must not grow.
        # Only those: another run may be using the same cache right now.
        keep = set(TEST_BASE.layer_keys())
        for key in {k for b in BUILDERS for k in b.built} - keep:
            for p in (LAYERS / key, LAYERS / f"{key}.lock"):
                if p.exists():
                    remove_tree(p)
        for p in set(LAYERS.glob("*.lock")) - locks:  # failed steps' (no layer was made)
            if p.name != "builds.lock" and not (LAYERS / p.name.removesuffix(".lock")).exists():
                p.unlink(missing_ok=True)
        remove_tree(d)

    # ~90,000 files to unlink: started as soon as the last test using the store is done
    finish = early_release.register("store", cleanup)
    try:
        s = Store(d / "templates", LAYERS)
        s.prepare()
        seed_base(s)
        # the test base, built once per machine (its layers stay in the cache)
        build(s, TEST_BASE, "t-base")
        yield s
    finally:
        finish()
