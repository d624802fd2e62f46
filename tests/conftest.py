"""Shared fixtures. Tests start REAL sandboxes; nothing of the isolation layer is mocked."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from moat import Sandbox
from moat.engine.tiers import runtime_for


def require_tier(tier: str) -> None:
    """Fail (not skip) when a tier that CI must prove is missing; MOAT_ALLOW_SKIP=1 skips."""
    reason = runtime_for(tier).probe()
    if reason is None:
        return
    if os.environ.get("MOAT_ALLOW_SKIP") == "1":
        pytest.skip(f"{tier} unavailable: {reason}")
    pytest.fail(f"{tier} tier unavailable on this host: {reason}")


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    """A fresh container-tier sandbox, killed after the test."""
    require_tier("container")
    with Sandbox.create(isolation="container", timeout=300) as s:
        yield s


@pytest.fixture(scope="module")
def shared_sbx() -> Iterator[Sandbox]:
    """One container sandbox for read-only checks of a module (faster)."""
    require_tier("container")
    with Sandbox.create(isolation="container", timeout=600) as s:
        yield s
