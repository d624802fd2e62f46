"""``json.dumps``/``json.loads`` for frame headers, straight on CPython's ``_json`` accelerator.

Importing ``json`` imports and compiles ``re`` patterns: ~7 ms of CPU in every sandbox's agent
start (a third of what its imports cost), paid on every create. The C scanner and encoder that
``json`` itself uses underneath do the same work without it: same output, same errors (a
``ValueError`` for what isn't JSON). Where ``_json`` is missing or differs (another Python in
a template's root), or fails the self-check below, this falls back to ``json`` itself.

Trust domain: pure (shared by host and agent); the host decodes the agent's frames with it
(invariant 6): the scanner is the one ``json.loads`` runs, with its defaults.
"""

from __future__ import annotations

# Every agent imports this at start: typing stays with the type checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["dumps", "loads"]

#: What ``json.loads`` strips around a document (its ``WHITESPACE`` pattern).
_WS = " \t\n\r"
_CONSTANTS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


class _Context:
    """The attributes ``_json.make_scanner`` reads: ``json.loads``'s defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


def _default(o: object) -> object:
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


def _build() -> tuple[Callable[[str, int], Any], Callable[..., Any]] | None:
    try:
        import _json

        scan = _json.make_scanner(_Context())  # type: ignore[arg-type]  # typeshed: any object with these attributes

        def encoder(compact: bool, ascii_only: bool) -> Any:
            # A fresh one per document, as json.dumps makes: its circular-reference markers
            # are not cleaned up when encoding fails midway.
            item, key = (",", ":") if compact else (", ", ": ")
            quote = _json.encode_basestring_ascii if ascii_only else _json.encode_basestring
            return _json.make_encoder({}, _default, quote, None, key, item, False, False, True)

        # The self-check: what json.dumps/loads give for these (the C types' signatures have
        # stayed put for years, but a template's Python may be any version).
        doc = '{"a": [1, 2.5, "\\u00e9"]} '
        if "".join(encoder(True, False)({"t": "é", "i": [1, 2.5, None, True]}, 0)) != (
            '{"t":"é","i":[1,2.5,null,true]}'
        ) or scan(doc, 0) != ({"a": [1, 2.5, "é"]}, len(doc) - 1):
            return None
    except Exception:  # noqa: BLE001 - anything odd: json itself
        return None
    return scan, encoder


_built = _build()


def loads(text: str) -> Any:
    """``json.loads(text)`` for a str."""
    if _built is None:
        import json

        return json.loads(text)
    stripped = text.lstrip(_WS)
    try:
        obj, end = _built[0](stripped, 0)
    except StopIteration as exc:
        raise ValueError("Expecting value") from exc
    if stripped[end:].strip(_WS):
        raise ValueError("Extra data")
    return obj


def dumps(obj: Any, *, compact: bool = True, ensure_ascii: bool = False) -> str:
    """``json.dumps(obj, ensure_ascii=...)``; ``compact``: ``separators=(",", ":")``."""
    if _built is None or not isinstance(obj, (dict, list)):
        import json

        sep = (",", ":") if compact else (", ", ": ")
        return json.dumps(obj, separators=sep, ensure_ascii=ensure_ascii)
    return "".join(_built[1](compact, ensure_ascii)(obj, 0))
