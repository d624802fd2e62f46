"""``moat`` command line: run code in a sandbox, check what this host supports."""

from __future__ import annotations

import sys

import click

from moat.errors import SandboxError


@click.group()
@click.version_option(package_name="moat")
def main() -> None:
    """moat: self-hosted sandboxes for code written by AI agents."""


@main.command()
@click.argument("file", type=click.File("r"), required=False)
@click.option("-c", "code", help="Code to run instead of FILE.")
@click.option(
    "--isolation",
    type=click.Choice(["container", "gvisor", "microvm"]),
    default=None,
    help="Isolation tier (default: what --trust maps to).",
)
@click.option(
    "--trust",
    type=click.Choice(["trusted", "semi-trusted", "untrusted"]),
    default="untrusted",
    show_default=True,
)
@click.option("--timeout", type=float, default=60, show_default=True, help="Seconds for the code.")
@click.option("--memory", type=int, default=512, show_default=True, help="Memory cap in MiB.")
@click.option("--language", type=click.Choice(["python", "bash"]), default="python")
def run(
    file: click.File | None,
    code: str | None,
    isolation: str | None,
    trust: str,
    timeout: float,
    memory: int,
    language: str,
) -> None:
    """Run FILE (or -c CODE) in a fresh sandbox and print its output."""
    from moat import Limits, Sandbox

    if (file is None) == (code is None):
        raise click.UsageError("give exactly one of FILE or -c CODE")
    source = code if code is not None else file.read()  # type: ignore[union-attr]
    try:
        with Sandbox.create(
            isolation=isolation,
            trust=trust,
            timeout=timeout + 30,
            limits=Limits(memory_mb=memory),
        ) as sbx:
            ex = sbx.run_code(
                source,
                language=language,
                timeout=timeout,
                on_stdout=lambda s: (sys.stdout.write(s), sys.stdout.flush()),
                on_stderr=lambda s: (sys.stderr.write(s), sys.stderr.flush()),
            )
    except SandboxError as exc:
        click.echo(f"moat: {type(exc).__name__}: {exc}", err=True)
        sys.exit(2)
    for result in ex.results:
        if result.is_main_result and result.text is not None:
            click.echo(result.text)
        elif result.png is not None:
            click.echo("[image/png result]")
    if ex.error is not None:
        click.echo(ex.error.traceback or f"{ex.error.name}: {ex.error.value}", err=True)
        sys.exit(1)


@main.command()
def doctor() -> None:
    """Which isolation tiers this host supports, and exactly why not."""
    from moat.engine import default_engine

    ok = True
    for tier, reason in default_engine().doctor().items():
        if reason is None:
            click.echo(f"  {tier:<10} available")
        else:
            ok = False
            click.echo(f"  {tier:<10} UNAVAILABLE: {reason}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
