"""A pure writer of "newc" cpio archives, the format the Linux initramfs loader reads.

Trust domain: host engine. Pure: entries in, bytes out; ownership, modes and times are set
by the caller (all zero times) so the same inputs always give the same archive and hash.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

_MAGIC = b"070701"


@dataclass(frozen=True)
class Entry:
    """One archive member: a directory, a regular file or a symlink (target in ``data``)."""

    path: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def _header(ino: int, entry: Entry, name: bytes, size: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        entry.uid,
        entry.gid,
        1,  # nlink
        0,  # mtime: reproducible archives
        size,
        0,
        0,  # dev major/minor
        0,
        0,  # rdev major/minor
        len(name) + 1,
        0,  # check
    )
    return _MAGIC + b"".join(b"%08X" % f for f in fields)


def archive(entries: list[Entry]) -> bytes:
    """Serialise entries (parents before children) followed by the trailer."""
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = (entry.path.lstrip("/") or ".").encode()
        if entry.path != "TRAILER!!!" and not (
            stat.S_ISDIR(entry.mode) or stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode)
        ):
            raise ValueError("cpio entries must be directories, files or symlinks")
        data = entry.data
        hdr = _header(ino if entry.path != "TRAILER!!!" else 0, entry, name, len(data))
        out += hdr + name + b"\0"
        out += _pad4(len(hdr) + len(name) + 1)
        out += data + _pad4(len(data))
    # The kernel reads archives in 512-byte blocks; pad like GNU cpio does.
    out += b"\0" * ((512 - len(out) % 512) % 512)
    return bytes(out)


def directory(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(path, stat.S_IFDIR | mode, uid=uid, gid=gid)


def file(path: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | mode, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())
