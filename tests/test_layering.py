"""The layout tells the truth: imports between moat's packages follow the layering (DESIGN §4),
the model floor loads nothing privileged, the public names are importable, and the sync SDK
has the async one's signatures."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import moat

SRC = Path(__file__).resolve().parent.parent / "src" / "moat"

#: What each top-level part of moat may import (besides itself, the stdlib and third parties).
#: Pure floors at the bottom; the SDK on top reaches the engine only through its front door.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "paths": set(),
    "protocol": set(),
    "agent": {"protocol"},
    "model": {"errors", "protocol"},
    # profiles checks network and guard tables with their own parsers (used by the resolver)
    "profiles": {"errors", "model", "egress", "guard"},
    # the microVM guest's boot code runs inside (sandbox domain, like the agent); it imports
    # nothing of moat, and the runtime reads its contract constants (boot marker, flags)
    "guest": set(),
    "runtime": {"errors", "model", "protocol", "paths", "guest"},
    "guard": {"errors", "model"},
    # the host's records (audit now; keys, tenants, snapshots later): below every service
    "store": {"errors", "paths"},
    # the gateway scrubs reflected secrets with the guard's encodings and audits to the store
    "egress": {"errors", "model", "protocol", "paths", "guard", "store"},
    "engine": {
        "errors", "model", "protocol", "paths", "profiles", "runtime", "egress", "guard",
        "store", "templates",
    },
    # generated wire stubs of E2B envd (Connect RPC): shared by the server and the SDK's HTTP
    # transport, so neither face imports the other
    "envd": set(),
    "sdk": {"errors", "model", "engine.api", "envd"},
    # a face: the front door only, plus its keys in the store. NetworkPolicy and Secret are
    # the front door's input value types (public as moat.NetworkPolicy / moat.Secret); they
    # belong in the model, which is where they should move.
    "server": {
        "errors", "model", "engine.api", "store", "egress", "envd", "dashboard", "mcp", "cluster",
    },
    # the operators' pages, mounted in the server: a face over the front door and the keys
    "dashboard": {"errors", "model", "engine.api", "store"},
    # a face like the server: the front door only, plus the keys that authenticate HTTP
    "mcp": {"errors", "model", "engine.api", "store"},
    # scale-out (issue 13): a placement face above the engine; nothing below imports it
    "cluster": {"errors", "model", "paths", "engine", "egress", "runtime", "store"},
    "testing": {"errors", "model", "engine", "sdk", "runtime"},
    # template builds: definitions -> roots, built in the container tier's build sandbox
    # behind an egress gateway, audited to the store (issue 12)
    "templates": {"errors", "model", "protocol", "paths", "runtime", "egress", "store"},
    "cli": {
        "errors", "model", "engine", "sdk", "paths", "profiles", "egress", "runtime", "store",
        "server", "templates", "mcp", "cluster",
    },
    "__init__": set(),
}  # fmt: skip
#: Privileged packages: nothing below the engine may import them, and the model never.
PRIVILEGED = {
    "runtime", "egress", "guard", "engine", "store", "server", "dashboard", "sdk", "cli",
    "templates", "mcp", "cluster",
}  # fmt: skip


def _part(module: str) -> str:
    """``moat.x.y`` -> ``x`` (``engine.api`` for the front door, which the SDK may use)."""
    parts = module.split(".")
    if parts[1:3] == ["engine", "api"]:
        return "engine.api"
    return parts[1] if len(parts) > 1 else "__init__"


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """The moat modules ``path`` imports at run time (annotation-only imports left out)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("moat."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "moat":  # the public facade: where each name really lives
                out.update(moat._EXPORTS.get(a.name, f"moat.{a.name}") for a in node.names)
            elif node.module.startswith("moat."):
                out.update(f"{node.module}.{a.name}" for a in node.names)
                out.add(node.module)
    return out


def arrows() -> set[tuple[str, str]]:
    """Every import between two parts of moat, as (importer, imported)."""
    found = set()
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        src = rel.parts[0]
        for module in _imports(path):
            dst = _part(module)
            if dst.split(".")[0] != src and dst != "__init__":
                found.add((src, dst))
    return found


def test_imports_follow_the_layering() -> None:
    found = arrows()
    listing = "\n".join(f"{a} -> {b}" for a, b in sorted(found))
    bad = sorted(
        (a, b)
        for a, b in found
        if b not in ALLOWED.get(a, set()) and b.split(".")[0] not in ALLOWED.get(a, set())
    )
    assert not bad, f"imports against the layering: {bad}\nall arrows:\n{listing}"
    # The arrows the issue names, spelled out:
    assert not any(a in ("engine", "runtime", "egress", "guard", "store") and b == "sdk"
                   for a, b in found)  # fmt: skip
    assert not any(a == "model" and b.split(".")[0] in PRIVILEGED for a, b in found)
    assert {b for a, b in found if a == "sdk"} <= {"errors", "model", "engine.api", "envd"}


def test_the_layering_test_sees_a_bad_arrow(tmp_path: Path) -> None:
    # Positive control: an engine module importing the SDK is an arrow the scan reports.
    bad = tmp_path / "bad.py"
    bad.write_text("from moat.sdk.async_ import AsyncSandbox\nimport moat.sdk.sync\n")
    assert {_part(m) for m in _imports(bad)} == {"sdk"}
    hidden = tmp_path / "hidden.py"
    hidden.write_text("def f():\n    from moat.sdk import sync\n")
    assert {_part(m) for m in _imports(hidden)} == {"sdk"}


def test_importing_the_model_loads_nothing_privileged() -> None:
    code = (
        "import json, sys, moat.model; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('moat'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(out.stdout)
    assert "moat.model" in loaded
    assert all(m.split(".")[1] in ("model", "errors", "protocol") for m in loaded if "." in m), (
        loaded
    )


def test_public_names() -> None:
    readme = {
        "Sandbox", "AsyncSandbox", "Mount", "Limits", "NetworkPolicy", "Secret", "GuardPolicy",
        "SandboxError", "TimeoutError", "NotFoundError", "IsolationUnavailableError",
        "PolicyError", "InvalidArgumentError", "CommandExitError", "SandboxDiedError",
        "LeakBlockedError", "Execution", "Result", "Logs", "ExecutionError", "CommandResult",
        "CommandHandle", "AsyncCommandHandle", "EntryInfo", "SandboxInfo", "Context",
        "ProcessInfo", "SandboxConfig", "GatewayConfig", "AuditUnavailableError",
        "QuotaExceededError",
    }  # fmt: skip
    assert set(moat.__all__) == readme == set(moat._EXPORTS)
    assert moat.__all__ == sorted(moat.__all__)
    for name in moat.__all__:
        assert getattr(moat, name) is not None
    from moat import GuardPolicy, NetworkPolicy, Secret  # the README's own lines

    assert Secret("x" * 8, hosts=["api.example.com"]).hosts == ("api.example.com",)
    assert NetworkPolicy(allow_out=["pypi.org"]).to_dict()["allow_out"] == ["pypi.org"]
    assert GuardPolicy(mode="block").mode == "block"


def _public(cls: type) -> dict[str, inspect.Signature | str]:
    out: dict[str, inspect.Signature | str] = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") and name not in ("__enter__", "__exit__"):
            continue
        if isinstance(inspect.getattr_static(cls, name), property):
            out[name] = "property"
        elif inspect.isfunction(member) or inspect.ismethod(member):
            out[name] = inspect.signature(member)
    return out


def test_sync_sdk_has_the_async_signatures() -> None:
    from moat.sdk import async_, pty, pty_sync, sync

    pairs = [
        (sync.Sandbox, async_.AsyncSandbox),
        (sync.Commands, async_.AsyncCommands),
        (sync.Files, async_.AsyncFiles),
        (sync.CommandHandle, async_.AsyncCommandHandle),
        (sync.WatchHandle, async_.AsyncWatchHandle),
        (pty_sync.Pty, pty.AsyncPty),
        (pty_sync.PtyHandle, pty.AsyncPtyHandle),
    ]
    renamed = {"__enter__": "__aenter__", "__exit__": "__aexit__"}
    for s_cls, a_cls in pairs:
        s_api, a_api = _public(s_cls), _public(a_cls)
        a_api = {k: x for k, x in a_api.items() if not k.startswith("__a")}
        assert set(s_api) == set(a_api) | {k for k in renamed if k in s_api}, s_cls
        for name, sig in s_api.items():
            if name in renamed:
                continue
            other = a_api[name]
            if sig == "property" or other == "property":
                assert sig == other, (s_cls, name)
                continue
            assert isinstance(sig, inspect.Signature) and isinstance(other, inspect.Signature)
            s_params = [(p.name, p.kind, p.default) for p in sig.parameters.values()]
            a_params = [(p.name, p.kind, p.default) for p in other.parameters.values()]
            assert s_params == a_params, (s_cls.__name__, name)
            assert inspect.iscoroutinefunction(getattr(a_cls, name)), (a_cls.__name__, name)
