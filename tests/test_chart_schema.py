"""The host's schema of a result's chart (moat.protocol.charts, invariant 6): pure checks."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from moat.protocol import ProtocolError
from moat.protocol.charts import check_chart
from moat.protocol.replies import check_result_data

AXES = {"x_label": None, "y_label": "Y (u)", "x_unit": None, "y_unit": "u"}
TICKS = {
    "x_ticks": [0.0, "2024-01-01T00:00:00+00:00"],
    "x_tick_labels": ["0"],
    "x_scale": "datetime",
    "y_ticks": [1],
    "y_tick_labels": [],
    "y_scale": "log",
}
LINE: dict[str, Any] = {
    "type": "line",
    "title": "t",
    **AXES,
    **TICKS,
    "elements": [{"label": "a", "points": [[1.0, None], ["x", 2]]}],
}
PIE = {"type": "pie", "title": None, "elements": [{"label": "p", "angle": 90, "radius": 1.0}]}


def test_good_charts_pass() -> None:
    assert check_chart(LINE) and check_chart(PIE)
    assert check_chart({"type": "unknown", "title": None, "elements": []})
    assert check_chart({"type": "superchart", "title": "s", "elements": [LINE, PIE]})
    assert check_result_data({"png": "AA==", "chart": PIE})["chart"] == PIE


def _bad(path: list[Any], value: Any) -> dict[str, Any]:
    c = copy.deepcopy(LINE)
    node: Any = c
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return c


@pytest.mark.parametrize(
    "chart",
    [
        _bad(["title"], 1),
        _bad(["title"], "x" * 1025),
        _bad(["x_scale"], "weird"),
        _bad(["type"], "pie"),  # a line's fields under another type
        _bad(["extra"], 1),  # closed objects
        _bad(["elements", 0, "points", 0, 0], float("nan")),
        _bad(["elements", 0, "points", 0, 0], True),
        _bad(["elements", 0, "points", 0], [1.0, 2.0, 3.0]),
        _bad(["elements", 0, "points"], [[1.0, 2.0]] * 5001),
        _bad(["elements"], [{"label": "a", "points": []}] * 257),
        _bad(["x_ticks"], [0.0] * 101),
        {"type": "superchart", "title": None, "elements": [PIE] * 17},
        {
            "type": "superchart",
            "title": None,
            "elements": [{"type": "superchart", "title": None, "elements": []}],
        },
        {"type": "unknown", "title": None, "elements": [PIE]},
        {
            "type": "pie",
            "title": None,
            "elements": [{"label": "p", "angle": float("inf"), "radius": 1}],
        },
        [],
        "line",
    ],
)
def test_bad_charts_fail(chart: Any) -> None:
    assert not check_chart(chart)
    with pytest.raises(ProtocolError, match="malformed chart"):
        check_result_data({"chart": chart})
