"""A template's start command and ready check (issue 12, moat.engine.startcmd): a sandbox
of it is handed out only once the check passes; one whose check never passes is not handed
out at all (and nothing of it is left); a files-only resume starts the command again."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from tests import template_support
from tests.conftest import require_tier
from tests.test_pause import T, _close, _door, _run

import moat.engine.startcmd as startcmd
from moat.engine.api import FrontDoor
from moat.errors import TimeoutError as MoatTimeoutError

pytestmark = [pytest.mark.asyncio, pytest.mark.container]

FETCH = (
    "import urllib.request; "
    "print(urllib.request.urlopen('http://127.0.0.1:8123/index.html', timeout=5).read().decode())"
)


@pytest_asyncio.fixture
async def door(tmp_path: Path) -> AsyncIterator[FrontDoor]:
    require_tier("container")
    d = _door(tmp_path / "paused")
    yield d
    await _close(d)


def _served_template(marker: str) -> str:
    found = template_support.install(
        "tt-start-" + marker[:6],
        files={"/srv/www/index.html": marker},
        # slow on purpose: the server answers only after two seconds
        start_cmd="sleep 2; exec python3 -m http.server 8123 --bind 127.0.0.1 -d /srv/www",
        ready_cmd=f'python3 -c "{FETCH}"',
    )
    return found.name


async def test_a_sandbox_is_handed_out_once_its_ready_check_passes(door: FrontDoor) -> None:
    marker = "served-" + secrets.token_hex(6)
    cfg = door.resolve(isolation="container", template=_served_template(marker), timeout=120)
    sid = (await door.create(T, cfg)).sandbox_id
    # at once, no retry: the server the start command runs answers already
    assert (await _run(door, sid, FETCH)).strip() == marker
    # files-only pause and resume: the processes are gone, the start command runs again
    await door.pause(T, sid)
    await door.connect(T, sid)
    assert (await _run(door, sid, FETCH)).strip() == marker


async def test_a_ready_check_that_never_passes_fails_the_create(
    door: FrontDoor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(startcmd, "READY_TIMEOUT_S", 2.0)
    found = template_support.install("tt-never-ready", start_cmd="sleep 600", ready_cmd="false")
    cfg = door.resolve(isolation="container", template=found.name, timeout=120)
    with pytest.raises(MoatTimeoutError, match="ready check"):
        await door.create(T, cfg)
    assert await door.list_sandboxes(T) == []  # nothing half-ready handed out or left
    assert door.engine.sessions == {}
