"""Which root a sandbox runs on: the template lookup behind ``Sandbox.create(template=...)``.

Trust domain: host engine. ``default`` is the built ``code-interpreter`` unless
``MOAT_DEFAULT_TEMPLATE`` (``moat serve --default-template``) names another, so nothing of
the host's filesystem reaches a sandbox unless a template says so (invariant 1). ``host`` is
the explicit opt-in to the host's ``/usr`` read-only; any other name is a built template under
the state directory (:mod:`moat.templates.ref`), checked once per engine before first use
(:mod:`moat.templates.check`). An unknown name is :class:`InvalidArgumentError` ("template 'x'
was not found"; the wire answers 400, as E2B does for an unknown template); a default one not
built yet is :class:`TemplateNotBuiltError` naming the command that builds it, never a
fallback to ``host`` (invariant 7).
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

from moat.errors import InvalidArgumentError, TemplateNotBuiltError
from moat.protocol.contract import HOME
from moat.templates import ref
from moat.templates.check import check_root
from moat.templates.defaults import DEFAULTS
from moat.templates.store import Store
from moat.templates.tenant import TenantTemplates, visible

__all__ = [
    "DEFAULT_ENV",
    "DEFAULT_TEMPLATE",
    "check_default",
    "default_template",
    "e2b_template",
    "exists",
    "lookup",
    "own_template",
    "require",
    "visible_to",
]

#: What ``template="default"`` runs on unless ``MOAT_DEFAULT_TEMPLATE`` says otherwise: the
#: built code interpreter (numpy, pandas, matplotlib: what ``run_code``'s display expects).
DEFAULT_TEMPLATE = "code-interpreter"
#: The setting that names another default (``host`` pins the host's ``/usr``, explicitly).
DEFAULT_ENV = "MOAT_DEFAULT_TEMPLATE"
#: The command that builds the default templates (named by TemplateNotBuiltError).
BUILD_DEFAULTS = "moat template build --defaults"
#: E2B's names of its own defaults -> moat's (over the wire; issue 12).
E2B_DEFAULTS = {"base": "base", "code-interpreter-v1": "code-interpreter"}
#: The names ``moat template build --defaults`` gives.
_BUILT_BY_DEFAULTS = frozenset(n for _, names in DEFAULTS for n in names)

#: The only user a template may name for now: the sandbox's own (uid 1000 on every tier).
SANDBOX_USERS = frozenset({"user", "1000", "1000:1000"})

#: template id -> (template.json's mtime_ns, rootfs identity): roots already checked
_checked: dict[str, tuple[int, int, int]] = {}
_mu = threading.Lock()


def check_default(name: object) -> str:
    """``name`` if it can be the default template (``host`` or a template name), else
    :class:`InvalidArgumentError` naming the setting."""
    if not isinstance(name, str) or name == "default":
        raise InvalidArgumentError(f"{DEFAULT_ENV}: not a template name")
    try:
        return ref.check_name(name)
    except InvalidArgumentError:
        raise InvalidArgumentError(f"{DEFAULT_ENV}: not a template name") from None


def default_template() -> str:
    """What ``template="default"`` runs on: ``$MOAT_DEFAULT_TEMPLATE``, else
    ``code-interpreter`` (read at each create, so ``moat serve`` and tests can set it)."""
    raw = os.environ.get(DEFAULT_ENV, "")
    return check_default(raw) if raw else DEFAULT_TEMPLATE


def e2b_template(name: str) -> str:
    """The moat template an E2B SDK's default name runs on: ``base`` -> ``base``,
    ``code-interpreter-v1`` -> ``code-interpreter``, ``default`` -> the default. A host that
    sets another default (``MOAT_DEFAULT_TEMPLATE=host``) gets it for all three."""
    chosen = default_template()
    if name == "default" or chosen != DEFAULT_TEMPLATE:
        return chosen
    return E2B_DEFAULTS[name]


def _actual(name: str) -> str:
    return default_template() if name == "default" else name


def require(name: str) -> None:
    """Raise unless ``name`` is ``host``, ``default`` or a built template: a default one not
    built is :class:`TemplateNotBuiltError` (never a quiet ``host``, invariant 7), any other
    unknown name :class:`InvalidArgumentError`."""
    if not exists(name):
        raise _missing(name)


def _missing(name: str) -> InvalidArgumentError:
    """The error for a template ``name`` (as the caller gave it) that is not built."""
    actual = _actual(name)
    if actual in _BUILT_BY_DEFAULTS:
        return TemplateNotBuiltError(actual, BUILD_DEFAULTS)
    if name == "default":  # the configured default (MOAT_DEFAULT_TEMPLATE) names another
        return TemplateNotBuiltError(
            actual[:64], f"moat template build DEFINITION --name {actual[:64]}"
        )
    return InvalidArgumentError(f"template {name[:64]!r} was not found")


def exists(name: str) -> bool:
    """Whether ``name`` is ``host``, ``default`` or a built template (no checks run)."""
    name = _actual(ref.check_name(name))
    return name == ref.HOST or ref.find(name) is not None


def visible_to(tenant: str, name: str) -> bool:
    """Whether ``tenant`` may run a sandbox on template ``name``: every host-wide template,
    and of those built through the server only its own (invariant 11)."""
    name = _actual(ref.check_name(name))
    return name == ref.HOST or visible(Store.default(), tenant, name)


def own_template(tenant: str, name: str) -> str | None:
    """The id of ``tenant``'s own template that ``name`` names (its name, ``name:tag``,
    ``tpl-…`` id or content id), or None."""
    own = TenantTemplates(Store.default(), tenant)
    if own.get(name) is None and name not in own.content_ids():
        return None
    return own.resolve(name)


def lookup(name: str) -> ref.TemplateRef | None:
    """The built template ``name`` stands for, checked; None for the host's own ``/usr``.

    Blocking (reads the template's root on first use): run it off the event loop.
    """
    shown = name[:64] if isinstance(name, str) else "?"
    given = ref.check_name(name)
    name = _actual(given)
    if name == ref.HOST:
        return None
    found = ref.find(name)
    if found is None:
        raise _missing(given)
    if found.user not in SANDBOX_USERS:
        raise InvalidArgumentError(
            f"template {shown!r} runs as user {found.user[:32]!r}; only the sandbox user "
            "('user', uid 1000) is supported"
        )
    if not found.workdir.startswith("/") or "\0" in found.workdir or ".." in found.workdir:
        raise InvalidArgumentError(f"template {shown!r} has a bad working directory")
    _check_once(found)
    return found


def _check_once(found: ref.TemplateRef) -> None:
    meta = found.rootfs.parent / "template.json"
    try:
        st, root = os.stat(meta), os.lstat(found.rootfs)
    except OSError:
        raise InvalidArgumentError(f"template {found.name[:64]!r} was not found") from None
    stamp = (st.st_mtime_ns, root.st_dev, root.st_ino)
    with _mu:
        if _checked.get(found.id) == stamp:
            return
    check_root(Path(found.rootfs), found.name)
    with _mu:
        _checked[found.id] = stamp


def spec_args(found: ref.TemplateRef, envs: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The SandboxSpec fields of a sandbox on ``found``: its root, id and working directory,
    and its environment with the caller's ``envs`` over it."""
    env = dict(found.env)
    env.update(envs)
    return {
        "rootfs": str(found.rootfs),
        "template_id": found.id,
        "workdir": found.workdir or HOME,
        "envs": tuple(sorted(env.items())),
    }


async def restore_args(
    template: str, envs: tuple[tuple[str, str], ...]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The SandboxSpec fields (less ``envs``) and the environment of a sandbox started again
    from saved state (a resume, a snapshot, a fork) on ``template``, as at create: its root,
    not the host's ``/usr``. Looked up by name: a root rebuilt since then differs, and a
    memory tier refuses that restore clearly."""
    found = await asyncio.to_thread(lookup, template)
    args = spec_args(found, envs) if found is not None else {}
    env = dict(args.pop("envs", envs))
    return args, env
