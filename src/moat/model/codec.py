"""JSON-shaped dicts to and from the model's dataclasses, with validation.

``to_dict(obj)`` gives plain JSON values (tuples as lists, datetimes as ISO 8601 strings);
``from_dict(cls, data)`` is its inverse and checks every field against its annotation: a
missing required field, an unknown field (the schema is closed) or a wrong type is an
``InvalidArgumentError``; the dataclass's own ``__post_init__`` checks ranges.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from moat.errors import InvalidArgumentError

T = TypeVar("T")

#: Nesting and size bounds on what from_dict walks (input may come from a network peer).
_MAX_DEPTH = 32
_MAX_ITEMS = 100_000


def to_dict(obj: Any) -> Any:
    """``obj`` (a model dataclass, or any value inside one) as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dt.datetime):
        return obj.isoformat()
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: Any, _where: str = "", _depth: int = 0) -> T:
    """Build ``cls`` from ``data`` (a dict as ``to_dict`` made it), checking every field."""
    where = _where or cls.__name__
    if not isinstance(data, Mapping):
        raise InvalidArgumentError(f"{where} must be an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown:
        raise InvalidArgumentError(
            f"{where} has unknown fields: {', '.join(sorted(map(str, unknown)))}"
        )
    hints = _hints(typing.cast(Any, cls))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if not f.init:
            continue
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InvalidArgumentError(f"{where}.{name} is required")
            continue
        kwargs[name] = _value(hints[name], data[name], f"{where}.{name}", _depth + 1)
    return cls(**kwargs)


def _value(tp: Any, value: Any, where: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise InvalidArgumentError(f"{where} is nested too deeply")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _value(arg, value, where, depth)
            except InvalidArgumentError as exc:
                errors.append(exc)
        raise errors[0] if errors else InvalidArgumentError(f"{where} has a wrong type")
    if origin is typing.Literal:
        if value not in args:
            raise InvalidArgumentError(f"{where} must be one of {', '.join(map(str, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)) or len(value) > _MAX_ITEMS:
            raise InvalidArgumentError(f"{where} must be a list")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise InvalidArgumentError(f"{where} must have {len(args)} items")
            return tuple(
                _value(a, v, f"{where}[{i}]", depth + 1)
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        items = [_value(args[0], v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping) or len(value) > _MAX_ITEMS:
            raise InvalidArgumentError(f"{where} must be an object")
        kt, vt = args or (str, Any)
        return {
            _value(kt, k, where, depth + 1): _value(vt, v, f"{where}.{k}", depth + 1)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, depth)  # type: ignore[arg-type]
    if tp is dt.datetime:
        if isinstance(value, dt.datetime):
            return value
        if not isinstance(value, str):
            raise InvalidArgumentError(f"{where} must be an ISO 8601 date-time")
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            raise InvalidArgumentError(f"{where} must be an ISO 8601 date-time") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgumentError(f"{where} must be a number")
        return float(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{where} must be a bool")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgumentError(f"{where} must be an integer")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise InvalidArgumentError(f"{where} must be a string")
        return value
    raise InvalidArgumentError(f"{where} has a type this codec does not know")  # pragma: no cover
