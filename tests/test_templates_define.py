"""Template definitions (issue 12): the model, its hashes and the TOML and Dockerfile front ends.

Pure: no sandbox runs here (tests/test_templates_build.py builds real roots).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moat.errors import InvalidArgumentError, TemplateDefinitionError
from moat.templates import context, dockerfile, toml_def
from moat.templates.define import Base, Step, TemplateDef
from moat.templates.load import load

TOML = """\
name = "small"
base = "debian:bookworm"
apt = ["jq"]
pip = ["six==1.17.0"]
env = { GREETING = "hi" }

[[copy]]
src = "hello.txt"
dest = "/opt/hello.txt"

[[run]]
cmd = "echo done"
network = ["pypi"]
"""


def test_toml_parses_to_ordered_steps() -> None:
    defn, name = toml_def.parse(TOML)
    assert name == "small"
    assert defn.base == Base("debian", "bookworm")
    assert [s.kind for s in defn.steps] == ["apt", "pip", "copy", "run"]
    assert defn.steps[0].allow_out() == ("deb.debian.org",)
    assert defn.steps[1].allow_out() == ("pypi.org", "files.pythonhosted.org")
    assert defn.steps[2].allow_out() == ()  # a copy reaches nothing
    assert defn.steps[3].allow_out() == ("pypi.org", "files.pythonhosted.org")
    assert dict(defn.env) == {"GREETING": "hi"}


@pytest.mark.parametrize(
    ("text", "field", "line"),
    [
        ('base = "debian:bookworm"\nfoo = 1\n', "foo", 2),
        ('apt = ["jq", "-o=APT::X=1"]\n', "apt", 1),
        ('\npip = ["--index-url=http://evil"]\n', "pip", 2),
        ('npm = ["a b"]\n', "npm", 1),
        ('[[copy]]\nsrc = "../outside"\ndest = "/x"\n', "copy.src", 1),
        ('[[copy]]\nsrc = "/etc/passwd"\ndest = "/x"\n', "copy.src", 1),
        ('[[copy]]\nsrc = "a"\ndest = "/x/../../y"\n', "copy.dest", 1),
        ('[[run]]\ncmd = "x"\nnetwork = ["internet"]\n', "network", 1),
        ('base = "debian:sid"\n', "base", 1),
        ('x = "a"\nworkdir = "relative"\n', "x", 1),
        ('workdir = "relative"\n', "workdir", 1),
        ('env = { "1BAD" = "v" }\n', "env.1BAD", 1),
    ],
)
def test_toml_errors_name_field_and_line(text: str, field: str, line: int) -> None:
    with pytest.raises(TemplateDefinitionError) as info:
        toml_def.parse(text)
    assert info.value.field == field
    assert info.value.line == line
    assert f"line {line}" in str(info.value)
    assert isinstance(info.value, InvalidArgumentError)


def test_template_id_is_a_content_hash() -> None:
    a, _ = toml_def.parse(TOML)
    b, _ = toml_def.parse(TOML.replace('name = "small"', 'name = "other"'))
    assert a.template_id() == b.template_id()  # the name is not content
    assert len(a.template_id()) == 64 and int(a.template_id(), 16) >= 0
    c, _ = toml_def.parse(TOML.replace("echo done", "echo changed"))
    ka, kc = a.layer_keys(), c.layer_keys()
    assert ka[:-1] == kc[:-1] and ka[-1] != kc[-1]  # only the last layer changes
    d, _ = toml_def.parse(TOML.replace('GREETING = "hi"', 'GREETING = "ho"'))
    assert d.layer_keys() == ka and d.template_id() != a.template_id()  # settings: same root


def test_copied_file_content_is_in_the_hash(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("one")
    defn = TemplateDef(Base("debian", "bookworm"), (Step("copy", ("hello.txt", "/opt/h")),))
    stage = tmp_path / "stage"
    stage.mkdir()
    first = context.stage(tmp_path, "hello.txt", stage / "a")
    (tmp_path / "hello.txt").write_text("two")
    second = context.stage(tmp_path, "hello.txt", stage / "b")
    assert first != second
    k1 = TemplateDef(defn.base, (Step("copy", defn.steps[0].args, files=first),)).layer_keys()
    k2 = TemplateDef(defn.base, (Step("copy", defn.steps[0].args, files=second),)).layer_keys()
    assert k1[-1] != k2[-1]


def test_context_refuses_symlinks_out(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    (ctx / "d").mkdir(parents=True)
    (ctx / "d" / "ok").write_text("ok")
    os.symlink("ok", ctx / "d" / "inside")
    os.symlink("/etc/passwd", ctx / "abs")
    os.symlink("../../outside", ctx / "d" / "up")
    os.symlink(str(tmp_path), ctx / "via")
    stage = tmp_path / "stage"
    stage.mkdir()
    for bad in ("abs", "via/ctx/d/ok", "d"):
        with pytest.raises(TemplateDefinitionError, match="symlink"):
            context.stage(ctx, bad, stage / bad.replace("/", "_"))
    (ctx / "d" / "up").unlink()
    entries = context.stage(ctx, "d", stage / "good")
    assert ("inside", "l", "ok") in entries
    assert os.readlink(stage / "good" / "inside") == "ok"  # copied as a link, not followed


DOCKERFILE = """\
FROM debian:bookworm
ARG SIX=1.17.0
ENV GREETING=hi
RUN apt-get update && \\
    apt-get install -y jq
COPY hello.txt /opt/hello.txt
WORKDIR /srv
USER user
CMD ["python3", "-m", "http.server"]
"""


def test_dockerfile_subset() -> None:
    defn = dockerfile.parse(DOCKERFILE)
    assert defn.base == Base("debian", "bookworm")
    assert [s.kind for s in defn.steps] == ["run", "copy"]
    assert "apt-get install -y jq" in defn.steps[0].args[0]
    assert defn.steps[0].allow_out() == (
        "deb.debian.org",
        "pypi.org",
        "files.pythonhosted.org",
        "registry.npmjs.org",
    )
    assert defn.steps[1].args == ("hello.txt", "/opt/hello.txt")
    assert defn.workdir == "/srv" and defn.user == "user"
    assert defn.start_cmd == "python3 -m http.server"
    assert dict(defn.env) == {"GREETING": "hi"}
    assert dockerfile.parse("FROM base\nRUN true\n").base == Base("template", "base")


@pytest.mark.parametrize(
    ("text", "instruction", "line"),
    [
        ("FROM debian:bookworm\nEXPOSE 80\n", "EXPOSE", 2),
        ('FROM debian:bookworm\nRUN true\nENTRYPOINT ["x"]\n', "ENTRYPOINT", 3),
        ("FROM debian:bookworm\nHEALTHCHECK CMD true\n", "HEALTHCHECK", 2),
        ("FROM ubuntu:22.04\n", "FROM", 1),
        ("FROM debian:bookworm AS build\n", "FROM", 1),
        ("FROM debian:bookworm\nFROM debian:bookworm\n", "FROM", 2),
        ("FROM debian:bookworm\nCOPY --from=x /a /b\n", "COPY", 2),
        ("FROM debian:bookworm\nADD https://example.com/x /x\n", "ADD", 2),
        ("FROM debian:bookworm\nADD x.tar.gz /x\n", "ADD", 2),
        ("RUN true\n", "RUN", 1),
    ],
)
def test_dockerfile_errors_name_the_line(text: str, instruction: str, line: int) -> None:
    with pytest.raises(TemplateDefinitionError) as info:
        dockerfile.parse(text)
    assert info.value.field == instruction
    assert info.value.line == line


def test_load_picks_the_front_end(tmp_path: Path) -> None:
    (tmp_path / "moat.toml").write_text('apt = ["jq"]\n')
    defn, name, ctx = load(tmp_path)
    assert defn.steps[0].kind == "apt" and name is None and ctx == tmp_path
    (tmp_path / "Dockerfile").write_text("FROM debian:bookworm\nRUN true\n")
    assert load(tmp_path / "Dockerfile")[0].steps[0].kind == "run"
    (tmp_path / "img.tar").write_bytes(b"")
    assert load(tmp_path / "img.tar")[0].base == Base("oci", "img.tar")
    with pytest.raises(TemplateDefinitionError):
        load(tmp_path / "missing.toml")


def test_python_builder_in_e2b_shape() -> None:
    from moat.templates.builder import Template

    t = (
        Template()
        .from_debian_image("bookworm")
        .apt_install(["jq"])
        .pip_install("six")
        .copy("hello.txt", "/opt/hello.txt")
        .run_cmd(["echo a", "echo b"])
        .set_envs({"GREETING": "hi"})
        .set_workdir("/opt")
        .set_start_cmd("python3 -m http.server", "true")
    )
    defn = t.to_definition()
    assert [s.kind for s in defn.steps] == ["apt", "pip", "copy", "run"]  # in call order
    assert defn.steps[3].args == ("echo a && echo b",)
    assert defn.workdir == "/opt" and defn.ready_cmd == "true"
    assert Template().from_template("base").to_definition().base == Base("template", "base")
    with pytest.raises(TemplateDefinitionError, match="registry"):
        Template().from_image("python:3.12")
    with pytest.raises(TemplateDefinitionError):
        Template().apt_install(["--evil"])


def test_sparse_files_count_at_their_apparent_size(tmp_path: Path) -> None:
    """A build step's sparse files would slip under a cap that counts blocks, then become a
    full-size microVM disk image: the size that counts is the larger one."""
    from moat.templates.store import tree_bytes

    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(8 << 30)
    (tmp_path / "small").write_bytes(b"x" * 10)
    assert tree_bytes(tmp_path) >= 8 << 30


def test_build_output_cannot_drive_the_admins_terminal() -> None:
    """A package's output (untrusted) reaches `moat template build`'s terminal inert: escape,
    OSC and C1 control bytes are shown as '?', text, tabs and line ends stay."""
    from moat.templates.commands import _inert

    out = _inert(b"ok\x1b]52;c;ZXZpbA==\x07 tab\tnl\r\n \xc2\x9b31m caf\xc3\xa9")
    assert b"\x1b" not in out and b"\x07" not in out and b"\xc2\x9b" not in out
    assert out == b"ok?]52;c;ZXZpbA==? tab\tnl\r\n ?31m caf\xc3\xa9"
