"""Which root a template name stands for (issue 12): no sandbox starts here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests import template_support

from moat.engine import resolve, templating
from moat.errors import InvalidArgumentError


def _small_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python3").write_text("")
    return root


def test_host_and_default_are_the_hosts_usr() -> None:
    assert templating.lookup("host") is None
    assert templating.lookup("default") is None  # DEFAULT_TEMPLATE is "host" for now
    assert resolve.resolve(template="host").template == "host"
    assert resolve.resolve().template == "default"


def test_a_built_template_resolves_with_its_settings(tmp_path: Path) -> None:
    made = template_support.install(
        "tt-small", src=_small_root(tmp_path), env={"A": "template", "B": "template"}, workdir="/w"
    )
    found = templating.lookup("tt-small")
    assert found is not None and found.id == made.id
    assert templating.lookup(made.id) == found  # by id too
    args = templating.spec_args(found, (("B", "caller"),))
    assert args["rootfs"] == str(made.rootfs) and args["template_id"] == made.id
    assert args["workdir"] == "/w"
    assert dict(args["envs"]) == {"A": "template", "B": "caller"}  # the caller's env wins
    assert resolve.resolve(template="tt-small").template == "tt-small"


def test_the_default_is_one_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = template_support.install("tt-default", src=_small_root(tmp_path))
    monkeypatch.setattr(templating, "DEFAULT_TEMPLATE", "tt-default")
    found = templating.lookup("default")
    assert found is not None and found.id == made.id


def test_unknown_and_bad_names_are_refused() -> None:
    for bad in ("tt-none-such", "A", "../x", "", "x" * 70):
        with pytest.raises(InvalidArgumentError):
            resolve.resolve(template=bad)
    with pytest.raises(InvalidArgumentError, match="template 'tt-none-such' was not found"):
        templating.lookup("tt-none-such")


def test_a_root_checked_once_is_checked_again_when_replaced(tmp_path: Path) -> None:
    made = template_support.install("tt-recheck", src=_small_root(tmp_path))
    assert templating.lookup("tt-recheck") is not None
    os.unlink(made.rootfs / "usr/bin/python3")
    meta = made.rootfs.parent / "template.json"
    os.utime(meta, ns=(1, 1))  # a rebuilt template.json: the memo no longer applies
    with pytest.raises(InvalidArgumentError, match="no /usr/bin/python3"):
        templating.lookup("tt-recheck")
