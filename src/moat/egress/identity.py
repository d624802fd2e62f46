"""What a sandbox's processes may remember of its gateway: placeholders and the CA.

Trust domain: host engine. A sandbox restored with its memory (a resume, a start from a
memory snapshot, a fork) still holds its secrets' placeholders in its environment and in
whatever its programs copied them into, and its TLS clients may have loaded the CA bundle.
The new gateway of the restored sandbox takes them over from the saved state, so the
sandbox comes back as it was (issue 11): the same placeholders swap in the same values for
the same bound hosts, and certificates chain to the CA it trusts.

Saved beside the checkpoint on the host only (``GATEWAY_FILE``, mode 0600: the CA key is a
host secret and never enters a sandbox, invariant 3; no secret value is in it). What is
loaded is validated: a placeholder of the wrong shape or an unknown name is dropped (that
secret draws a fresh one), a CA whose key does not match its certificate, whose name
constraints differ from the secrets' bound hosts, or that has expired is replaced by a new
one: a restore never gets a CA that could sign for more than its secrets need.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The file beside a saved checkpoint (paused sandbox or snapshot) that holds the identity.
GATEWAY_FILE = "gateway.json"
#: The most bytes of that file read (64 placeholders and one EC key and certificate).
_MAX_BYTES = 64 * 1024
_PLACEHOLDER = re.compile(r"moat-ph-[0-9a-f]{32}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


@dataclass(frozen=True)
class GatewayIdentity:
    """A gateway's placeholders (variable name -> placeholder) and CA (PEM key and cert)."""

    placeholders: dict[str, str] = field(default_factory=dict)
    ca_key_pem: bytes = b""
    ca_cert_pem: bytes = b""

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": 1,
                "placeholders": self.placeholders,
                "ca_key": self.ca_key_pem.decode("ascii"),
                "ca_cert": self.ca_cert_pem.decode("ascii"),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> GatewayIdentity | None:
        """The identity in ``text``, or None when it is not one (never raises)."""
        try:
            data: Any = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("version") != 1:
            return None
        raw = data.get("placeholders")
        held = {
            k: v
            for k, v in (raw.items() if isinstance(raw, dict) else ())
            if isinstance(k, str) and _NAME.fullmatch(k)
            and isinstance(v, str) and _PLACEHOLDER.fullmatch(v)
        }  # fmt: skip
        key, cert = data.get("ca_key"), data.get("ca_cert")
        if not isinstance(key, str) or not isinstance(cert, str):
            key = cert = ""
        try:
            return cls(held, key.encode("ascii"), cert.encode("ascii"))
        except UnicodeEncodeError:
            return cls(held)

    def save(self, directory: Path) -> None:
        """Write it into ``directory`` (a checkpoint's, root-only) with mode 0600."""
        path = directory / GATEWAY_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, directory: Path) -> GatewayIdentity | None:
        """The identity saved in ``directory``, or None (none saved, unreadable, malformed:
        the restored sandbox then gets a fresh one, as a sandbox saved before this existed)."""
        try:
            fd = os.open(directory / GATEWAY_FILE, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            data = f.read(_MAX_BYTES + 1)
        if len(data) > _MAX_BYTES:
            return None
        return cls.from_json(data.decode("ascii", "replace"))
