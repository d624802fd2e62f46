"""Tenant policies: per-tenant quotas, tiers, egress ceiling and guard floor, from a TOML file.

Trust domain: host engine; the file comes from the operator (trusted) yet is validated like
any input: a closed schema, every error a :class:`~moat.errors.PolicyError` naming the file
(base name only, invariant 8), the line and the dotted key. A file that is named but can't
be read or parsed refuses to load: a configured limit never silently becomes "no limit"
(invariant 7). Pure apart from reading the one file. The front door enforces what this
module describes (``moat.engine.admission``), for every face alike.

The format (docs/server.md, ``examples/tenants.toml``)::

    version = 1
    [default]                          # every tenant not named below
    allowed_tiers = ["gvisor", "microvm"]
    default_tier = "gvisor"
    guard_floor = "redact"             # off < redact < block: weaker requests are refused
    [default.quotas]
    sandboxes = 10                     # running at once
    memory_mb = 8192                   # sum of Limits.memory_mb of running sandboxes
    cpus = 8                           # sum of Limits.cpus of running sandboxes
    creates_per_minute = 60            # sliding window of 60 s
    snapshot_mb = 4096                 # paused sandboxes' state kept on disk (issue 11)
    templates = 20                     # templates built through the server (issue 12)
    template_mb = 16384                # their roots and uploads on disk
    [default.egress]                   # the most a sandbox of the tenant may be allowed
    allow_out = ["pypi.org", "*.pythonhosted.org"]
    internet_access = false
    allow_tcp = ["github.com:22"]      # raw TCP (none when left out)
    [tenants.acme]                     # keys it leaves out come from [default]
    quotas = { sandboxes = 50 }

A key left out everywhere means "no limit" (the embedded SDK's tenant, with no file, is
unlimited); ``egress`` left out means "no ceiling".
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from moat.egress.policy import DEFAULT_PORTS, HostPattern, NetworkPolicy
from moat.errors import InvalidArgumentError, PolicyError
from moat.model.tiers import GUARD_MODES, TIERS
from moat.paths import state_dir

# The policy file's reader and error helpers are shared with the profiles file (same rules:
# size cap, no FIFO hang, base name only, line numbers of keys).
from moat.profiles import _choice as choice_of
from moat.profiles import _Context as Context
from moat.profiles import _display as display
from moat.profiles import _LineIndex as LineIndex
from moat.profiles import _read as read_file
from moat.profiles import _strings as strings_of
from moat.profiles import _syntax_error as syntax_error
from moat.profiles import _table as table_of
from moat.profiles import _type_name as type_name

__all__ = [
    "FILE_NAME",
    "GUARD_ORDER",
    "EgressCeiling",
    "Quotas",
    "TenantPolicies",
    "TenantPolicy",
    "load_tenants",
    "parse_tenants",
]

#: The tenant policy file under moat's state dir, read when no path is given.
FILE_NAME = "tenants.toml"
#: Guard modes from weakest to strongest (a floor refuses anything before it).
GUARD_ORDER: tuple[str, ...] = ("off", "redact", "block")
MAX_TENANTS = 10_000
_QUOTA_KEYS = (
    "sandboxes", "memory_mb", "cpus", "creates_per_minute", "snapshot_mb", "templates",
    "template_mb",
)  # fmt: skip
_EGRESS_KEYS = ("allow_out", "internet_access", "allow_tcp")
_TENANT_KEYS = ("quotas", "allowed_tiers", "default_tier", "guard_floor", "egress")
_Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Quotas:
    """Per-tenant caps; None: no cap."""

    sandboxes: int | None = None
    memory_mb: int | None = None
    cpus: float | None = None
    creates_per_minute: int | None = None
    #: MiB of paused-sandbox state (checkpoints) the tenant may keep (issue 11)
    snapshot_mb: int | None = None
    #: templates built through the server the tenant may keep, and their MiB on disk with
    #: its uploads (issue 12; None: the server's defaults, moat.server.templates)
    templates: int | None = None
    template_mb: int | None = None


@dataclass(frozen=True)
class EgressCeiling:
    """The most any sandbox of a tenant may be allowed to reach."""

    allow_out: tuple[HostPattern, ...] = ()
    internet_access: bool = False
    #: raw TCP destinations a sandbox may be given (issue 15); none when left out
    allow_tcp: tuple[HostPattern, ...] = ()

    def covers(self, asked: HostPattern) -> bool:
        """Whether every destination ``asked`` allows is allowed by the ceiling."""
        if self.internet_access and asked.ports <= DEFAULT_PORTS:
            return True  # any public host on 80/443 (the gateway still blocks the rest)
        return any(_within(asked, c) for c in self.allow_out)

    def refusal(self, policy: NetworkPolicy) -> str | None:
        """Why ``policy`` opens more than the ceiling, or None when it stays within."""
        if policy.internet_access and not self.internet_access:
            return "internet access is beyond this tenant's egress ceiling"
        for p in policy.allow_out:
            if not self.covers(p):
                return f"allow_out {str(p)[:300]!r} is beyond this tenant's egress ceiling"
        for p in policy.allow_tcp:  # raw TCP: only within the ceiling's own allow_tcp
            if not any(_within(p, c) for c in self.allow_tcp):
                return f"allow_tcp {str(p)[:300]!r} is beyond this tenant's egress ceiling"
        return None


def _within(asked: HostPattern, ceiling: HostPattern) -> bool:
    if not asked.ports <= ceiling.ports:
        return False
    if not ceiling.wildcard:
        return not asked.wildcard and asked.host == ceiling.host
    if asked.wildcard and asked.host == ceiling.host:
        return True
    return asked.host.endswith("." + ceiling.host)


@dataclass(frozen=True)
class TenantPolicy:
    """What one tenant may do. None fields: no restriction."""

    quotas: Quotas = field(default_factory=Quotas)
    allowed_tiers: tuple[str, ...] | None = None
    default_tier: str | None = None
    guard_floor: str | None = None
    egress: EgressCeiling | None = None

    def tier_allowed(self, tier: str) -> bool:
        return self.allowed_tiers is None or tier in self.allowed_tiers

    def guard_allowed(self, mode: str) -> bool:
        if self.guard_floor is None:
            return True
        return GUARD_ORDER.index(mode) >= GUARD_ORDER.index(self.guard_floor)


@dataclass(frozen=True)
class TenantPolicies:
    """The policy of every tenant: the named ones, and ``default`` for the rest."""

    default: TenantPolicy = field(default_factory=TenantPolicy)
    tenants: Mapping[str, TenantPolicy] = field(default_factory=dict)

    def of(self, tenant: str) -> TenantPolicy:
        return self.tenants.get(tenant, self.default)


def load_tenants(path: str | os.PathLike[str] | None = None) -> TenantPolicies:
    """The tenant policies of ``path``, else of ``<state dir>/tenants.toml`` when it exists,
    else none (no limits). A named file that is missing or invalid raises PolicyError."""
    if path is None:
        p = state_dir() / FILE_NAME
        if not p.exists():
            return TenantPolicies()
    else:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise InvalidArgumentError("the tenant policy path must be a non-empty str or path")
        p = Path(path)
    return parse_tenants(read_file(p), p.name)


def parse_tenants(text: str, filename: str = FILE_NAME) -> TenantPolicies:
    """Parse and validate the TOML text of a tenant policy file."""
    if not isinstance(text, str):
        raise InvalidArgumentError("tenant policy text must be a str")
    shown = display(filename)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise syntax_error(shown, text, str(exc)) from None
    ctx = Context(shown, LineIndex(text))
    root = table_of(ctx, (), doc, ("version", "default", "tenants"))
    if "version" in root and (type(root["version"]) is not int or root["version"] != 1):
        ctx.fail(("version",), "must be 1 (the only version of this format)")
    default = _tenant(ctx, ("default",), root.get("default", {}), TenantPolicy())
    raw = root.get("tenants", {})
    if not isinstance(raw, Mapping):
        ctx.fail(("tenants",), f"must be a table of tenants, not {type_name(raw)}")
    if len(raw) > MAX_TENANTS:
        ctx.fail(("tenants",), f"at most {MAX_TENANTS} tenants are allowed")
    named: dict[str, TenantPolicy] = {}
    for name, body in raw.items():
        if not 0 < len(name) <= 128:
            ctx.fail(("tenants", name), "tenant names are 1 to 128 characters")
        named[name] = _tenant(ctx, ("tenants", name), body, default)
    return TenantPolicies(default, named)


def _tenant(ctx: Context, path: _Path, body: object, base: TenantPolicy) -> TenantPolicy:
    """One tenant's table over ``base`` (the default section: keys left out inherit)."""
    table = table_of(ctx, path, body, _TENANT_KEYS)
    out = base
    if "quotas" in table:
        out = replace(out, quotas=_quotas(ctx, (*path, "quotas"), table["quotas"], base.quotas))
    if "allowed_tiers" in table:
        p = (*path, "allowed_tiers")
        tiers = strings_of(ctx, p, table["allowed_tiers"])
        for i, tier in enumerate(tiers):
            choice_of(ctx, (*p, i), tier, TIERS)
        if not tiers:
            ctx.fail(p, "must name at least one tier (a tenant with none can't create)")
        out = replace(out, allowed_tiers=tuple(dict.fromkeys(tiers)))
    if "default_tier" in table:
        tier = choice_of(ctx, (*path, "default_tier"), table["default_tier"], TIERS)
        out = replace(out, default_tier=tier)
    if "guard_floor" in table:
        floor = choice_of(ctx, (*path, "guard_floor"), table["guard_floor"], GUARD_MODES)
        out = replace(out, guard_floor=floor)
    if "egress" in table:
        out = replace(out, egress=_egress(ctx, (*path, "egress"), table["egress"]))
    if out.default_tier is not None and not out.tier_allowed(out.default_tier):
        ctx.fail((*path, "default_tier"), "must be one of the tenant's allowed_tiers")
    return out


def _quotas(ctx: Context, path: _Path, value: object, base: Quotas) -> Quotas:
    table = table_of(ctx, path, value, _QUOTA_KEYS)
    out = base
    for key, item in table.items():
        p = (*path, key)
        if key == "cpus":
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                ctx.fail(p, f"must be a number, not {type_name(item)}")
            if not math.isfinite(item) or not 0 <= item <= 1 << 20:
                ctx.fail(p, f"must be between 0 and {1 << 20}")
            out = replace(out, cpus=float(item))
            continue
        if isinstance(item, bool) or not isinstance(item, int):
            ctx.fail(p, f"must be an integer, not {type_name(item)}")
        if not 0 <= item <= 1 << 30:
            ctx.fail(p, f"must be between 0 and {1 << 30}")
        out = replace(out, **{key: item})
    return out


def _egress(ctx: Context, path: _Path, value: object) -> EgressCeiling:
    table = table_of(ctx, path, value, _EGRESS_KEYS)
    patterns: list[HostPattern] = []
    if "allow_out" in table:
        for i, item in enumerate(strings_of(ctx, (*path, "allow_out"), table["allow_out"])):
            try:
                patterns.append(HostPattern.parse(item))
            except PolicyError as exc:
                ctx.fail((*path, "allow_out", i), str(exc))
    internet = table.get("internet_access", False)
    if not isinstance(internet, bool):
        ctx.fail((*path, "internet_access"), f"must be a boolean, not {type_name(internet)}")
    tcp: list[HostPattern] = []
    if "allow_tcp" in table:
        for i, item in enumerate(strings_of(ctx, (*path, "allow_tcp"), table["allow_tcp"])):
            try:
                tcp.extend(NetworkPolicy(allow_tcp=[item]).allow_tcp)  # explicit port required
            except PolicyError as exc:
                ctx.fail((*path, "allow_tcp", i), str(exc))
    return EgressCeiling(tuple(patterns), internet, tuple(tcp))
