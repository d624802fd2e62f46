"""The schema of a result's ``chart`` (E2B's chart shapes), as the host accepts it from the
agent (invariant 6): closed objects per chart type, every string and list bounded, every number
finite, a superchart one level deep. Pure, stdlib only; ``moat.agent.charts`` writes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["CHART_TYPES", "SCALES", "check_chart"]

CHART_TYPES = ("line", "scatter", "bar", "pie", "box_and_whisker", "superchart", "unknown")
SCALES = (
    "linear",
    "datetime",
    "categorical",
    "log",
    "symlog",
    "logit",
    "function",
    "functionlog",
    "asinh",
    "unknown",
)
#: Bounds, a little above what the agent sends (moat.agent.charts) so a guard redaction that
#: lengthens a string still fits when the chart is checked again.
MAX_STR = 1024
MAX_ELEMENTS = 256
MAX_POINTS = 5000
MAX_TICKS = 100
MAX_AXES = 16

Check = Callable[[Any], bool]


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _text(x: Any) -> bool:
    return isinstance(x, str) and len(x) <= MAX_STR


def _opt(check: Check) -> Check:
    return lambda x: x is None or check(x)


def _list(item: Check, most: int) -> Check:
    return lambda x: isinstance(x, list) and len(x) <= most and all(item(i) for i in x)


def _obj(fields: Mapping[str, Check]) -> Check:
    """A closed object: exactly these fields."""
    return lambda x: (
        isinstance(x, dict)
        and x.keys() == fields.keys()
        and all(c(x[k]) for k, c in fields.items())
    )


_coord = _opt(lambda x: _num(x) or _text(x))
_point = lambda x: isinstance(x, list) and len(x) == 2 and all(_coord(c) for c in x)  # noqa: E731
_scale = lambda x: x in SCALES  # noqa: E731
_BASE = {"title": _opt(_text)}
_AXES = {
    "x_label": _opt(_text),
    "y_label": _opt(_text),
    "x_unit": _opt(_text),
    "y_unit": _opt(_text),
}
_TICKS = {
    "x_ticks": _list(lambda x: _num(x) or _text(x), MAX_TICKS),
    "x_tick_labels": _list(_text, MAX_TICKS),
    "x_scale": _scale,
    "y_ticks": _list(lambda x: _num(x) or _text(x), MAX_TICKS),
    "y_tick_labels": _list(_text, MAX_TICKS),
    "y_scale": _scale,
}
_SERIES = _obj({"label": _text, "points": _list(_point, MAX_POINTS)})
_BAR = _obj({"label": _text, "group": _text, "value": _opt(_num)})
_WEDGE = _obj({"label": _text, "angle": _num, "radius": _opt(_num)})
_BOX = _obj(
    {
        "label": _text,
        "min": _opt(_num),
        "first_quartile": _opt(_num),
        "median": _opt(_num),
        "third_quartile": _opt(_num),
        "max": _opt(_num),
        "outliers": _list(_num, MAX_POINTS),
    }
)


def _typed(kind: str, fields: Mapping[str, Check], element: Check, most: int) -> Check:
    return _obj(
        {"type": lambda x: x == kind, **fields, "elements": _list(element, most)},
    )


_SINGLE: dict[str, Check] = {
    "line": _typed("line", {**_BASE, **_AXES, **_TICKS}, _SERIES, MAX_ELEMENTS),
    "scatter": _typed("scatter", {**_BASE, **_AXES, **_TICKS}, _SERIES, MAX_ELEMENTS),
    "bar": _typed("bar", {**_BASE, **_AXES}, _BAR, MAX_ELEMENTS),
    "pie": _typed("pie", _BASE, _WEDGE, MAX_ELEMENTS),
    "box_and_whisker": _typed("box_and_whisker", {**_BASE, **_AXES}, _BOX, MAX_ELEMENTS),
    "unknown": _typed("unknown", _BASE, lambda x: False, 0),
}


def _single(x: Any) -> bool:
    check = _SINGLE.get(str(x.get("type"))) if isinstance(x, dict) else None
    return check is not None and check(x)


_SUPER = _typed("superchart", _BASE, _single, MAX_AXES)


def check_chart(chart: Any) -> bool:
    """Whether ``chart`` is a chart moat passes on: one of E2B's shapes, within the bounds."""
    if isinstance(chart, dict) and chart.get("type") == "superchart":
        return _SUPER(chart)
    return _single(chart)
