"""Which root a template name stands for (issue 12): no sandbox starts here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests import template_support

from moat.engine import resolve, templating
from moat.errors import InvalidArgumentError, TemplateNotBuiltError


def _small_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python3").write_text("")
    return root


def test_host_and_default_are_the_hosts_usr() -> None:
    assert templating.lookup("host") is None
    assert templating.lookup("default") is None  # the suite pins the default to "host"
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
    monkeypatch.setenv(templating.DEFAULT_ENV, "tt-default")
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


def test_the_default_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(templating.DEFAULT_ENV)
    assert templating.default_template() == "code-interpreter"  # built, not the host's /usr
    for bad in ("default", "../x", "A", "x" * 70):
        monkeypatch.setenv(templating.DEFAULT_ENV, bad)
        with pytest.raises(InvalidArgumentError, match="MOAT_DEFAULT_TEMPLATE"):
            templating.default_template()
    monkeypatch.setenv(templating.DEFAULT_ENV, "host")
    assert templating.default_template() == "host"


def test_e2b_names_map_to_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(templating.DEFAULT_ENV)
    assert templating.e2b_template("base") == "base"
    assert templating.e2b_template("code-interpreter-v1") == "code-interpreter"
    assert templating.e2b_template("default") == "code-interpreter"
    monkeypatch.setenv(templating.DEFAULT_ENV, "host")  # another default: all three follow it
    assert {templating.e2b_template(n) for n in ("base", "code-interpreter-v1", "default")} == {
        "host"
    }


def test_a_default_not_built_names_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty template store: the default fails clearly, never falls back to host (inv. 7)."""
    monkeypatch.setenv("MOAT_STATE_DIR", str(tmp_path))
    monkeypatch.delenv(templating.DEFAULT_ENV)
    for name in ("default", "base", "code-interpreter", "code-interpreter-v1"):
        with pytest.raises(TemplateNotBuiltError, match="moat template build --defaults") as e:
            resolve.resolve(template=name)
        assert e.value.command == "moat template build --defaults"
        assert str(tmp_path) not in str(e.value)  # no host path (invariant 8)
        with pytest.raises(TemplateNotBuiltError):
            templating.lookup(name)
    monkeypatch.setenv(templating.DEFAULT_ENV, "tt-mine")  # a configured default, not built
    with pytest.raises(TemplateNotBuiltError, match="'tt-mine' is not built"):
        resolve.resolve()
    with pytest.raises(InvalidArgumentError, match="'tt-mine' was not found"):
        resolve.resolve(template="tt-mine")  # named, it is just unknown
