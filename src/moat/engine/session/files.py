"""Files: read, write (streamed), list, stat, move, remove, make_dir."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import IO, Any

from moat.engine.output import off_loop
from moat.engine.session.core import SessionCore
from moat.errors import InvalidArgumentError, SandboxError, TimeoutError
from moat.model import EntryInfo
from moat.protocol import CHUNK_SIZE, Frame, MsgType

#: Caps on file transfers through the SDK.
MAX_READ_BYTES = 64 * 1024 * 1024
MAX_WRITE_BYTES = 512 * 1024 * 1024


class FileCalls(SessionCore):
    """The sandbox's filesystem, resolved inside the sandbox."""

    async def read_file(
        self, path: str, max_bytes: int = MAX_READ_BYTES, *, root: bool = False
    ) -> bytes:
        """Raw bytes; the front door guards them before they leave (invariant 4)."""
        client = self._check()
        await self._prepare_guard()
        fields = _as(root, {"path": path, "max_bytes": max_bytes})
        call = await client.open(MsgType.FILE_READ, fields)
        buf = bytearray()

        def data(frame: Frame) -> None:
            buf.extend(frame.payload)
            if len(buf) > max_bytes:
                raise self._violation("file larger than announced")

        try:
            async with asyncio.timeout(120):
                await self.consume(call, MsgType.FILE_READ, {MsgType.DATA: data}, "a file read")
        except builtins.TimeoutError:
            raise TimeoutError("reading the file took too long") from None
        finally:
            call.close()
        return bytes(buf)

    async def write_file(
        self,
        path: str,
        chunks: AsyncIterator[bytes],
        max_bytes: int = MAX_WRITE_BYTES,
        metadata: dict[str, str] | None = None,
        *,
        root: bool = False,
    ) -> EntryInfo:
        """Stream ``chunks`` to ``path``; ``metadata`` (checked by the caller) replaces the
        file's user metadata when given, and is left alone when None."""
        client = self._check()
        fields = _as(root, {"path": path, "max_bytes": max_bytes})
        if metadata is not None:
            fields["metadata"] = metadata
        call = await client.open(MsgType.FILE_WRITE, fields)
        total = 0
        try:
            async for chunk in chunks:
                total += len(chunk)
                if total > max_bytes:
                    raise InvalidArgumentError(
                        f"file is larger than the write cap ({max_bytes} bytes)"
                    )
                for i in range(0, len(chunk), CHUNK_SIZE):
                    client.send(MsgType.FILE_CHUNK, call.id, {}, chunk[i : i + CHUNK_SIZE])
                    await client.drain()
                    if call.pending():  # an early FAIL (e.g. disk full): stop sending
                        break
                if call.pending():  # ...and stop reading the source; consume() raises it
                    break
            client.send(MsgType.FILE_CHUNK, call.id, {"eof": True})
            await client.drain()
            async with asyncio.timeout(60):
                await self.consume(call, MsgType.FILE_WRITE, {}, "a file write")
        except BaseException:
            # Tell the agent to give up on this write (an empty eof closes the file).
            with contextlib.suppress(SandboxError):
                client.send(MsgType.FILE_CHUNK, call.id, {"eof": True})
            raise
        finally:
            call.close()
        return await self.stat(path, root=root)

    async def list_dir(self, path: str, depth: int, *, root: bool = False) -> list[EntryInfo]:
        self._check()
        await self._prepare_guard()
        fields = _as(root, {"path": path, "depth": depth})
        reply = await self.request(MsgType.FILE_LIST, fields, timeout=60)
        return await self._entries(reply["entries"])

    async def stat(self, path: str, *, root: bool = False) -> EntryInfo:
        self._check()
        await self._prepare_guard()
        reply = await self.request(MsgType.FILE_STAT, _as(root, {"path": path}))
        return (await self._entries([reply]))[0]

    async def remove(self, path: str, *, root: bool = False) -> None:
        await self._prepare_guard()
        await self.request(MsgType.FILE_REMOVE, _as(root, {"path": path}), timeout=60)

    async def make_dir(self, path: str, *, root: bool = False) -> bool:
        await self._prepare_guard()
        reply = await self.request(MsgType.FILE_MKDIR, _as(root, {"path": path}))
        return bool(reply["created"])

    async def move(self, path: str, dst: str, *, root: bool = False) -> EntryInfo:
        """Rename or move ``path`` to ``dst``; the entry now at ``dst``."""
        await self._prepare_guard()
        fields = _as(root, {"path": path, "dst": dst})
        reply = await self.request(MsgType.FILE_MOVE, fields, timeout=60)
        return (await self._entries([reply]))[0]

    async def _entries(self, entries: list[dict[str, Any]]) -> list[EntryInfo]:
        """Entries of a reply, guarded; many or long names are scanned off the event loop."""
        size = sum(
            len(e["name"]) + len(e["path"]) + len(e.get("symlink_target", ""))
            + sum(len(k) + len(v) for k, v in e.get("metadata", {}).items())
            for e in entries
        )  # fmt: skip
        try:
            return await off_loop(size, lambda: [self._entry(e) for e in entries])
        except _BadEntry:
            raise self._violation("bad file entry") from None

    def _entry(self, e: dict[str, Any]) -> EntryInfo:
        """An entry of the reply schema (type an enum, permissions a pattern); its names
        are chosen inside the sandbox: guarded (invariant 4). May run in a worker thread."""
        target = e.get("symlink_target")
        found: dict[str, str] = e.get("metadata") or {}
        redact = self.guard.redact_text
        # Keys and values are chosen inside the sandbox (user code can set them): guarded
        # like names (invariant 4); the reply schema already held them to printable ASCII.
        metadata = {redact(k, "files"): redact(v, "files") for k, v in found.items()}
        try:
            mtime = dt.datetime.fromtimestamp(float(e["mtime"]), dt.UTC)
        except (ValueError, OverflowError, OSError):
            raise _BadEntry from None
        return EntryInfo(
            name=self.guard.redact_text(e["name"], "files"),
            path=self.guard.redact_text(e["path"], "files"),
            type=e["type"],
            size=e["size"],
            mode=e["mode"],
            permissions=e["permissions"],
            modified_time=mtime,
            symlink_target=self.guard.redact_text(target, "files") if target else None,
            metadata=metadata or None,
        )


class _BadEntry(Exception):
    """An entry the schema let through but that can't be represented (an mtime)."""


def _as(root: bool, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` of a request made as root of the sandbox when ``root`` (docs/users.md)."""
    if root:
        fields["root"] = True
    return fields


def file_chunks(data: str | bytes | IO[Any]) -> Any:
    """Normalise what files.write accepts into an async iterator of bytes chunks."""

    async def gen() -> AsyncIterator[bytes]:
        if isinstance(data, str):
            raw = data.encode("utf-8")
            for i in range(0, len(raw), 1 << 20):
                yield raw[i : i + (1 << 20)]
        elif isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
            for i in range(0, len(raw), 1 << 20):
                yield raw[i : i + (1 << 20)]
        else:
            while True:
                chunk = await asyncio.to_thread(data.read, 1 << 20)
                if not chunk:
                    break
                yield chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)

    return gen()
