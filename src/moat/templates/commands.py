"""``moat template build | list | rm | gc`` (the command group; ``moat.cli`` adds it).

Trust domain: caller (an admin on the host). Build output is what the build's sandboxes
printed, passed through as the build's log; errors are moat's typed errors.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path
from typing import Any

import click

from moat.errors import SandboxError, TemplateBuildError


def _on_sigterm(_sig: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # the build's cleanup runs as for ^C: nothing is left behind


#: Control bytes a build's sandbox could use to drive the admin's terminal (OSC 52 writes the
#: clipboard, CSI/OSC retitle and redraw it): everything below 0x20 but tab, LF and CR, DEL
#: and the C1 range. What a package prints is untrusted like the package.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\xc2[\x80-\x9f]")


def _inert(data: bytes) -> bytes:
    """``data`` with terminal control bytes shown as ``?``."""
    return _CONTROL.sub(b"?", data)


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(_inert(data))
    sys.stdout.buffer.flush()


@click.group()
def template() -> None:
    """Templates: root filesystems plus settings, built in sandboxes (docs/templates.md)."""


@template.command("build")
@click.argument("path", type=click.Path(exists=True, path_type=Path), required=False)
@click.option("--name", default=None, help="Name the template (default: the file's own name).")
@click.option("--defaults", is_flag=True, help="Build the default templates (base, ...).")
@click.option("--build-arg", "build_args", multiple=True, metavar="K=V", help="Dockerfile ARG.")
@click.option("--size-cap", type=click.IntRange(64, 1 << 20), default=None, help="MiB.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the template's id.")
def build_cmd(
    path: Path | None,
    name: str | None,
    defaults: bool,
    build_args: tuple[str, ...],
    size_cap: int | None,
    quiet: bool,
) -> None:
    """Build the template at PATH (moat.toml, Dockerfile, image .tar, or a directory)."""
    from moat.templates.build import Builder, BuildOptions
    from moat.templates.defaults import DEFAULTS
    from moat.templates.load import load

    if defaults == (path is not None):
        raise click.UsageError("give a PATH or --defaults")
    signal.signal(signal.SIGTERM, _on_sigterm)
    kw = {"size_cap_mb": size_cap} if size_cap else {}
    try:
        builder = Builder(
            options=BuildOptions.from_env(**kw), on_output=(lambda b: None) if quiet else _write
        )
        if defaults:
            for defn, names in DEFAULTS:
                ref = asyncio.run(builder.build(defn, names[0]))
                for extra in names[1:]:
                    builder.store.set_name(extra, ref.id)
                click.echo(ref.id if quiet else f"{', '.join(names)}: {ref.id}")
            return
        assert path is not None
        args = dict(a.partition("=")[::2] for a in build_args)
        defn, own_name, context = load(path.resolve(), args)
        ref = asyncio.run(builder.build(defn, name or own_name, context))
    except TemplateBuildError as exc:
        click.echo(f"moat: {exc}", err=True)
        if exc.output:
            tail = _inert(exc.output.encode("utf-8", "replace")).decode("utf-8", "replace")
            click.echo(f"--- last output of the step ---\n{tail}", err=True)
        sys.exit(1)
    except SandboxError as exc:
        click.echo(f"moat: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("moat: build cancelled", err=True)
        sys.exit(130)
    click.echo(ref.id if quiet else f"{ref.name}: {ref.id}")


@template.command("list")
def list_cmd() -> None:
    """The built templates: names, id, size."""
    from moat.templates.store import Store

    rows = Store.default().list()
    if not rows:
        click.echo("no templates")
        return
    for r in rows:
        names = ",".join(r["names"]) or "-"
        click.echo(f"{r['id'][:12]}  {names:<40}  {r['bytes'] / 2**20:8.1f} MiB")


@template.command("rm")
@click.argument("name")
def rm_cmd(name: str) -> None:
    """Remove NAME (the template goes when no other name refers to it)."""
    from moat.templates.store import Store

    try:
        tid = Store.default().remove(name)
    except SandboxError as exc:
        click.echo(f"moat: {exc}", err=True)
        sys.exit(1)
    click.echo(f"removed {name} ({tid[:12]})")


@template.command("gc")
def gc_cmd() -> None:
    """Remove unnamed templates, unused build layers and what cancelled builds left."""
    from moat.templates.store import Store

    store = Store.default()
    store.prepare()
    out = store.gc()
    click.echo(", ".join(f"{v} {k}" for k, v in out.items()) + " removed")
