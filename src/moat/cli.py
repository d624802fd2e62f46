"""``moat`` command line: run code in a sandbox, check what this host supports, read the audit.

Trust domain: caller. Audit rows hold text that came from sandboxes (host names, reasons);
it was stripped of control characters when it was written and is shown as data only.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sqlite3
import sys
from typing import Any

import click

from moat.errors import SandboxError
from moat.model.tiers import TIERS, TRUST_LEVELS


@click.group()
@click.version_option(package_name="moat")
def main() -> None:
    """moat: self-hosted sandboxes for code written by AI agents."""


@main.command()
@click.option(
    "--isolation",
    type=click.Choice(list(TIERS)),
    default=None,
    help="Isolation tier (default: what --trust maps to).",
)
@click.option(
    "--trust",
    type=click.Choice(list(TRUST_LEVELS)),
    default=None,
    help="Trust level, mapped to a tier (default: untrusted -> microvm).",
)
@click.option(
    "--timeout", type=float, default=3600, show_default=True, help="Sandbox lifetime (s)."
)
@click.option(
    "-c", "cmd", default=None, help="Command to run on the terminal (default: bash -i -l)."
)
def shell(isolation: str | None, trust: str | None, timeout: float, cmd: str | None) -> None:
    """An interactive shell on a terminal inside a fresh sandbox (killed when it ends)."""
    from moat import Sandbox
    from moat.sdk.shell import interactive_shell

    try:
        with Sandbox.create(isolation=isolation, trust=trust, timeout=timeout) as sbx:
            code = interactive_shell(sbx, cmd)
    except SandboxError as exc:
        click.echo(f"moat: {type(exc).__name__}: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)


@main.command()
@click.argument("file", type=click.File("r"), required=False)
@click.option("-c", "code", help="Code to run instead of FILE.")
@click.option(
    "--isolation",
    type=click.Choice(list(TIERS)),
    default=None,
    help="Isolation tier (default: what --trust maps to).",
)
@click.option(
    "--trust",
    type=click.Choice(list(TRUST_LEVELS)),
    default=None,
    help="Trust level, mapped to a tier (default: untrusted -> microvm).",
)
@click.option("--profile", default=None, help="A profile of the policy file (docs/profiles.md).")
@click.option(
    "--policy-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Policy file (default: $MOAT_POLICY_FILE).",
)
@click.option("--timeout", type=float, default=60, show_default=True, help="Seconds for the code.")
@click.option("--memory", type=int, default=None, help="Memory cap in MiB (default 512).")
@click.option("--language", type=click.Choice(["python", "bash"]), default="python")
def run(
    file: click.File | None,
    code: str | None,
    isolation: str | None,
    trust: str | None,
    profile: str | None,
    policy_file: str | None,
    timeout: float,
    memory: int | None,
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
            limits=Limits(memory_mb=memory) if memory is not None else None,
            profile=profile,
            policy_file=policy_file,
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
            if tier == "gvisor":
                from moat.runtime.gvisor import compat

                note = compat.problem()
                if note is not None:
                    click.echo(f"  {'':<10} note: {note}")
        else:
            ok = False
            click.echo(f"  {tier:<10} UNAVAILABLE: {reason}")
    sys.exit(0 if ok else 1)


#: What a sandbox id filter may look like (ids are "sbx-" + hex; anything else is a typo).
_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@main.command()
@click.option("--sandbox", "sandbox_id", metavar="ID", help="Only this sandbox's rows.")
@click.option("--denied", is_flag=True, help="Only refused egress requests.")
@click.option(
    "--kind",
    type=click.Choice(["egress", "exec", "finding", "sandbox", "audit_dropped", "operator"]),
    help="Only rows of this kind.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 100_000),
    default=50,
    show_default=True,
    help="The last N rows.",
)
@click.option("--json", "as_json", is_flag=True, help="JSON (a list of objects), not a table.")
@click.option(
    "--cluster",
    "cluster",
    metavar="ADDRESS",
    default=None,
    help="Every moat node's rows of the Ray cluster at ADDRESS, each naming its node.",
)
def audit(
    sandbox_id: str | None,
    denied: bool,
    kind: str | None,
    limit: int,
    as_json: bool,
    cluster: str | None = None,
) -> None:
    """Show the audit trail: egress decisions, code executions, guard findings.

    The last LIMIT rows matching the filters, oldest first, from the audit log in moat's
    state directory ($MOAT_STATE_DIR, else /var/lib/moat for root). Text a sandbox chose
    is guarded on the way out: credential- and canary-shaped strings are redacted.
    """
    from moat.engine.auditview import OfflineScrub, guard_rows
    from moat.errors import AuditUnavailableError, InvalidArgumentError
    from moat.paths import audit_db
    from moat.store import AuditLog

    if sandbox_id is not None and not _SANDBOX_ID.fullmatch(sandbox_id):
        raise click.BadParameter("not a sandbox id", param_hint="--sandbox")
    path = audit_db()
    if cluster is not None:
        from moat.cluster.auditmerge import cluster_audit

        rows: list[dict[str, Any]] = cluster_audit(
            cluster, sandbox_id=sandbox_id, denied_only=denied, kind=kind, limit=limit
        )
    elif not path.exists():  # reading must not create an empty log
        rows = []
    else:
        # The store logs an unusable file with its path; this command says it without one.
        logging.getLogger("moat.store").addHandler(logging.NullHandler())
        try:
            with AuditLog(path) as log:
                rows = log.query(sandbox_id=sandbox_id, denied_only=denied, kind=kind, limit=limit)
        except AuditUnavailableError:
            click.echo(
                "moat: cannot read the audit log: the store is corrupt. Stop every moat process"
                " using it, move audit.db and its -wal and -shm files aside together, then start"
                " again (docs/audit.md)",
                err=True,
            )
            sys.exit(2)
        except (sqlite3.Error, OSError) as exc:
            # No path in the message (invariant 8 style): the state dir is the user's to know.
            click.echo(f"moat: cannot read the audit log ({type(exc).__name__})", err=True)
            sys.exit(2)
        except InvalidArgumentError as exc:  # a malformed MOAT_AUDIT_* setting
            click.echo(f"moat: {exc}", err=True)
            sys.exit(2)
    scrub = OfflineScrub()
    rows = guard_rows(rows, scrub)  # invariant 4: rows hold text a sandbox chose
    if scrub.seen:
        found = ", ".join(f"{label} x{n}" for label, n in sorted(scrub.seen.items()))
        click.echo(f"moat: redacted credential-shaped text in audit rows ({found})", err=True)
    rows.reverse()  # oldest first, like a log
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no audit rows")
        return
    for line in _table(rows):
        click.echo(line)


def _detail(row: dict[str, Any]) -> str:
    """One row's kind-specific columns as one readable string."""
    get = row.get
    if row["kind"] == "egress":
        dest = f"{get('host', '-')}:{get('port')}" if get("port") is not None else get("host", "-")
        parts = [get("method", "-"), dest, get("reason", "")]
        if get("resolved_ip"):
            parts.insert(2, f"ip={get('resolved_ip')}")
        if get("bytes_up") or get("bytes_down"):
            parts.append(f"up={get('bytes_up', 0)} down={get('bytes_down', 0)}")
        if get("secret"):
            parts.append(f"secret={get('secret')}")
        return " ".join(str(p) for p in parts)
    if row["kind"] == "exec":
        text = f"{get('language', '-')} sha256={str(get('code_sha256', ''))[:12]} "
        text += f"{get('duration_ms', 0)}ms"
        return text + (f" error={get('error_name')}" if get("error_name") else "")
    if row["kind"] == "operator":  # a dashboard action (docs/dashboard.md)
        return f"{get('method', '-')} by {get('label', '-')} {get('reason', '')}".rstrip()
    if row["kind"] == "audit_dropped":
        return f"{get('count', 1)} {get('label', '-')} rows not written ({get('reason', '-')})"
    text = f"{get('label', '-')} on {get('channel', '-')}"
    text += f" x{get('count')}" if get("count", 1) != 1 else ""
    return text + (f" canary={get('canary')}" if get("canary") else "")


def _detail_on(row: dict[str, Any]) -> str:
    """The row's detail, and its node where the rows came from a cluster."""
    return _detail(row) + (f" node={row['node']}" if row.get("node") else "")


def _table(rows: list[dict[str, Any]]) -> list[str]:
    head = ("TIME", "SANDBOX", "KIND", "RESULT", "DETAIL")
    body = [
        (
            dt.datetime.fromtimestamp(float(r["ts"])).strftime("%Y-%m-%d %H:%M:%S"),
            str(r["sandbox_id"]),
            str(r["kind"]),
            str(r.get("result", "-")),
            _detail_on(r),
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [head, *body]) for i in range(4)]
    return ["  ".join(c[i].ljust(widths[i]) for i in range(4)) + "  " + c[4] for c in [head, *body]]


# -- serve ---------------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(1, 65535), default=49982, show_default=True)
@click.option(
    "--tier",
    type=click.Choice(["container", "gvisor", "microvm"]),
    envvar="MOAT_SERVE_TIER",
    default=None,
    help="Tier of sandboxes made from E2B's templates ($MOAT_SERVE_TIER; default: by trust).",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False),
    envvar="MOAT_TENANTS_FILE",
    default=None,
    help="Tenant policy file: quotas, tiers, egress ceiling, guard floor "
    "($MOAT_TENANTS_FILE; default: <state dir>/tenants.toml if it exists; docs/server.md).",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False),
    envvar="MOAT_SERVE_TLS_CERT",
    default=None,
    help="PEM certificate (chain) to serve HTTPS with, e.g. a wildcard for ingress host names "
    "($MOAT_SERVE_TLS_CERT; with --tls-key).",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False),
    envvar="MOAT_SERVE_TLS_KEY",
    default=None,
    help="PEM private key of --tls-cert ($MOAT_SERVE_TLS_KEY).",
)
@click.option(
    "--cluster",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Place sandboxes on the moat nodes of the Ray cluster at ADDRESS; alone: start a "
    "local head that is itself a node (moat[cluster]; docs/cluster.md).",
)
@click.option(
    "--paused-dir",
    envvar="MOAT_PAUSED_DIR",
    default=None,
    help="With --cluster: the shared directory of paused sandboxes, which the nodes that "
    "resume them mount too (moat node --paused-dir); without it pause is refused "
    "($MOAT_PAUSED_DIR).",
)
@click.option(
    "--default-template",
    envvar="MOAT_DEFAULT_TEMPLATE",
    default=None,
    help="What sandboxes run on when no template is named, and what E2B's 'base' and "
    "'code-interpreter-v1' map to when set ($MOAT_DEFAULT_TEMPLATE; default: the built "
    "'code-interpreter', E2B's 'base' -> 'base'; 'host' for the host's /usr).",
)
def serve(
    host: str,
    port: int,
    tier: str | None,
    policy_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    cluster: str | None,
    paused_dir: str | None,
    default_template: str | None,
) -> None:
    """Serve E2B's wire on HOST:PORT for the unmodified E2B SDKs (keys: ``moat keys``)."""
    from moat.server.serve import main as serve_main

    if default_template:  # read at each create (moat.engine.templating), checked at start
        os.environ["MOAT_DEFAULT_TEMPLATE"] = default_template
    if paused_dir:  # read by the cluster's front door and a local head (moat.cluster.paused)
        os.environ["MOAT_PAUSED_DIR"] = os.path.abspath(paused_dir)

    serve_main(host, port, tier, policy_file, tls_cert or None, tls_key or None, cluster)


@main.command()
@click.option("--address", required=True, help="The Ray cluster to join (head's host:port).")
@click.option("--slots", type=click.IntRange(1, 100_000), default=16, show_default=True,
              help="Sandboxes this node hosts at most.")  # fmt: skip
@click.option("--tiers", default=None, help="Advertise only these tiers (comma-separated); "
              "each must pass its probe. Default: every tier that passes.")  # fmt: skip
@click.option("--node-ip", default="127.0.0.1", show_default=True,
              help="This node's address on the cluster's private network.")  # fmt: skip
@click.option("--num-cpus", type=click.IntRange(0, 4096), default=0, show_default=True,
              help="CPUs this node offers Ray's own tasks (sandboxes reserve none).")  # fmt: skip
@click.option("--paused-dir", envvar="MOAT_PAUSED_DIR", default=None,
              help="The cluster's shared directory of paused sandboxes (the server's "
              "--paused-dir, mounted here); without it this node can't pause or resume "
              "($MOAT_PAUSED_DIR).")  # fmt: skip
def node(
    address: str, slots: int, tiers: str | None, node_ip: str, num_cpus: int,
    paused_dir: str | None,
) -> None:  # fmt: skip
    """Join a Ray cluster as a moat node: probe the tiers, sweep leftovers, then advertise
    the usable tiers and SLOTS as Ray resources (moat[cluster]; docs/cluster.md)."""
    from moat.cluster.launch import run_node
    from moat.errors import SandboxError

    wanted = [t.strip() for t in tiers.split(",") if t.strip()] if tiers else None
    try:
        run_node(address, slots=slots, tiers=wanted, node_ip=node_ip, num_cpus=num_cpus,
                 paused_dir=paused_dir or None)  # fmt: skip
    except SandboxError as exc:
        click.echo(f"moat node: {exc}", err=True)
        sys.exit(2)


@main.command()
@click.option(
    "--tenant",
    envvar="MOAT_MCP_TENANT",
    default="default",
    show_default=True,
    help="Tenant the tool calls run as ($MOAT_MCP_TENANT): its quotas and audit rows.",
)
@click.option(
    "--trust",
    type=click.Choice(list(TRUST_LEVELS)),
    envvar="MOAT_MCP_TRUST",
    default=None,
    help="Trust level of the sandboxes, mapped to a tier ($MOAT_MCP_TRUST; default: "
    "untrusted -> microvm).",
)
@click.option(
    "--isolation",
    type=click.Choice(list(TIERS)),
    envvar="MOAT_MCP_ISOLATION",
    default=None,
    help="Isolation tier of the sandboxes, over --trust ($MOAT_MCP_ISOLATION).",
)
@click.option(
    "--profile",
    envvar="MOAT_MCP_PROFILE",
    default=None,
    help="A profile of the policy file for every sandbox ($MOAT_MCP_PROFILE; docs/profiles.md).",
)
@click.option(
    "--policy-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Policy file of --profile (default: $MOAT_POLICY_FILE).",
)
def mcp(
    tenant: str,
    trust: str | None,
    isolation: str | None,
    profile: str | None,
    policy_file: str | None,
) -> None:
    """Serve moat's MCP tools over stdio, for a local agent host (docs/mcp.md)."""
    from moat.mcp.cli import main as mcp_main

    mcp_main(tenant, trust or None, isolation or None, profile or None, policy_file or None)


@main.command()
@click.option("--api-url", envvar="MOAT_API_URL", help="The moat serve to ask ($MOAT_API_URL).")
@click.option("--api-key", envvar="MOAT_API_KEY", help="The tenant's key ($MOAT_API_KEY).")
@click.option("--json", "as_json", is_flag=True, help="JSON (a list of objects), not a table.")
def ps(api_url: str | None, api_key: str | None, as_json: bool) -> None:
    """The running sandboxes of the key's tenant on a moat serve: tier, age, CPU, memory."""
    import asyncio

    from moat.sdk.transport.http import HttpTransport

    async def gather() -> list[dict[str, Any]]:
        transport = HttpTransport(api_url, api_key)
        try:
            rows = []
            for info in await transport.list_sandboxes():
                try:
                    samples = await transport.metrics(info.sandbox_id, None, None)
                except SandboxError:  # ended meanwhile
                    continue
                last = samples[-1] if samples else None
                rows.append(
                    {
                        "sandbox_id": info.sandbox_id,
                        "tier": info.tier,
                        "template": info.template,
                        "started_at": info.started_at.isoformat(),
                        "age_s": round((dt.datetime.now(dt.UTC) - info.started_at).total_seconds()),
                        "cpu_pct": last.cpu_used_pct if last else None,
                        "cpus": last.cpu_count if last else None,
                        "mem_used": last.mem_used if last else None,
                        "mem_total": last.mem_total if last else None,
                        "metadata": dict(info.metadata),
                    }
                )
            return rows
        finally:
            await transport.aclose()

    try:
        rows = asyncio.run(gather())
    except SandboxError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'SANDBOX':<22} {'TIER':<10} {'AGE':>7} {'CPU%':>6} {'MEMORY':>17}")
    for r in rows:
        cpu = "-" if r["cpu_pct"] is None else f"{r['cpu_pct']:.1f}"
        mem = "-" if r["mem_used"] is None else f"{r['mem_used'] >> 20}/{r['mem_total'] >> 20} MiB"
        click.echo(
            f"{r['sandbox_id']:<22} {r['tier']:<10} {_age(r['age_s']):>7} {cpu:>6} {mem:>17}"
        )


def _age(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


# -- keys ----------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """API keys of ``moat serve`` (each belongs to a tenant; stored hashed)."""


@keys.command("create")
@click.option("--tenant", required=True, help="The tenant the key acts for.")
def keys_create(tenant: str) -> None:
    """Make a key for TENANT. The key is printed once, on the last line."""
    from moat.store.keys import KeyStore

    try:
        with KeyStore() as store:
            key_id, key = store.create(tenant)
    except SandboxError as exc:
        raise click.BadParameter(str(exc), param_hint="--tenant") from None
    click.echo(f"created {key_id} for tenant {tenant}; the key is shown only now:", err=True)
    click.echo(key)


@keys.command("list")
def keys_list() -> None:
    """The keys (ids and tenants, never the keys themselves)."""
    from moat.store.keys import KeyStore

    with KeyStore() as store:
        rows = store.list()
    if not rows:
        click.echo("no keys")
        return
    for r in rows:
        made = dt.datetime.fromtimestamp(r.created).strftime("%Y-%m-%d %H:%M:%S")
        state = "live" if r.revoked is None else "revoked"
        click.echo(f"{r.key_id}  {r.tenant:<20}  {made}  {state}")


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke KEY_ID (as listed); the server refuses it from the next request on."""
    from moat.store.keys import KeyStore

    try:
        with KeyStore() as store:
            store.revoke(key_id)
    except SandboxError as exc:
        click.echo(f"moat: {exc}", err=True)
        sys.exit(1)
    click.echo(f"revoked {key_id}")


def _templates() -> None:
    from moat.templates.commands import template

    main.add_command(template)


_templates()

if __name__ == "__main__":
    main()
