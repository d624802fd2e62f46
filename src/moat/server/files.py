"""envd's plain-HTTP file routes: ``GET /files`` (download) and ``POST /files`` (upload).

What E2B-WIRE.md §2b describes, through the front door (every byte read back is guarded
there, invariant 4):
- **Auth**: the sandbox's ``X-Access-Token`` as on every sandbox request (a wrong or missing
  one answers like an unknown sandbox, invariant 11), or instead a signed URL
  (``moat.server.signing``) as ``download_url()``/``upload_url()`` make for a browser. A
  signed request need not name its sandbox (with ``E2B_SANDBOX_URL`` the link has no sandbox
  id in it): the signature itself finds the one sandbox whose token made it. A signature
  that matches none answers 401 whatever the sandbox id, so it tells nothing either.
- **Users**: ``username`` is ``user`` (the default) or ``root`` (uid 0 inside the sandbox, on
  the tiers that give it: moat.engine.users, docs/users.md); another name is 401, as envd
  answers for a user it does not have.
- **Codings**: ``Accept-Encoding: gzip`` answers gzip (406 when nothing acceptable is
  left); an upload with ``Content-Encoding: gzip`` is inflated with a cap (a gzip bomb stops
  at the body cap, 413) and any other coding is 400, as envd does.
- **Uploads**: ``application/octet-stream`` with ``path``, or ``multipart/form-data`` whose
  ``file`` parts are named by their filename (the destination) or by ``path``; parsed by
  python-multipart with limits on parts and headers. ``X-Metadata-<key>`` headers become the
  file's metadata (``user.e2b.<key>`` attributes), checked here before anything is written.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import posixpath
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from moat.errors import InvalidArgumentError, NotFoundError, SandboxError
from moat.model import HOME, USERS
from moat.model import validate as v
from moat.server import wire
from moat.server.app import MAX_FILE_BODY, BodyTooLarge, Record, ServerState, too_large
from moat.server.encoding import (
    EncodingRefused,
    InflatedTooLarge,
    Inflater,
    accepted,
    request_coding,
)
from moat.server.signing import Op, SignatureRefused, find

log = logging.getLogger("moat.server")

ENVD_PORT = "49983"
#: The sandbox user file operations run as unless the request names ``root`` (rpc.DEFAULT_USER).
USER = "user"
_USERS = (None, "", *USERS)
#: Limits of a multipart upload: ``file`` parts, and header bytes of one part.
MAX_PARTS = 1000
MAX_PART_HEADERS = 16 << 10
#: Responses larger than this are compressed off the event loop.
_OFF_LOOP = 256 << 10
_METADATA_HEADER = "x-metadata-"

Admit = Callable[[ServerState, Headers, str], Awaitable[Record | Response]]
Gone = Callable[[str], Response]


class FileRoutes:
    """The endpoints of ``/files`` (and the signed form of ``/health``) over ``state``."""

    def __init__(self, state: ServerState, admit: Admit, gone: Gone) -> None:
        self.state = state
        self._admit = admit
        self._gone = gone

    # -- admission ---------------------------------------------------------------------

    async def admit(self, request: Request, ops: tuple[Op, ...]) -> tuple[str, Record] | Response:
        """The sandbox (id, record) this request may reach, or the reply refusing it."""
        headers, query = request.headers, request.query_params
        signature = query.get("signature")
        sid = headers.get("e2b-sandbox-id")
        if signature is None or headers.get("x-access-token") is not None:
            found = await self._admit(self.state, headers, request.url.path)
            if isinstance(found, Response):
                return found
            return headers.get("e2b-sandbox-id", ""), found
        raw_exp = query.get("signature_expiration")
        expiration = _expiration(raw_exp)
        records = self.state.records
        if sid is not None:
            named = records.get(sid)
            candidates = [] if named is None else [((sid, named), named.token)]
        else:  # a browser's link: the signature names the sandbox
            candidates = [((s, r), r.token) for s, r in list(records.items())]
        try:
            sid, rec = find(
                candidates, signature, path=query.get("path", ""), ops=ops,
                user=query.get("username"), expiration=expiration,
            )  # fmt: skip
        except SignatureRefused as exc:
            return wire.error(401, str(exc))
        try:
            if not await self.state.front.is_running(rec.tenant, sid):
                return self._gone(sid)
        except NotFoundError:
            return self._gone(sid)
        if headers.get("e2b-sandbox-port", ENVD_PORT) != ENVD_PORT:
            return wire.error(404, "no such endpoint on this port")
        return sid, rec

    async def _admitted(
        self, request: Request, ops: tuple[Op, ...]
    ) -> tuple[str, Record] | Response:
        found = await self.admit(request, ops)
        if isinstance(found, Response):
            return found
        if request.headers.get("e2b-sandbox-port", ENVD_PORT) != ENVD_PORT:
            return wire.error(404, "no such endpoint on this port")
        user = request.query_params.get("username")
        if user not in _USERS:
            # envd answers 401 for a user it has not; moat has the sandbox user and root.
            shown = repr(user[:32]) if user.isprintable() else "(unprintable)"
            return wire.error(
                401, f"user {shown} is not available: moat knows the users {', '.join(USERS)}"
            )
        return found

    async def health(self, request: Request) -> Response | None:
        """A signed ``GET /health`` (either operation's signature): 204; None when the
        request is not signed (the plane's usual admission answers it)."""
        if "signature" not in request.query_params or "x-access-token" in request.headers:
            return None
        found = await self.admit(request, ("read", "write"))
        return found if isinstance(found, Response) else Response(status_code=204)

    # -- download ----------------------------------------------------------------------

    async def download(self, request: Request) -> Response:
        return await _safely(request, self._download)

    async def _download(self, request: Request) -> Response:
        found = await self._admitted(request, ("read",))
        if isinstance(found, Response):
            return found
        sid, rec = found
        try:
            coding = accepted(request.headers.get("accept-encoding"))
        except EncodingRefused as exc:
            return wire.error(406, str(exc))
        path = _path(request.query_params.get("path"))
        user = request.query_params.get("username") or USER
        data = await self.state.front.read_file(rec.tenant, sid, path, format="bytes", user=user)
        assert isinstance(data, bytes)  # format="bytes"
        headers = {"Content-Disposition": _disposition(path), "Vary": "Accept-Encoding"}
        if coding == "gzip":
            headers["Content-Encoding"] = "gzip"
            if len(data) > _OFF_LOOP:
                data = await asyncio.to_thread(gzip.compress, data, 6)
            else:
                data = gzip.compress(data, 6)
        return Response(data, media_type="application/octet-stream", headers=headers)

    # -- upload ------------------------------------------------------------------------

    async def upload(self, request: Request) -> Response:
        return await _safely(request, self._upload)

    async def _upload(self, request: Request) -> Response:
        found = await self._admitted(request, ("write",))
        if isinstance(found, Response):
            return found
        sid, rec = found
        metadata = _metadata(request.headers)
        ctype, params = parse_options_header(request.headers.get("content-type", ""))
        if ctype != b"application/octet-stream" and not ctype.startswith(b"multipart/"):
            raise InvalidArgumentError(
                "unsupported content type, expected multipart/form-data or application/octet-stream"
            )
        try:
            coding = request_coding(request.headers.get("content-encoding"))
        except EncodingRefused as exc:
            raise InvalidArgumentError(f"error decompressing request body: {exc}") from None
        query_path = request.query_params.get("path")
        if ctype == b"application/octet-stream" and not query_path:
            raise InvalidArgumentError("path query parameter is required for raw body upload")
        body = await _body(request, coding)
        if ctype == b"application/octet-stream":
            uploads = [(_path(query_path), body)]
        else:
            boundary = params.get(b"boundary")
            if not boundary:
                raise InvalidArgumentError("the multipart body has no boundary")
            parts = await asyncio.to_thread(parse_parts, body, boundary)
            uploads = _destinations(parts, query_path)
        out: list[dict[str, Any]] = []
        user = request.query_params.get("username") or USER
        for path, data in uploads:
            entry = await self.state.front.write_file(
                rec.tenant, sid, path, data, metadata=metadata, user=user
            )
            item: dict[str, Any] = {"path": entry.path, "name": entry.name, "type": "file"}
            if entry.metadata:
                item["metadata"] = entry.metadata
            out.append(item)
        return JSONResponse(out)


# -- helpers ---------------------------------------------------------------------------------


async def _safely(request: Request, handler: Callable[[Request], Awaitable[Response]]) -> Response:
    try:
        return await handler(request)
    except BodyTooLarge:
        return too_large()
    except SandboxError as exc:
        return wire.moat_error(exc)
    except ClientDisconnect:
        raise  # the client left: moat.server.app ends the request quietly
    except Exception:  # invariant 8: nothing of the host in the reply
        log.exception("sandbox plane: %s /files", request.method)
        return wire.error(500, "internal error")


def _expiration(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgumentError("signature_expiration must be an integer") from None


def _path(raw: str | None) -> str:
    """A path of the request: relative ones resolve against the user's home."""
    if not raw:
        raise InvalidArgumentError("path is required")
    return raw if raw.startswith("/") else posixpath.join(HOME, raw)


def _disposition(path: str) -> str:
    name = posixpath.basename(path) or "file"
    plain = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{urllib.parse.quote(name)}"


def _metadata(headers: Headers) -> dict[str, str]:
    """``X-Metadata-<key>`` headers (keys lowercased, as envd stores them), checked now, so
    a refused set writes nothing (the file is not even created)."""
    found: dict[str, str] = {}
    for name, value in headers.items():  # Starlette gives names lowercased
        if name.startswith(_METADATA_HEADER):
            found.setdefault(name[len(_METADATA_HEADER) :], value)
    return v.file_metadata(found)


async def _body(request: Request, coding: str | None) -> bytes:
    """The whole (decoded) body: at most MAX_FILE_BODY bytes on the wire and decoded."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise InvalidArgumentError("bad Content-Length")
        if int(length) > MAX_FILE_BODY:
            raise BodyTooLarge
    inflater = Inflater(MAX_FILE_BODY) if coding == "gzip" else None
    out = bytearray()
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > MAX_FILE_BODY:
                raise BodyTooLarge
            if inflater is None:
                out += chunk
            elif chunk:
                # A bomb's chunk may inflate to the whole cap: off the event loop.
                out += await asyncio.to_thread(inflater.feed, chunk)
        if inflater is not None:
            inflater.finish()
    except InflatedTooLarge:
        raise BodyTooLarge from None
    except EncodingRefused as exc:
        raise InvalidArgumentError(f"error decompressing request body: {exc}") from None
    return bytes(out)


def parse_parts(body: bytes, boundary: bytes) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """The parts of a multipart body: (form name, Content-Disposition params, content).

    python-multipart does the parsing; moat adds the limits (parts, header bytes) and
    refuses a body that does not end properly.
    """
    parts: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
    headers: dict[bytes, bytes] = {}
    field, value, data = bytearray(), bytearray(), bytearray()
    header_bytes = 0
    ended = False

    def on_part_begin() -> None:
        nonlocal header_bytes
        if len(parts) >= MAX_PARTS:
            raise InvalidArgumentError(f"the upload has more than {MAX_PARTS} parts")
        headers.clear()
        data.clear()
        header_bytes = 0

    def on_header_field(buf: bytes, start: int, end: int) -> None:
        _count(end - start)
        field.extend(buf[start:end])

    def on_header_value(buf: bytes, start: int, end: int) -> None:
        _count(end - start)
        value.extend(buf[start:end])

    def _count(n: int) -> None:
        nonlocal header_bytes
        header_bytes += n
        if header_bytes > MAX_PART_HEADERS:
            raise InvalidArgumentError("a multipart part's headers are too large")

    def on_header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def on_part_data(buf: bytes, start: int, end: int) -> None:
        data.extend(buf[start:end])

    def on_part_end() -> None:
        _, options = parse_options_header(
            headers.get(b"content-disposition", b"").decode("latin-1")
        )
        parts.append((options.get(b"name", b""), options, bytes(data)))

    def on_end() -> None:
        nonlocal ended
        ended = True

    callbacks: Any = {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data,
        "on_part_end": on_part_end, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_end": on_end,
    }  # fmt: skip
    parser = MultipartParser(boundary, callbacks, max_size=MAX_FILE_BODY)
    try:
        parser.write(body)
        parser.finalize()
    except InvalidArgumentError:
        raise
    except FormParserError:  # python-multipart: a malformed body
        raise InvalidArgumentError("the multipart body is malformed") from None
    if not ended:
        raise InvalidArgumentError("the multipart body is truncated")
    return parts


def _destinations(
    parts: list[tuple[bytes, dict[bytes, bytes], bytes]], query_path: str | None
) -> list[tuple[str, bytes]]:
    """Where each ``file`` part goes: ``path`` when given, else the part's filename (E2B:
    the filename is the destination); one destination at most once per upload."""
    out: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    for name, options, data in parts:
        if name != b"file":
            continue  # envd ignores other fields
        raw = query_path
        if not raw:
            try:
                raw = options.get(b"filename", b"").decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgumentError("a part's filename is not UTF-8") from None
        dest = _path(raw)
        if dest in seen:
            raise InvalidArgumentError(
                "you cannot upload multiple files to the same path in one upload request"
            )
        seen.add(dest)
        out.append((dest, data))
    if not out:
        raise InvalidArgumentError("no file in the upload")
    return out
