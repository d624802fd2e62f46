"""The synthetic /etc of the default template: a sandbox user and nothing of the host's."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from moat.paths import state_dir
from moat.runtime.spec import HOME, SANDBOX_GID, SANDBOX_UID, SSH_CONFIG

_FILES = {
    "passwd": (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"user:x:{SANDBOX_UID}:{SANDBOX_GID}:sandbox user:{HOME}:/bin/bash\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    ),
    "group": f"root:x:0:\nuser:x:{SANDBOX_GID}:\nnogroup:x:65534:\n",
    "hostname": "sandbox\n",
    "hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "resolv.conf": "",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    # bound over /proc/cmdline: the host kernel's command line names the host's boot setup
    "cmdline": "quiet\n",
    "ssh_config": SSH_CONFIG,  # bound at /etc/ssh/ssh_config
}


@functools.cache
def etc_dir() -> Path:
    """A world-readable directory holding the synthetic /etc files (written once)."""
    d = state_dir() / "template" / "default" / "etc"
    d.mkdir(parents=True, exist_ok=True, mode=0o755)
    for name, content in _FILES.items():
        path = d / name
        if not path.exists() or path.read_text() != content:
            tmp = d / f".{name}.tmp"
            tmp.write_text(content)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
    for parent in (d, d.parent, d.parent.parent):
        os.chmod(parent, 0o755)  # noqa: S103 - the sandbox uid must read it
    return d
