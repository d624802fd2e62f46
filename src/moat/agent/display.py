"""Rich display of Python values, the way Jupyter does it: repr plus ``_repr_*_`` formats."""

from __future__ import annotations

import binascii  # not base64: it imports re, ~6 ms of every sandbox's start
import io
import sys

from moat.protocol import jsonfast

# The agent starts in every sandbox: typing costs ~8 ms of imports, so it is only
# imported for the type checker (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


# (method, key, is_binary)
_REPR_METHODS = (
    ("_repr_html_", "html", False),
    ("_repr_markdown_", "markdown", False),
    ("_repr_svg_", "svg", False),
    ("_repr_png_", "png", True),
    ("_repr_jpeg_", "jpeg", True),
    ("_repr_latex_", "latex", False),
    ("_repr_json_", "json", False),
    ("_repr_javascript_", "javascript", False),
)
#: A single result larger than this (encoded) is cut down to its text form.
MAX_RESULT = 768 * 1024


def figure_png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return binascii.b2a_base64(buf.getvalue(), newline=False).decode("ascii")


def is_figure(value: Any) -> bool:
    mpl = sys.modules.get("matplotlib.figure")
    return mpl is not None and isinstance(value, mpl.Figure)


def format_value(value: Any) -> dict[str, Any]:
    """Every representation of ``value`` we can produce, keyed by E2B's format names."""
    data: dict[str, Any] = {}
    chart = None
    if is_figure(value):
        data["png"] = figure_png(value)  # draws the figure: tick labels are set from here on
        from moat.agent import charts  # lazily: only figures need it

        chart = charts.chart_of(value)
    for method, key, binary in _REPR_METHODS:
        fn = getattr(value, method, None)
        if fn is None or not callable(fn) or isinstance(value, type):
            continue
        try:
            out = fn()
        except Exception:  # noqa: BLE001, S112 - a broken _repr_ must not break the execution
            continue
        if isinstance(out, tuple):  # (data, metadata)
            out = out[0]
        if out is None:
            continue
        if binary:
            if isinstance(out, bytes):
                out = binascii.b2a_base64(out, newline=False).decode("ascii")
            elif not isinstance(out, str):
                continue
        elif key == "json":
            try:
                jsonfast.dumps(out, compact=False, ensure_ascii=True)
            except (TypeError, ValueError):
                continue
        elif not isinstance(out, str):
            continue
        data[key] = out
    frame = frame_data(value)
    if frame is not None:
        data["data"] = frame
    try:
        data["text"] = e2b_text(repr(value))
    except Exception as exc:  # noqa: BLE001 - user __repr__ may raise anything
        data["text"] = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    data = _fit(data)
    if chart is not None and "png" in data:
        # Only beside its PNG, and only where it fits: a chart never costs the figure its image.
        with_chart = {**data, "chart": chart}
        if len(jsonfast.dumps(with_chart, compact=False)) <= MAX_RESULT:
            data = with_chart
    return data


#: MIME types of a raw display bundle (``display(bundle, raw=True)``) -> E2B's format names.
_MIME_KEYS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
}
_BINARY_KEYS = ("png", "jpeg", "pdf")


def format_bundle(bundle: dict[Any, Any]) -> dict[str, Any]:
    """A raw MIME bundle as E2B's formats (IPython's ``display(..., raw=True)``): the types
    E2B knows, each as the text (binary ones base64) or JSON it must be; others left out."""
    data: dict[str, Any] = {}
    for mime, value in bundle.items():
        key = _MIME_KEYS.get(mime) if isinstance(mime, str) else None
        if key is None:
            continue
        if key in _BINARY_KEYS and isinstance(value, bytes):
            data[key] = binascii.b2a_base64(value, newline=False).decode("ascii")
        elif key == "json":
            try:
                jsonfast.dumps(value, compact=False, ensure_ascii=True)
            except (TypeError, ValueError):
                continue
            data[key] = value
        elif isinstance(value, str):
            data[key] = e2b_text(value) if key == "text" else value
    return _fit(data) if data else data


#: A frame with more cells than this has no ``data`` (its JSON would crowd out the others).
MAX_FRAME_CELLS = 50_000


def frame_data(value: Any) -> dict[str, Any] | None:
    """A pandas DataFrame's columns as lists (E2B's ``data`` format: ``to_dict("list")``,
    timestamps as ISO strings); None for anything else, a frame JSON can't hold, or one too
    large: a result over :data:`MAX_RESULT` keeps only its text, so ``data`` takes at most
    half of it and a big frame keeps its (truncated) HTML instead."""
    pandas = sys.modules.get("pandas")  # a frame exists only if user code imported pandas
    if pandas is None or not isinstance(value, pandas.DataFrame):
        return None
    try:
        if value.size > MAX_FRAME_CELLS:
            return None
        columns = value.to_dict(orient="list")
        out = {
            str(k): [v.isoformat() if isinstance(v, pandas.Timestamp) else v for v in col]
            for k, col in columns.items()
        }
        if len(jsonfast.dumps(out, compact=False, ensure_ascii=True)) > MAX_RESULT // 2:
            return None
    except Exception:  # noqa: BLE001 - a frame of odd values keeps its other formats
        return None
    return out


def e2b_text(text: str) -> str:
    """A result's text as E2B's code interpreter gives it: a repr in single quotes (a str)
    without them (``'a'`` -> ``a``), so code written against E2B reads the same value."""
    if len(text) >= 2 and text.startswith("'") and text.endswith("'"):
        return text[1:-1]
    return text


def _fit(data: dict[str, Any]) -> dict[str, Any]:
    size = len(jsonfast.dumps(data, compact=False))
    if size <= MAX_RESULT:
        return data
    text = str(data.get("text", ""))[: MAX_RESULT // 2]
    return {"text": text + "\n[moat: result too large, other formats dropped]"}
