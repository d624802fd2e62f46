"""E2B's template build request mapped onto moat's definition, upload archives checked
(issue 12): pure and file-system checks, no sandbox. The end-to-end path with the real SDK
is tests/test_server_templates.py.

Archives are made the way the E2B SDK makes them (its own ``calculate_files_hash`` and
``tar_file_stream``), and hostile ones by hand; every extraction is checked from outside
(what exists on disk afterwards, and nothing outside the target directory).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from e2b.template.utils import calculate_files_hash, tar_file_stream

from moat.errors import InvalidArgumentError, QuotaExceededError
from moat.templates import e2b
from moat.templates.store import Store
from moat.templates.tenant import TenantTemplates, visible

BASE_ID = "b" * 64


def _resolve(name: str) -> str | None:
    return BASE_ID if name in ("base", "mine") else None


def _plan(body: dict[str, Any]) -> e2b.Plan:
    return e2b.plan(body, _resolve)


def _sdk_upload(ctx: Path, src: str, dest: str, out: Path) -> e2b.Copy:
    """The archive and files hash exactly as E2B's SDK makes them."""
    files_hash = calculate_files_hash(src, dest, str(ctx), [], False, None)
    with tar_file_stream(src, str(ctx), [], False, True) as f:
        out.write_bytes(f.read())
    return e2b.Copy(1, src, dest, files_hash)


def test_steps_map_onto_moat_steps_and_settings() -> None:
    p = _plan(
        {
            "fromImage": "debian:bookworm",
            "steps": [
                {"type": "ENV", "args": ["A", "1", "B", "two words"]},
                {"type": "RUN", "args": ["echo hi"]},
                {"type": "WORKDIR", "args": ["/opt/app"]},
                {"type": "COPY", "args": ["app", "/opt/app/", "", ""], "filesHash": "a" * 64},
                {"type": "RUN", "args": ["make", "root"]},
                {"type": "USER", "args": ["user"]},
            ],
        }
    )
    d = p.defn
    assert d.base.kind == "debian" and d.base.ref == "bookworm"
    assert [s.kind for s in d.steps] == ["run", "copy", "run"]
    assert p.step_numbers == (2, 4, 5)
    assert d.env == (("A", "1"), ("B", "two words")) and d.workdir == "/opt/app"
    first, copy, second = d.steps
    assert "export B='two words'" in first.args[0] and "setpriv --reuid=user" in first.args[0]
    assert first.network == e2b.RUN_SOURCES
    assert "setpriv" not in second.args[0] and "cd /opt/app" in second.args[0]
    assert copy.args == ("s4/app", "/opt/app/")
    assert p.copies == (e2b.Copy(4, "app", "/opt/app/", "a" * 64),)


def test_a_forced_upload_is_no_forced_rebuild() -> None:
    copy = {"type": "COPY", "args": ["a", "/b"], "filesHash": "a" * 64, "force": True}
    assert _plan({"steps": [{**copy, "forceUpload": True}], "fromImage": "debian:12"}).copies
    with pytest.raises(InvalidArgumentError, match="skip_cache"):
        _plan({"steps": [copy], "fromImage": "debian:12"})


def test_bases_map_or_are_refused_by_name() -> None:
    assert _plan({"fromTemplate": "mine"}).defn.base.ref == BASE_ID
    assert _plan({"fromImage": "e2bdev/base"}).defn.base.ref == BASE_ID  # the SDK's default
    assert _plan({"fromImage": "debian:12"}).defn.base.ref == "bookworm"
    with pytest.raises(InvalidArgumentError, match="python:3"):
        _plan({"fromImage": "python:3"})
    with pytest.raises(InvalidArgumentError, match="was not found"):
        _plan({"fromTemplate": "other-tenants"})
    with pytest.raises(InvalidArgumentError, match="registries"):
        _plan({"fromImage": "x", "fromImageRegistry": {"type": "registry"}})


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"force": True}, "skip_cache"),
        ({"steps": [{"type": "RUN", "args": ["x"], "force": True}]}, "skip_cache"),
        (
            {"steps": [{"type": "COPY", "args": ["a", "/b", "", "0755"], "filesHash": "a" * 64}]},
            "user or mode",
        ),
        (
            {"steps": [{"type": "COPY", "args": ["a", "/b", "root", ""], "filesHash": "a" * 64}]},
            "user or mode",
        ),
        ({"steps": [{"type": "COPY", "args": ["*.py", "/b"], "filesHash": "a" * 64}]}, "glob"),
        ({"steps": [{"type": "COPY", "args": ["../x", "/b"], "filesHash": "a" * 64}]}, "inside"),
        ({"steps": [{"type": "COPY", "args": ["x", "/b"]}]}, "filesHash"),
        ({"steps": [{"type": "ENV", "args": ["A-B", "1"]}]}, "variable name"),
        ({"steps": [{"type": "USER", "args": ["Root;rm"]}]}, "user name"),
        ({"steps": [{"type": "HEALTHCHECK", "args": []}]}, "not supported"),
    ],
)
def test_what_does_not_map_is_refused_naming_it(body: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        _plan({"fromImage": "debian:bookworm", **body})


def test_sdk_archive_extracts_and_its_hash_checks(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    (ctx / "app" / "sub").mkdir(parents=True)
    (ctx / "app" / "sub" / "x.py").write_text("print(1)\n")
    (ctx / "app" / "run.sh").write_text("#!/bin/sh\n")
    (ctx / "app" / "run.sh").chmod(0o755)
    os.symlink("sub/x.py", ctx / "app" / "link.py")
    copy = _sdk_upload(ctx, "app", "/opt/app", tmp_path / "up.tar")
    out = tmp_path / "out"
    out.mkdir()
    e2b.extract(tmp_path / "up.tar", out, copy)
    assert (out / "app/sub/x.py").read_text() == "print(1)\n"
    assert os.readlink(out / "app/link.py") == "sub/x.py"
    assert os.stat(out / "app/run.sh").st_mode & 0o111
    # the same archive under another destination's hash: refused
    other = e2b.Copy(1, "app", "/elsewhere", copy.files_hash)
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(InvalidArgumentError, match="do not match their filesHash"):
        e2b.extract(tmp_path / "up.tar", again, other)
    # changed content under the old hash: refused
    (ctx / "app" / "sub" / "x.py").write_text("print(2)\n")
    _sdk_upload(ctx, "app", "/opt/app", tmp_path / "changed.tar")
    third = tmp_path / "third"
    third.mkdir()
    with pytest.raises(InvalidArgumentError, match="filesHash"):
        e2b.extract(tmp_path / "changed.tar", third, copy)


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([_file("../escaped")], r"'\.\.'"),
        ([_file("a/../../escaped")], r"'\.\.'"),
        ([_file("/abs/escaped")], "bad path"),
        ([_link("a", "/"), _file("a/escaped")], "pointing outside"),
        ([_link("a", "."), _file("a/escaped")], "through a file or symlink"),
        ([_link("a", ".."), _file("a/escaped")], "pointing outside"),
        ([_link("a", "../../x")], "pointing outside"),
        ([_file("f"), _file("f/escaped")], "through a file or symlink"),
        ([_file("f"), _file("f")], "repeats"),
        ([_link("h", "/etc/passwd", tarfile.LNKTYPE)], "bad path"),
        ([_link("h", "../x", tarfile.LNKTYPE)], r"'\.\.'"),
        ([_link("h", "nothing-before", tarfile.LNKTYPE)], "bad hard link"),
        ([_link("d", "", tarfile.CHRTYPE)], "only files"),
        ([_link("p", "", tarfile.FIFOTYPE)], "only files"),
    ],
)
def test_hostile_archives_are_refused_and_nothing_lands_outside(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], match: str
) -> None:
    _tar(tmp_path / "bad.tar", members)
    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    with pytest.raises(InvalidArgumentError, match=match):
        e2b.extract(tmp_path / "bad.tar", out, e2b.Copy(1, ".", "/", "0" * 64))
    # nothing outside the target, checked from outside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar", "deep"]
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["out"]
    assert not Path("/abs/escaped").exists()


def test_not_a_tar_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"\x1f\x8b" + os.urandom(200))
    with pytest.raises(InvalidArgumentError, match="not a valid tar"):
        e2b.extract(tmp_path / "junk", tmp_path, e2b.Copy(1, ".", "/", "0" * 64))


def test_tenant_names_are_private_and_counted(tmp_path: Path) -> None:
    store = Store(tmp_path / "templates", tmp_path / "layers")
    store.prepare()
    alice, bob = TenantTemplates(store, "alice"), TenantTemplates(store, "bob")
    rec = alice.request("web", max_count=1)
    assert alice.request("web", max_count=1) == rec  # the same name: the same template
    with pytest.raises(QuotaExceededError, match="limit"):
        alice.request("other", max_count=1)
    tid, stray = "c" * 64, "f" * 64
    for t in (tid, stray):
        (store.templates / t).mkdir()
        (store.templates / t / "template.json").write_text("{}")
    alice.set_tags(rec["templateID"], ["default"], tid)
    store.gc()  # a tenant's template is named in its own area: gc keeps it, not the stray
    assert (store.templates / tid).is_dir() and not (store.templates / stray).exists()
    assert alice.resolve("web") == tid and alice.resolve(rec["templateID"]) == tid
    assert alice.resolve(tid) == tid
    # bob: none of alice's names, ids or content ids resolve; the engine's check refuses it
    for name in ("web", "web:default", rec["templateID"], tid):
        assert bob.resolve(name) is None and bob.get(name) is None
    assert not visible(store, "bob", tid) and visible(store, "alice", tid)
    assert bob.delete(rec["templateID"]) is False and (store.templates / tid).is_dir()
    # an id being built is the builder's before it is published
    other = "e" * 64
    alice.claim(rec["templateID"], other)
    assert not visible(store, "bob", other) and visible(store, "alice", other)
    alice.claim(rec["templateID"], None)
    assert visible(store, "bob", other)  # owned by no tenant: an operator's, by id
    # a host-wide template is everyone's
    store.set_name("base", "d" * 64)
    assert bob.resolve("base") == "d" * 64 and visible(store, "bob", "d" * 64)
    # alice deletes: the root no one else uses goes
    assert alice.delete("web") is True
    assert not (store.templates / tid).exists() and alice.records() == []


def test_start_and_ready_commands_become_the_templates() -> None:
    """Run by the engine when each sandbox of it starts (moat.engine.startcmd)."""
    got = _plan(
        {"fromImage": "debian:bookworm", "startCmd": "python3 app.py", "readyCmd": "true"}
    ).defn
    assert (got.start_cmd, got.ready_cmd) == ("python3 app.py", "true")
    assert _plan({"fromImage": "debian:bookworm"}).defn.start_cmd is None
