"""Per-tenant templates: what a tenant built through ``moat serve``, its names and uploads.

Trust domain: host engine. The built roots stay where every template lives (content-addressed
``<templates>/<id>/``, :mod:`moat.templates.ref`); a tenant's area only says which of them are
its own and by what names (invariant 11: names are per tenant, another tenant's template is
unknown to everyone else). Host-wide templates (``names/<name>``, built by the operator's CLI)
are visible to every tenant. Layout::

    <templates>/tenants/<tkey>/t/<templateID>.json   {templateID, name, tags{tag: id}, created}
    <templates>/tenants/<tkey>/uploads/<hash>.tar    build-context archives (E2B's file uploads)

``tkey`` is a hash of the tenant's name (no tenant string ever becomes a path). Records are
written atomically (temp file + rename); one server process owns an area at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from moat.errors import InvalidArgumentError, NotFoundError, QuotaExceededError
from moat.templates import ref
from moat.templates.store import Store

__all__ = ["TenantTemplates", "owned_ids", "visible"]

_ID = re.compile(r"[0-9a-f]{64}")
_TEMPLATE_ID = re.compile(r"tpl-[0-9a-z]{20}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_HASH = re.compile(r"[0-9a-f]{64}")
DEFAULT_TAG = "default"


def tenant_key(tenant: str) -> str:
    return hashlib.sha256(b"moat-tenant\0" + tenant.encode()).hexdigest()[:32]


def split_name(value: str) -> tuple[str, str]:
    """``name`` or ``name:tag`` -> (name, tag), both checked (InvalidArgumentError)."""
    if not isinstance(value, str) or len(value) > 128:
        raise InvalidArgumentError("bad template name")
    name, sep, tag = value.partition(":")
    ref.check_name(name)
    if _ID.fullmatch(name) or _TEMPLATE_ID.fullmatch(name):
        raise InvalidArgumentError("a template name can't look like a template id")
    if sep and not _TAG.fullmatch(tag):
        raise InvalidArgumentError("bad template tag")
    return name, tag if sep else DEFAULT_TAG


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


class TenantTemplates:
    """One tenant's templates in ``store``."""

    def __init__(self, store: Store, tenant: str) -> None:
        self.store = store
        self.tenant = tenant
        self.root = store.templates / "tenants" / tenant_key(tenant)

    def _dirs(self) -> tuple[Path, Path]:
        t, u = self.root / "t", self.root / "uploads"
        for d in (self.root.parent, self.root, t, u):
            d.mkdir(mode=0o700, exist_ok=True)
        return t, u

    # -- records --------------------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        d = self.root / "t"
        out = []
        for p in sorted(d.glob("tpl-*.json")) if d.is_dir() else []:
            rec = self._read(p)
            if rec is not None:
                out.append(rec)
        return out

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def get(self, template_id: str) -> dict[str, Any] | None:
        """The record of ``template_id`` (``tpl-…``) or of a name; None if not the tenant's."""
        if not isinstance(template_id, str) or len(template_id) > 128:
            return None
        if _TEMPLATE_ID.fullmatch(template_id):
            return self._read(self.root / "t" / f"{template_id}.json")
        name = template_id.partition(":")[0]
        return next((r for r in self.records() if r.get("name") == name), None)

    def request(self, name: str, max_count: int) -> dict[str, Any]:
        """The record to build ``name`` into: the existing one, or a new one within
        ``max_count`` templates (QuotaExceededError past it)."""
        name, _ = split_name(name)
        found = self.get(name)
        if found is not None:
            return found
        t, _ = self._dirs()
        if len(self.records()) >= max_count:
            raise QuotaExceededError(
                f"this tenant has {max_count} templates, its limit: delete one first"
            )
        rec = {
            "templateID": "tpl-"
            + "".join(secrets.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(20)),
            "name": name,
            "tags": {},
            "created": time.time(),
        }
        _write_json(t / f"{rec['templateID']}.json", rec)
        return rec

    def set_tags(
        self, template_id: str, tags: list[str], content_id: str,
        sizes: dict[str, int] | None = None,
    ) -> None:  # fmt: skip
        """Point ``tags`` at ``content_id``; ``sizes``: the sandbox sizes it was built for."""
        rec = self.get(template_id)
        if rec is None:
            raise NotFoundError("the template was deleted during its build")
        rec["tags"] = {**dict(rec.get("tags") or {}), **dict.fromkeys(tags, content_id)}
        if sizes is not None:
            rec["sizes"] = dict(sizes)
        rec["updated"] = time.time()
        _write_json(self.root / "t" / f"{rec['templateID']}.json", rec)

    def replace_tags(self, template_id: str, tags: dict[str, Any]) -> None:
        rec = self.get(template_id)
        if rec is None:
            raise NotFoundError("the template was deleted during its build")
        rec["tags"] = {str(k): str(v) for k, v in tags.items()}
        _write_json(self.root / "t" / f"{rec['templateID']}.json", rec)

    def resolve(self, value: str) -> str | None:
        """The content id ``value`` names for this tenant: its own ``name[:tag]``,
        ``templateID`` or content id, else a host-wide template; None when it names nothing
        this tenant may use (another tenant's answers the same as an unknown one)."""
        if not isinstance(value, str) or len(value) > 128:
            return None
        if _ID.fullmatch(value):
            if value in self.content_ids() or value in _host_ids(self.store):
                return value
            return None
        rec = self.get(value)
        if rec is not None:
            tag = value.partition(":")[2] if not _TEMPLATE_ID.fullmatch(value) else ""
            tid = dict(rec.get("tags") or {}).get(tag or DEFAULT_TAG)
            return str(tid) if tid and (self.store.templates / tid).is_dir() else None
        try:
            ref.check_name(value)
        except InvalidArgumentError:
            return None
        return self.store.names().get(value)

    def content_ids(self) -> set[str]:
        return {i for r in self.records() for i in _ids_of(r)}

    def claim(self, template_id: str, content_id: str | None) -> None:
        """Mark ``content_id`` as being built into ``template_id`` (None: clear the mark):
        owned, so invisible to other tenants, before it is published."""
        rec = self.get(template_id)
        if rec is None:
            raise NotFoundError("the template was deleted during its build")
        if content_id is None:
            rec.pop("pending", None)
        else:
            rec["pending"] = content_id
        _write_json(self.root / "t" / f"{rec['templateID']}.json", rec)

    def delete(self, value: str) -> bool:
        """Remove the tenant's template ``value`` (id or name) and every root no one else
        uses; False when it is not the tenant's."""
        rec = self.get(value)
        if rec is None:
            return False
        (self.root / "t" / f"{rec['templateID']}.json").unlink(missing_ok=True)
        for tid in set(dict(rec.get("tags") or {}).values()):
            self.drop_if_unused(str(tid))
        return True

    def drop_if_unused(self, tid: str) -> None:
        if (
            _ID.fullmatch(tid)
            and tid not in _host_ids(self.store)
            and tid not in owned_ids(self.store.templates)
        ):
            self.store._drop(tid)

    # -- usage ----------------------------------------------------------------------------

    def bytes_used(self) -> int:
        total = sum(int((self.store.meta(t) or {}).get("bytes", 0)) for t in self.content_ids())
        d = self.root / "uploads"
        for p in d.iterdir() if d.is_dir() else []:
            try:
                total += p.stat().st_size
            except OSError:
                continue
        return total

    # -- uploads --------------------------------------------------------------------------

    def upload_path(self, files_hash: str) -> Path:
        if not _HASH.fullmatch(files_hash):
            raise InvalidArgumentError("bad files hash")
        _, u = self._dirs()
        return u / f"{files_hash}.tar"

    def has_upload(self, files_hash: str) -> bool:
        return self.upload_path(files_hash).is_file()


def _ids_of(rec: dict[str, Any]) -> set[str]:
    """The content ids a record holds: its tags' and the one being built."""
    out = {str(t) for t in dict(rec.get("tags") or {}).values()}
    if isinstance(rec.get("pending"), str):
        out.add(rec["pending"])
    return out


def _host_ids(store: Store) -> set[str]:
    return set(store.names().values())


def owned_ids(templates: Path) -> set[str]:
    """Every content id some tenant's template refers to (``gc`` keeps them)."""
    out: set[str] = set()
    base = templates / "tenants"
    for p in base.glob("*/t/tpl-*.json") if base.is_dir() else []:
        rec = TenantTemplates._read(p)
        if rec is not None:
            out.update(_ids_of(rec))
    return out


def visible(store: Store, tenant: str, name: str) -> bool:
    """Whether ``tenant`` may run a sandbox on template ``name`` as the engine names it: a
    host-wide name, ``host``/``default``, a host-wide template's id, or the tenant's own
    template's id; a template only another tenant owns is not (invariant 11)."""
    if not _ID.fullmatch(name):
        return True  # a host-wide name: the engine finds names in the host-wide list only
    if name in _host_ids(store) or name not in owned_ids(store.templates):
        return True  # an operator's template (unnamed ones too: the CLI builds them by id)
    return name in TenantTemplates(store, tenant).content_ids()
