"""A matplotlib figure's data as E2B's ``chart`` (line, scatter, bar, pie, box and whisker,
superchart, unknown), for the host to pass on beside the figure's PNG.

Runs inside the sandbox, in the kernel, on user figures: stdlib and matplotlib only (imported
lazily, by the caller's ``figure``). Bounded: strings are cut to ``MAX_STR``; a chart with more
series, points or sub-charts than the caps, or whose JSON is over ``MAX_BYTES``, is no chart.
Anything unexpected (an odd artist, a broken figure) is no chart too: the PNG stays. The host
checks the shape again (``moat.protocol.charts``, invariant 6) and guards its text (invariant 4).
"""

from __future__ import annotations

import json
import math
import re

# The agent starts in every sandbox: typing costs ~8 ms of imports, so it is only
# imported for the type checker (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Longest string kept (titles, labels, tick labels, categories); longer ones are cut.
MAX_STR = 256
#: Most series (lines, scatter sets, bars, wedges, boxes) in one chart.
MAX_ELEMENTS = 256
#: Most points in one series, and in one chart (sub-charts included).
MAX_POINTS = 5000
MAX_TOTAL_POINTS = 20000
#: Most ticks kept per axis (more are cut).
MAX_TICKS = 100
#: Most axes in a superchart.
MAX_AXES = 16
#: Largest chart JSON sent.
MAX_BYTES = 256 * 1024

_SCALES = ("linear", "log", "symlog", "logit", "function", "functionlog", "asinh")
_UNIT = re.compile(r"\(([^()]*)\)\s*$")


class _TooBig(Exception):
    """The figure is over a cap: no chart."""


def chart_of(fig: Any) -> dict[str, Any] | None:
    """The chart of a drawn figure (its PNG rendered first: tick labels are set at draw
    time), or None when it has none or anything goes wrong."""
    try:
        chart = _figure(fig)
        if chart is None:
            return None
        if len(json.dumps(chart, allow_nan=False)) > MAX_BYTES:
            return None
        return chart
    except Exception:  # noqa: BLE001 - user figures hold anything: no chart, never an error
        return None


def _figure(fig: Any) -> dict[str, Any] | None:
    axes = list(fig.get_axes())
    if not axes:
        return None
    budget = [MAX_TOTAL_POINTS]
    if len(axes) == 1:
        return _axes(axes[0], budget)
    if len(axes) > MAX_AXES:
        raise _TooBig
    title = _text(fig._suptitle.get_text()) if getattr(fig, "_suptitle", None) else None
    return {
        "type": "superchart",
        "title": title,
        "elements": [_axes(ax, budget) for ax in axes],
    }


def _axes(ax: Any, budget: list[int]) -> dict[str, Any]:
    from matplotlib.collections import PathCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import PathPatch, Rectangle, Wedge

    objects = [*ax.lines, *ax.collections, *ax.patches, *ax.artists, *ax.images, *ax.tables]
    if all(isinstance(o, Line2D) for o in objects):
        return _line(ax, budget)
    if all(isinstance(o, (PathPatch, Line2D)) for o in objects):
        return _box(ax)
    if all(isinstance(o, PathCollection) for o in objects):
        return _scatter(ax, budget)
    if all(isinstance(o, Wedge) for o in objects):
        return _pie(ax)
    if all(isinstance(o, Rectangle) for o in objects):
        return _bar(ax)
    return {"type": "unknown", "title": _title(ax), "elements": []}


# -- text --------------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    """A label as E2B gives it: None when empty; cut to MAX_STR."""
    if not isinstance(value, str) or not value:
        return None
    return value[:MAX_STR]


def _str(value: Any) -> str:
    return str(value)[:MAX_STR]


def _title(ax: Any) -> str | None:
    return _text(ax.get_title())


def _unit(label: str | None) -> str | None:
    """``"Time (s)"`` -> ``"s"``: the last parenthesised part of an axis label."""
    if label is None:
        return None
    m = _UNIT.search(label)
    return m[1] if m and m[1] else None


def _series_label(label: Any, kind: str) -> str:
    """A series' legend label; matplotlib's hidden defaults (``_child3``) as ``"<kind> 3"``."""
    text = _str(label)
    if text.startswith("_child") and text[6:].isdigit():
        return f"{kind} {text[6:]}"
    return text


def _chart2d(ax: Any, kind: str, swap: bool = False) -> dict[str, Any]:
    x_label, y_label = _text(ax.get_xlabel()), _text(ax.get_ylabel())
    if swap:  # horizontal bars/boxes: x is the category axis, as for vertical ones
        x_label, y_label = y_label, x_label
    return {
        "type": kind,
        "title": _title(ax),
        "x_label": x_label,
        "y_label": y_label,
        "x_unit": _unit(x_label),
        "y_unit": _unit(y_label),
        "elements": [],
    }


# -- axes and values ---------------------------------------------------------------------------


def _is_datetime(axis: Any) -> bool:
    from matplotlib import dates

    if isinstance(axis.get_major_locator(), dates.DateLocator):
        return True
    kinds = tuple(
        k
        for k in (
            getattr(dates, "DateConverter", None),
            getattr(dates, "ConciseDateConverter", None),
            getattr(dates, "_SwitchableDateConverter", None),
        )
        if isinstance(k, type)
    )
    return bool(kinds) and isinstance(getattr(axis, "converter", None), kinds)


def _is_categorical(axis: Any) -> bool:
    from matplotlib import category

    return isinstance(axis.get_major_formatter(), category.StrCategoryFormatter)


def _scale(ax: Any, axis: Any, which: str) -> str:
    if _is_datetime(axis):
        return "datetime"
    if _is_categorical(axis):
        return "categorical"
    name = ax.get_xscale() if which == "x" else ax.get_yscale()
    return name if name in _SCALES else "unknown"


def _value_fn(axis: Any) -> Any:
    """How a coordinate on ``axis`` is reported: an ISO date, a category, or a float."""
    if _is_datetime(axis):
        from matplotlib import dates

        def as_date(v: Any) -> str | None:
            f = float(v)
            return dates.num2date(f).isoformat() if math.isfinite(f) else None

        return as_date
    if _is_categorical(axis):
        fmt = axis.get_major_formatter()

        def as_category(v: Any) -> str | float | None:
            f = float(v)
            if not math.isfinite(f):
                return None
            name = fmt(f)
            return _str(name) if name else f

        return as_category
    return _float


def _float(v: Any) -> float | None:
    """A finite float, or None (JSON has no NaN: a gap in a line)."""
    f = float(v)
    return f if math.isfinite(f) else None


def _ticks(ax: Any, axis: Any) -> tuple[list[Any], list[str]]:
    value = _value_fn(axis) if _is_datetime(axis) else _float
    ticks = [value(t) for t in list(axis.get_majorticklocs())[:MAX_TICKS]]
    labels = [_str(t.get_text()) for t in list(axis.get_majorticklabels())[:MAX_TICKS]]
    return [t for t in ticks if t is not None], labels


def _point_chart(ax: Any, kind: str) -> dict[str, Any]:
    chart = _chart2d(ax, kind)
    for which, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
        ticks, labels = _ticks(ax, axis)
        chart[f"{which}_ticks"] = ticks
        chart[f"{which}_tick_labels"] = labels
        chart[f"{which}_scale"] = _scale(ax, axis, which)
    return chart


def _points(xs: Any, ys: Any, ax: Any, budget: list[int]) -> list[list[Any]]:
    if len(xs) > MAX_POINTS or len(ys) > MAX_POINTS:
        raise _TooBig
    budget[0] -= min(len(xs), len(ys))
    if budget[0] < 0:
        raise _TooBig
    fx, fy = _value_fn(ax.xaxis), _value_fn(ax.yaxis)
    return [[fx(x), fy(y)] for x, y in zip(xs, ys, strict=False)]


def _count(chart: dict[str, Any]) -> dict[str, Any]:
    if len(chart["elements"]) > MAX_ELEMENTS:
        raise _TooBig
    return chart


# -- chart types -------------------------------------------------------------------------------


def _line(ax: Any, budget: list[int]) -> dict[str, Any]:
    chart = _point_chart(ax, "line")
    for line in ax.lines[: MAX_ELEMENTS + 1]:
        xs, ys = line.get_xdata(orig=False), line.get_ydata(orig=False)
        chart["elements"].append(
            {
                "label": _series_label(line.get_label(), "Line"),
                "points": _points(xs, ys, ax, budget),
            }
        )
    return _count(chart)


def _scatter(ax: Any, budget: list[int]) -> dict[str, Any]:
    chart = _point_chart(ax, "scatter")
    for coll in ax.collections[: MAX_ELEMENTS + 1]:
        offsets = coll.get_offsets()
        xs = [o[0] for o in offsets[: MAX_POINTS + 1]]
        ys = [o[1] for o in offsets[: MAX_POINTS + 1]]
        chart["elements"].append(
            {
                "label": _series_label(coll.get_label(), "Series"),
                "points": _points(xs, ys, ax, budget),
            }
        )
    return _count(chart)


def _tick_names(axis: Any) -> list[tuple[float, str]]:
    locs = list(axis.get_majorticklocs())
    names = [t.get_text() for t in axis.get_majorticklabels()]
    return [(float(loc), name) for loc, name in zip(locs, names, strict=False)]


def _name_at(ticks: list[tuple[float, str]], pos: float) -> str:
    """The tick label at ``pos`` (a category's name), else the position as text."""
    for loc, name in ticks:
        if abs(loc - pos) <= 1e-9 * max(1.0, abs(pos)) and name:
            return _str(name)
    return _str(f"{pos:g}")


def _bar(ax: Any) -> dict[str, Any]:
    from matplotlib.container import BarContainer

    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    horizontal = bool(bars) and all(getattr(c, "orientation", None) == "horizontal" for c in bars)
    chart = _chart2d(ax, "bar", swap=horizontal)
    ticks = _tick_names(ax.yaxis if horizontal else ax.xaxis)
    for n, container in enumerate(bars):
        group = _str(container.get_label())
        if group.startswith("_"):
            group = f"Group {n}"
        for rect in list(container)[: MAX_ELEMENTS + 1]:
            if horizontal:
                pos, value = rect.get_y() + rect.get_height() / 2, rect.get_width()
            else:
                pos, value = rect.get_x() + rect.get_width() / 2, rect.get_height()
            chart["elements"].append(
                {"label": _name_at(ticks, float(pos)), "group": group, "value": _float(value)}
            )
            _count(chart)
    return chart


def _pie(ax: Any) -> dict[str, Any]:
    chart: dict[str, Any] = {"type": "pie", "title": _title(ax), "elements": []}
    for wedge in ax.patches[: MAX_ELEMENTS + 1]:
        chart["elements"].append(
            {
                "label": _str(wedge.get_label()),
                "angle": abs(round(float(wedge.theta2) - float(wedge.theta1), 4)),
                "radius": _float(wedge.r),
            }
        )
    return _count(chart)


def _box(ax: Any) -> dict[str, Any]:
    """Boxes drawn with ``patch_artist=True``: each box a patch from Q1 to Q3; whiskers,
    caps, medians and fliers are lines at its centre."""
    boxes = []
    for patch in ax.patches[: MAX_ELEMENTS + 1]:
        v = patch.get_path().vertices
        boxes.append((min(v[:, 0]), max(v[:, 0]), min(v[:, 1]), max(v[:, 1])))
    # Vertical boxes share a width; horizontal ones a height.
    widths = {round(b[1] - b[0], 6) for b in boxes}
    heights = {round(b[3] - b[2], 6) for b in boxes}
    vertical = len(widths) <= len(heights)
    chart = _chart2d(ax, "box_and_whisker", swap=not vertical)
    if not vertical:
        boxes = [(b[2], b[3], b[0], b[1]) for b in boxes]
    ticks = _tick_names(ax.xaxis if vertical else ax.yaxis)
    lines = []
    for line in ax.lines:
        xs, ys = list(line.get_xdata(orig=False)), list(line.get_ydata(orig=False))
        if not vertical:
            xs, ys = ys, xs
        lines.append((line, [float(x) for x in xs], [float(y) for y in ys]))
    for x0, x1, q1, q3 in boxes:
        centre = (x0 + x1) / 2
        low, high, median = q1, q3, None
        outliers: list[float | None] = []
        for line, xs, ys in lines:
            if not xs or min(xs) < x0 - 1e-9 or max(xs) > x1 + 1e-9:
                continue  # another box's
            if line.get_linestyle() in ("None", "none", "", " "):
                outliers.extend(_float(y) for y in ys[:MAX_POINTS])
            elif len(ys) == 2 and ys[0] == ys[1] and abs(xs[1] - xs[0] - (x1 - x0)) < 1e-9:
                median = ys[0]
            elif len(ys) == 2 and xs[0] == xs[1] == centre:
                if max(ys) == q1 or min(ys) < q1:
                    low = min(low, min(ys))
                if min(ys) == q3 or max(ys) > q3:
                    high = max(high, max(ys))
        chart["elements"].append(
            {
                "label": _name_at(ticks, centre),
                "min": _float(low),
                "first_quartile": _float(q1),
                "median": _float(median) if median is not None else None,
                "third_quartile": _float(q3),
                "max": _float(high),
                "outliers": [o for o in outliers if o is not None],
            }
        )
    return _count(chart)
