"""Fixtures shared by the server test modules (a pytest plugin: tests/conftest.py loads it).

A module that defines a fixture of the same name keeps its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.conftest import require_tier
from tests.server_support import Server, new_key, serving, tenant_name


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real ``moat serve`` (container tier) shared by a test module: import it there."""
    require_tier("container")
    with serving(tmp_path_factory.mktemp("serve") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def key_a(server: Server) -> str:
    """A key of a fresh tenant on the module's server."""
    return new_key(tenant_name("alice"))
