"""E2B's ``chart`` beside a matplotlib figure's PNG, and PIL images shown or saved: real
sandboxes (container tier for the display logic, one check on gVisor). The chart is sandbox
data: bounded by the agent, checked and guarded by the host (invariants 4, 6).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from tests.conftest import require_tier

from moat import Result, Sandbox
from moat.errors import SandboxDiedError
from moat.protocol.charts import check_chart

SECRET = "s3cr3t-" + secrets.token_hex(12)
GH_TOKEN = "ghp_" + "a1B2" * 9  # secret-shaped: the guard's github_token scanner


@pytest.fixture(scope="module")
def sbx() -> Iterator[Sandbox]:
    require_tier("container")
    with Sandbox.create(isolation="container", timeout=600, sensitive={SECRET: "TOKEN"}) as s:
        yield s


def _chart(sbx: Sandbox, code: str) -> tuple[Result, dict[str, Any]]:
    ex = sbx.run_code("import matplotlib.pyplot as plt\nplt.close('all')\n" + code)
    assert ex.error is None, ex.error
    figs = [r for r in ex.results if r.png]
    assert len(figs) == 1, ex.results
    r = figs[0]
    assert r.png is not None and base64.b64decode(r.png)[:4] == b"\x89PNG"
    assert r.chart is not None, "no chart"
    assert "chart" in r.formats() and check_chart(r.chart)
    return r, r.chart


@pytest.mark.container
def test_line_chart_with_units_and_datetime_scale(sbx: Sandbox) -> None:
    _, c = _chart(
        sbx,
        "import datetime\n"
        "d = [datetime.datetime(2024, 1, 1) + datetime.timedelta(hours=i) for i in range(50)]\n"
        "plt.plot(d, [i * i for i in range(50)], label='sq')\n"
        "plt.plot(d, list(range(50)))\n"
        "plt.xlabel('Time (h)'); plt.ylabel('Load (kW)'); plt.title('Load')\nplt.show()",
    )
    assert c["type"] == "line" and c["title"] == "Load"
    assert (c["x_label"], c["x_unit"], c["y_unit"]) == ("Time (h)", "h", "kW")
    assert (c["x_scale"], c["y_scale"]) == ("datetime", "linear")
    assert all(isinstance(t, str) for t in c["x_ticks"]) and c["x_tick_labels"]
    first, second = c["elements"]
    assert first["label"] == "sq" and len(first["points"]) == 50
    assert first["points"][2][0].startswith("2024-01-01T02:00") and first["points"][2][1] == 4
    assert second["label"] == "Line 1"  # matplotlib's hidden default label, named


@pytest.mark.container
def test_log_and_categorical_scales(sbx: Sandbox) -> None:
    _, c = _chart(sbx, "plt.plot([1, 2, 3], [1, 10, 1000])\nplt.yscale('log')\nplt.show()")
    assert (c["x_scale"], c["y_scale"]) == ("linear", "log") and c["title"] is None
    _, c = _chart(sbx, "plt.plot([1, 2, 3], ['lo', 'mid', 'hi'])\nplt.show()")
    assert (c["x_scale"], c["y_scale"]) == ("linear", "categorical")
    assert c["elements"][0]["points"] == [[1.0, "lo"], [2.0, "mid"], [3.0, "hi"]]


@pytest.mark.container
def test_scatter_bar_pie_and_box(sbx: Sandbox) -> None:
    _, c = _chart(
        sbx,
        "plt.scatter([1, 2, 3], [4, 5, 6], label='a')\nplt.scatter([0], [0], label='b')\n"
        "plt.xlabel('X')\nplt.show()",
    )
    assert c["type"] == "scatter" and c["x_label"] == "X" and c["y_label"] is None
    assert [(e["label"], len(e["points"])) for e in c["elements"]] == [("a", 3), ("b", 1)]
    assert c["elements"][0]["points"][1] == [2.0, 5.0]

    _, c = _chart(
        sbx, "plt.bar(['x', 'y'], [3, 7], label='g')\nplt.barh([], [])\nplt.title('B')\nplt.show()"
    )
    assert c["type"] == "bar" and c["title"] == "B"
    assert c["elements"] == [
        {"label": "x", "group": "g", "value": 3.0},
        {"label": "y", "group": "g", "value": 7.0},
    ]
    _, c = _chart(sbx, "plt.barh(['p', 'q'], [2, 5])\nplt.ylabel('Cat')\nplt.show()")
    assert c["x_label"] == "Cat"  # horizontal: x is still the category axis
    assert [(e["label"], e["value"], e["group"]) for e in c["elements"]] == [
        ("p", 2.0, "Group 0"),
        ("q", 5.0, "Group 0"),
    ]

    _, c = _chart(sbx, "plt.pie([3, 1], labels=['big', 'small'])\nplt.title('P')\nplt.show()")
    assert c == {
        "type": "pie",
        "title": "P",
        "elements": [
            {"label": "big", "angle": 270.0, "radius": 1.0},
            {"label": "small", "angle": 90.0, "radius": 1.0},
        ],
    }

    _, c = _chart(
        sbx,
        "fig, ax = plt.subplots()\n"
        "data = [[1, 2, 3, 4, 5], [10, 11, 12, 13, 40]]\n"
        "ax.boxplot(data, labels=['u', 'v'], patch_artist=True)\n"
        "ax.set_ylabel('Score')\nplt.show()",
    )
    assert c["type"] == "box_and_whisker" and c["y_label"] == "Score"
    u, v = c["elements"]
    assert (u["label"], u["min"], u["first_quartile"], u["median"]) == ("u", 1, 2, 3)
    assert (u["third_quartile"], u["max"], u["outliers"]) == (4, 5, [])
    assert (v["label"], v["max"], v["outliers"]) == ("v", 13, [40])


@pytest.mark.container
def test_superchart_and_unknown(sbx: Sandbox) -> None:
    _, c = _chart(
        sbx,
        "fig, axs = plt.subplots(1, 2)\nfig.suptitle('Both')\n"
        "axs[0].plot([1, 2]); axs[0].set_title('L')\n"
        "axs[1].scatter([1], [2]); axs[1].set_xlabel('X')\nplt.show()",
    )
    assert c["type"] == "superchart" and c["title"] == "Both"
    assert [(e["type"], e["title"]) for e in c["elements"]] == [("line", "L"), ("scatter", None)]
    assert c["elements"][1]["x_label"] == "X"

    _, c = _chart(
        sbx,
        "fig, ax = plt.subplots()\nax.add_artist(plt.Circle((0, 0), 1))\nplt.title('C')\n"
        "plt.show()",
    )
    assert c == {"type": "unknown", "title": "C", "elements": []}


@pytest.mark.container
def test_figure_as_the_last_expression_has_its_chart(sbx: Sandbox) -> None:
    ex = sbx.run_code("fig, ax = plt.subplots()\nax.plot([1, 2, 3])\nfig")
    (r,) = ex.results
    assert r.is_main_result and r.png and r.chart and r.chart["type"] == "line"


@pytest.mark.container
def test_a_hostile_figure_is_bounded_and_guarded(sbx: Sandbox) -> None:
    # Over the points cap (5000 a series): no chart, the PNG stays.
    ex = sbx.run_code("import matplotlib.pyplot as plt\nplt.plot(range(6000))\nplt.show()")
    (r,) = ex.results
    assert r.png and r.chart is None and "chart" not in r.formats()
    # A long title is cut; secrets in labels are redacted by the host's guard (invariant 4).
    _, c = _chart(
        sbx,
        f"plt.plot([1, 2], label='key {GH_TOKEN}')\n"
        f"plt.title('T' * 5000, fontsize=1)\nplt.xlabel('x {SECRET}')\nplt.show()",
    )
    assert c["title"] == "T" * 256
    assert GH_TOKEN not in repr(c) and "[REDACTED:github_token]" in c["elements"][0]["label"]
    assert SECRET not in repr(c) and "[REDACTED:" in c["x_label"]
    # Many series: over the cap, no chart, the PNG stays.
    ex = sbx.run_code("for i in range(300):\n    plt.plot([i])\nplt.show()")
    (r,) = ex.results
    assert r.png and r.chart is None


#: A chart forged on the kernel's own channel (what user code that took the agent over does):
#: a secret in a label the agent's extraction never saw, and a malformed one.
_FORGE = """
import sys
k = [m for n, m in sys.modules.items() if n.endswith('agent.kernel')][0]
chart = {{"type": "pie", "title": {title!r}, "elements": {elements}}}
k._send(k.MsgType.RESULT, k._current, data={{"text": "x", "chart": chart}}, is_main=False)
"""


@pytest.mark.container
def test_a_forged_chart_is_guarded_and_a_malformed_one_ends_the_sandbox() -> None:
    require_tier("container")
    with Sandbox.create(isolation="container", timeout=120, sensitive={SECRET: "TOKEN"}) as s:
        wedge = {"label": SECRET, "angle": 90, "radius": 1}
        ex = s.run_code(_FORGE.format(title="ok", elements=[wedge]))
        (r,) = ex.results
        assert r.chart is not None and r.chart["title"] == "ok"  # positive control: it came
        assert SECRET not in repr(r.chart) and "[REDACTED:" in r.chart["elements"][0]["label"]
        bad = [{"label": "x", "angle": 90, "radius": 1, "extra": "field"}]
        with pytest.raises(SandboxDiedError, match="malformed chart"):
            s.run_code(_FORGE.format(title="ok", elements=bad))


@pytest.mark.container
def test_pil_images_shown_saved_or_last(sbx: Sandbox) -> None:
    make = "from PIL import Image\nimg = Image.new('RGBA', (8, 8), (255, 0, 0, 255))\n"
    for tail in ("img.show()\nprint('shown')", "img", "img.save('t.png')\nprint('saved')"):
        ex = sbx.run_code(make + tail)
        assert ex.error is None, ex.error
        pngs = [r for r in ex.results if r.png]
        assert len(pngs) == 1, (tail, ex.results)
        assert base64.b64decode(pngs[0].png or "")[:4] == b"\x89PNG"
    # A save to a buffer (what _repr_png_ does) displays nothing; the file was written.
    ex = sbx.run_code(
        make + "import io\nimg.save(io.BytesIO(), 'PNG')\nimport os\nos.path.getsize('t.png')"
    )
    assert [r.png for r in ex.results if r.png] == [] and int(ex.text or 0) > 0


@pytest.mark.gvisor
def test_chart_on_gvisor() -> None:
    require_tier("gvisor")
    with Sandbox.create(isolation="gvisor", timeout=120) as s:
        _, c = _chart(s, "plt.bar(['a', 'b'], [1, 2])\nplt.xlabel('Name')\nplt.show()")
        assert c["type"] == "bar" and [e["label"] for e in c["elements"]] == ["a", "b"]
