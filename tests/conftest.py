"""Shared fixtures. Tests start REAL sandboxes; nothing of the isolation layer is mocked.

The core suites run on every tier (``MOAT_TIERS``, default all three). A tier CI must prove
that is missing here fails the run, it is not skipped (``MOAT_ALLOW_SKIP=1`` skips instead).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

# The suite counts sandbox processes from outside; a warm pool refilling in the background
# would add some. The pool has its own tests (test_pool.py, with their own engine).
os.environ.setdefault("MOAT_WARM_POOL", "0")
# The bulk of the suite runs on the host's /usr (template "host"), pinned here for speed: it
# tests moat's own behaviour, which is the same on every root, and needs no 1.6 GiB template
# per state directory. The built default (code-interpreter, issue 12) has its own tests that
# unset this (tests/test_default_template.py: README example, demo, charts, E2B names, the
# host's files invisible, the error when it is not built); set it to run the suite on another.
os.environ.setdefault("MOAT_DEFAULT_TEMPLATE", "host")
# Each run writes an audit store of its own, never the host's <state dir>/audit.db that the
# operator's `moat serve` and other runs (other code versions) use; CLI children inherit it.
if "MOAT_AUDIT_DB" not in os.environ:
    _audit_dir = tempfile.mkdtemp(prefix="moat-test-audit-")
    os.environ["MOAT_AUDIT_DB"] = os.path.join(_audit_dir, "audit.db")
    # Registered before moat is imported, so it runs last at exit (atexit is LIFO): after the
    # store's own exit hook has flushed and closed it.
    atexit.register(shutil.rmtree, _audit_dir, True)

# After the block above: importing moat registers the store's exit hook, which must run first.
from moat import Sandbox
from moat.engine.tiers import runtime_for

# The server tests' shared fixtures (`server`, `key_a`): a real `moat serve` per module; the
# build tests' template store; a session fixture's heavy cleanup started after its last user.
pytest_plugins = ["tests.early_release", "tests.server_fixtures", "tests.template_store"]

if os.environ.get("MOAT_SUITE_PURE") == "1":
    # The tests that run beside the sandbox suite (tests/run_suite.sh) must start no sandbox:
    # the suite's checks from outside would see it.
    import moat.engine.engine as _engine_mod
    import moat.engine.tiers as _tiers_mod

    def _no_sandbox(tier: str) -> object:
        raise AssertionError(f"a test run beside the sandbox suite asked for the {tier} tier")

    for _mod in (_tiers_mod, _engine_mod):
        setattr(_mod, "runtime_for", _no_sandbox)  # noqa: B010 (a module's global)

TIERS = [t for t in os.environ.get("MOAT_TIERS", "container,gvisor,microvm").split(",") if t]
TIER_PARAMS = [pytest.param(t, marks=getattr(pytest.mark, t), id=t) for t in TIERS]


def require(reason: str | None, what: str) -> None:
    """A prerequisite of a test: missing, it fails the test, because CI must prove the thing
    (MOAT_ALLOW_SKIP=1 turns that into a skip, for development machines without it)."""
    if reason is None:
        return
    if os.environ.get("MOAT_ALLOW_SKIP") == "1":
        pytest.skip(f"{what} unavailable: {reason}")
    pytest.fail(f"{what} unavailable on this host: {reason}")


def require_tier(tier: str) -> None:
    """Fail (not skip) when a tier that CI must prove is missing; MOAT_ALLOW_SKIP=1 skips."""
    require(runtime_for(tier).probe(), f"the {tier} tier")


@pytest.fixture(params=TIER_PARAMS)
def tier(request: pytest.FixtureRequest) -> str:
    """Each isolation tier in turn."""
    require_tier(request.param)
    return str(request.param)


@pytest.fixture
def sbx(tier: str) -> Iterator[Sandbox]:
    """A fresh sandbox on ``tier``, killed after the test."""
    with Sandbox.create(isolation=tier, timeout=300) as s:
        yield s


@pytest.fixture(scope="module", params=TIER_PARAMS)
def shared_sbx(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """One sandbox per tier for a module's checks that leave no state behind."""
    require_tier(request.param)
    with Sandbox.create(isolation=request.param, timeout=900) as s:
        yield s


@pytest.fixture
def container_sbx() -> Iterator[Sandbox]:
    """A container-tier sandbox, for checks that look at container internals from outside."""
    require_tier("container")
    with Sandbox.create(isolation="container", timeout=300) as s:
        yield s
