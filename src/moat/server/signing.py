"""Signed file URLs: what ``download_url()``/``upload_url()`` put in a link for a browser.

``v1_`` + standard base64 (unpadded) of sha256 over ``path:op:user:token[:expiration]``
(E2B-WIRE.md §2b): ``op`` is ``read`` or ``write``, ``user`` is "" when the caller named
none, ``token`` is the sandbox's access token. A signature is as good as the token for that
one path and operation; the expiration (unix seconds), when signed, is checked after the
signature (an expired link is refused only once it is known to be genuine). Pure.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable
from typing import Literal, TypeVar

Op = Literal["read", "write"]
T = TypeVar("T")


class SignatureRefused(Exception):
    """The signature matches no sandbox's token, or it has expired (401)."""


def sign(path: str, op: Op, user: str | None, token: str, expiration: int | None) -> str:
    """The signature of ``path``/``op`` for ``user`` (None: the default user) under ``token``."""
    parts = [path, op, user or "", token]
    if expiration is not None:
        parts.append(str(expiration))
    digest = hashlib.sha256(":".join(parts).encode("utf-8")).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode("ascii")


def find(
    candidates: Iterable[tuple[T, str]],
    signature: str,
    *,
    path: str,
    ops: tuple[Op, ...],
    user: str | None,
    expiration: int | None,
    now: float | None = None,
) -> T:
    """The candidate (an item and its token) whose token signed this request.

    Every candidate is compared in constant time (``hmac.compare_digest``), so how long a
    refusal takes says nothing of how close a guess came. Raises SignatureRefused.
    """
    given = signature.encode("utf-8", "replace")
    found: T | None = None
    for item, token in candidates:
        for op in ops:
            expected = sign(path, op, user, token, expiration).encode("ascii")
            if hmac.compare_digest(expected, given) and found is None:
                found = item
    if found is None:
        raise SignatureRefused("invalid signature")
    if expiration is not None and expiration < (time.time() if now is None else now):
        raise SignatureRefused("signature is already expired")
    return found
