"""A tiny image in ``docker save`` format, written by hand (tests of the OCI import)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

#: (path, kind, data): kind d (directory), f (file), x (executable), l (symlink to data)
Entry = tuple[str, str, bytes]


def layer(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, data in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 0
            if kind == "d":
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                t.addfile(ti)
            elif kind == "l":
                ti.type = tarfile.SYMTYPE
                ti.linkname = data.decode()
                t.addfile(ti)
            else:
                ti.size = len(data)
                ti.mode = 0o755 if kind == "x" else 0o644
                t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def docker_archive(path: Path, layers: list[list[Entry]]) -> None:
    """Write ``docker save`` output for an image of ``layers`` (tag moat-test:latest)."""
    blobs = [layer(entries) for entries in layers]
    diff_ids = ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [
        {
            "Config": config_name,
            "RepoTags": ["moat-test:latest"],
            "Layers": [f"l{i}/layer.tar" for i in range(len(blobs))],
        }
    ]
    with tarfile.open(path, "w") as t:

        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 0
            t.addfile(ti, io.BytesIO(data))

        add(config_name, config)
        for i, blob in enumerate(blobs):
            add(f"l{i}/layer.tar", blob)
        add("manifest.json", json.dumps(manifest).encode())
