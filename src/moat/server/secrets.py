"""The secrets store over the wire: E2B's ``/secrets`` shapes, values write-only (invariant 3).

``POST /secrets`` ``{name, value, metadata, moat: {hosts, header, template}}`` stores one (201),
``GET /secrets`` lists, ``GET /secrets/{id}`` shows one, ``POST /secrets/{id}`` ``{value?,
metadata?, moat?}`` makes a new version, ``DELETE /secrets/{id}`` removes it (204). No reply
ever carries a value. ``moat.hosts`` is required: a stored secret, like one given at create, is
only ever placed by the gateway into requests to its hosts. A create body names stored secrets
in ``moat.storedSecrets``; the sandbox sees each under its name as a placeholder.
Another tenant's secret id answers exactly like an unknown one (invariant 11).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from moat.egress import Secret
from moat.errors import InvalidArgumentError, NotFoundError, PolicyError
from moat.server import wire
from moat.server.app import MAX_JSON_BODY, read_body
from moat.store.secrets import Binding, SecretInfo, SecretStore

#: An HTTP header name (RFC 9110's token).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")

Make = Callable[[str, Any, list[str]], Route]


class _Binding(wire._Closed):
    hosts: list[wire._Str] = Field(min_length=1, max_length=64)
    header: wire._Str | None = "Authorization"
    template: wire._Str = "{value}"


class CreateSecretBody(wire._Closed):
    name: wire._Str = Field(max_length=128)
    value: wire._Str = Field(max_length=8192)
    metadata: dict[wire._Str, wire._Str] | None = None
    moat: _Binding | None = None


class UpdateSecretBody(wire._Closed):
    value: wire._Str | None = Field(default=None, max_length=8192)
    metadata: dict[wire._Str, wire._Str] | None = None
    moat: _Binding | None = None


def check_header(header: str | None) -> None:
    """A secret's header must be a header name (the gateway matches it case-blind)."""
    if header is not None and not _TOKEN.fullmatch(header):
        raise InvalidArgumentError("a secret's header must be an HTTP header name")


def checked(value: str, b: _Binding) -> Binding:
    """The binding, with the value checked by the gateway's own rules (messages never
    echo the value)."""
    check_header(b.header)
    s = Secret(value, b.hosts, b.header, b.template)
    return Binding(s.hosts, s.header, s.template)


def reply(info: SecretInfo) -> dict[str, Any]:
    def iso(t: float) -> str:
        return wire.iso(dt.datetime.fromtimestamp(t, dt.UTC))

    return {
        "secretID": info.secret_id,
        "name": info.name,
        "currentVersion": info.version,
        "metadata": info.metadata,
        "createdAt": iso(info.created),
        "updatedAt": iso(info.updated),
        "moat": {"hosts": list(info.hosts), "header": info.header, "template": info.template},
    }


class LazyStore:
    """The server's SecretStore, opened on first use: a server whose tenants never store a
    secret writes no ``secrets.db`` or key file."""

    def __init__(self) -> None:
        self._store: SecretStore | None = None

    def __call__(self) -> SecretStore:
        if self._store is None:
            self._store = SecretStore()
        return self._store


def secret_routes(lazy: LazyStore, r: Make) -> list[Route]:
    """The routes, made authenticated by the control plane's ``r``."""

    def missing() -> Response:
        return wire.error(404, "secret was not found")

    async def create(request: Request, tenant: str) -> Response:
        body = wire.parse(CreateSecretBody, await read_body(request, MAX_JSON_BODY))
        if body.moat is None:
            return wire.error(
                400, "moat.hosts is required: a secret is only used on requests to its hosts"
            )
        binding = checked(body.value, body.moat)
        info = lazy().create(tenant, body.name, body.value, binding, body.metadata)
        return JSONResponse(reply(info), 201)

    async def list_all(request: Request, tenant: str) -> Response:
        return JSONResponse([reply(i) for i in lazy().list_secrets(tenant)])

    async def get(request: Request, tenant: str) -> Response:
        try:
            return JSONResponse(reply(lazy().get(tenant, request.path_params["secret_id"])))
        except NotFoundError:
            return missing()

    async def update(request: Request, tenant: str) -> Response:
        body = wire.parse(UpdateSecretBody, await read_body(request, MAX_JSON_BODY))
        sid = request.path_params["secret_id"]
        try:
            old = lazy().get(tenant, sid)
            if body.value is None and body.moat is None and body.metadata is None:
                return JSONResponse(reply(old))
            if body.moat is not None and body.value is None:
                # A new binding needs the value again: else whoever holds the tenant's key
                # (an agent, say) could point a stored value at its own host and have the
                # gateway send it there (invariant 3: write-only means not re-aimable).
                raise InvalidArgumentError(
                    "changing moat.hosts, header or template needs the value again"
                )
            binding = None
            if body.value is not None:
                b = body.moat or _Binding(hosts=list(old.hosts), header=old.header,
                                          template=old.template)  # fmt: skip
                binding = checked(body.value, b)
            info = lazy().update(tenant, sid, body.value, binding, body.metadata)
        except NotFoundError:
            return missing()
        return JSONResponse(reply(info))

    async def delete(request: Request, tenant: str) -> Response:
        try:
            lazy().delete(tenant, request.path_params["secret_id"])
        except NotFoundError:
            return missing()
        return Response(status_code=204)

    one = "/secrets/{secret_id}"
    return [
        r("/secrets", create, ["POST"]),
        r("/secrets", list_all, ["GET"]),
        r(one, get, ["GET"]),
        r(one, update, ["POST"]),
        r(one, delete, ["DELETE"]),
    ]


def binding_of(secret: Secret) -> dict[str, Any]:
    """A secret's binding as kept with a paused sandbox (JSON: no value in it)."""
    return {"hosts": list(secret.hosts), "header": secret.header, "template": secret.template}


def stored_again(lazy: LazyStore | None, tenant: str, kept: Mapping[str, Any]) -> dict[str, str]:
    """The values of the stored secrets a paused sandbox was created with (``kept``: name ->
    binding then), to resume it after a restart (the engine never wrote them down).

    Fails closed with PolicyError when one was deleted or bound otherwise since: its value
    goes to the hosts the sandbox was created with only while the tenant still binds it so.
    """
    names = [n for n in kept if isinstance(n, str)]
    if not names or lazy is None:
        return {}
    try:
        found = stored(lazy, tenant, names)
    except NotFoundError as exc:
        raise PolicyError(f"resuming this sandbox needs a stored secret again: {exc}") from None
    for name, secret in found.items():
        if binding_of(secret) != kept[name]:
            raise PolicyError(
                f"the stored secret {name} is bound otherwise than when this sandbox was "
                "created: bind it as it was to resume it"
            )
    return {name: secret.value for name, secret in found.items()}


def stored(lazy: LazyStore, tenant: str, names: list[str]) -> dict[str, Secret]:
    """The tenant's stored secrets called ``names``, ready for the engine (values in)."""
    return {
        name: Secret(value, b.hosts, b.header, b.template)
        for name, (value, b) in lazy().resolve(tenant, names).items()
    }
