"""A code context: a process that runs user code in one persistent namespace.

The agent talks to it over a control pipe (frames); its fds 1 and 2 are pipes the agent
streams to the host. It runs in its own session so an interrupt or kill reaches everything
user code started.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import types

from moat.agent import display, imagehooks
from moat.protocol import Decoder, Frame, MsgType, encode

# The agent starts in every sandbox: typing costs ~8 ms of imports, so it is only
# imported for the type checker (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ast
    from typing import Any

_CELL = "<cell>"
_out_fd = -1
_current = 0
#: figures already emitted as the main result of the current cell
_skip_figs: set[int] = set()
#: True only while a cell's user code runs: the one time SIGINT may interrupt (_on_sigint)
_in_user_code = False


def _on_sigint(signum: int, frame: object) -> None:
    """SIGINT interrupts user code only.

    One arriving between cells (the agent sent it just before the cell's code reached us) or
    while the kernel reports (a KeyboardInterrupt in the middle of writing a frame breaks the
    control pipe, and the context with it) is dropped: the agent repeats its SIGINT for as
    long as the interrupted cell runs (contexts.Contexts.interrupt), so none is lost.
    """
    if _in_user_code:
        raise KeyboardInterrupt


def _on_reseed(signum: int, frame: object) -> None:
    """The agent reseeded the pool after a restore or fork (moat.agent.reseed): so do we."""
    rnd = sys.modules.get("random")
    if rnd is not None:
        rnd.seed()


def _send(mtype: MsgType, rid: int, **fields: Any) -> None:
    data = encode(Frame(mtype, rid, fields))
    view = memoryview(data)
    while view:
        view = view[os.write(_out_fd, view) :]


def emit_display(value: Any) -> None:
    """Send ``value`` as a display result of the current cell (IPython's ``display``)."""
    _send(MsgType.RESULT, _current, data=display.format_value(value), is_main=False)


def user_display(*objs: Any, raw: bool = False, **kwargs: Any) -> None:
    """IPython's ``display``, in every cell's namespace (and in place of IPython's own, which
    only prints without an IPython shell): each value as a display result of the current
    cell; with ``raw=True`` each dict is a MIME bundle sent as given. IPython's other options
    (``include``, ``display_id``...) are accepted and ignored."""
    del kwargs
    for obj in objs:
        if raw and isinstance(obj, dict):
            data = display.format_bundle(obj)
            if data:
                _send(MsgType.RESULT, _current, data=data, is_main=False)
        else:
            emit_display(obj)


def emit_open_figures() -> None:
    """Send every open pyplot figure as a PNG result and close it (plt.show / end of cell)."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    for num in list(plt.get_fignums()):
        fig = plt.figure(num)
        if id(fig) not in _skip_figs:
            _send(MsgType.RESULT, _current, data=display.format_value(fig), is_main=False)
        plt.close(fig)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - user code may have replaced or closed the stream
            pass


_SHELL_LINE = r"^([ \t]*)!(.*\S.*)$"
_SHELL_NAME = "__moat_shell__"


def _shell(cmd: str) -> None:
    """IPython's ``!cmd`` line (E2B's code interpreter is IPython): ``cmd`` in a shell, as
    this kernel's user under its limits, its output in the cell's, in order."""
    import subprocess  # lazily: few cells use it

    _flush()
    subprocess.run(cmd, shell=True, check=False)  # noqa: S602 - the user's own command


def _leading_indent(code: str) -> str:
    """IPython's ``leading_indent``: a cell whose first line with code is indented loses that
    indent on every line that has it (an indented cell is never valid Python as written, so
    nothing valid changes; blank lines stay, so line numbers do too)."""
    lines = code.split("\n")
    first = next((line for line in lines if line.strip()), "")
    indent = first[: len(first) - len(first.lstrip(" \t"))]
    if not indent:
        return code
    return "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in lines)


def _parse(code: str) -> ast.Module:
    """The cell's tree. Only code that is not Python as written gets IPython's ``!cmd``
    lines turned into shell calls: valid Python is never rewritten, and a cell still wrong
    after that reports its own SyntaxError."""
    import ast  # lazily: ~4 ms of every sandbox's start, for sandboxes that may run no cell

    code = _leading_indent(code)
    try:
        return ast.parse(code, _CELL, "exec")
    except SyntaxError as exc:
        import re  # lazily: kernels start without it

        lines = code.split("\n")
        shelled = [
            f"{m[1]}{_SHELL_NAME}({m[2]!r})" if (m := re.match(_SHELL_LINE, line)) else line
            for line in lines
        ]
        if shelled == lines:
            raise
        try:
            return ast.parse("\n".join(shelled), _CELL, "exec")
        except SyntaxError:
            raise exc from None


def _run(code: str, ns: dict[str, Any]) -> tuple[bool, Any]:
    """Execute ``code``; return (has_value, value of a trailing expression)."""
    import ast  # lazily (see _parse)

    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    tree = _parse(code)
    ns.setdefault(_SHELL_NAME, _shell)
    last: ast.Expression | None = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        tail = tree.body.pop()
        assert isinstance(tail, ast.Expr)
        last = ast.Expression(tail.value)
    body = compile(tree, _CELL, "exec", flags=flags)
    if body.co_flags & 0x80:  # CO_COROUTINE: top-level await
        import asyncio  # lazily: it costs ~17 ms of start-up that most cells never need

        asyncio.run(types.FunctionType(body, ns)())
    else:
        exec(body, ns)  # noqa: S102 - running the user's code is the job
    if last is None:
        return False, None
    expr = compile(last, _CELL, "eval", flags=flags)
    value = eval(expr, ns)  # noqa: S307
    if expr.co_flags & 0x80:
        import asyncio

        value = asyncio.run(_await(value))
    return True, value


async def _await(aw: Any) -> Any:
    return await aw


def _format_error(exc: BaseException) -> tuple[str, str, str]:
    import traceback

    tb = exc.__traceback__
    # Drop the kernel's own frames: the traceback starts in the user's cell.
    while tb is not None and tb.tb_frame.f_code.co_filename != _CELL:
        tb = tb.tb_next
    if isinstance(exc, SyntaxError):
        tb = None
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return type(exc).__name__, str(exc), text


def _execute(rid: int, code: str, envs: dict[str, str], ns: dict[str, Any]) -> None:
    global _current, _in_user_code
    _current = rid
    _skip_figs.clear()
    saved = {k: os.environ.get(k) for k in envs}
    os.environ.update(envs)
    try:
        _in_user_code = True  # until the cell's value and figures are out: reprs are user code
        has_value, value = _run(code, ns)
        _flush()
        if has_value and value is not None:
            if display.is_figure(value):
                _skip_figs.add(id(value))
            ns["_"] = value
            _send(MsgType.RESULT, rid, data=display.format_value(value), is_main=True)
        emit_open_figures()
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything, incl. SystemExit
        _in_user_code = False
        _flush()
        name, value_s, text = _format_error(exc)
        _send(MsgType.ERROR, rid, name=name, value=value_s[:60000], traceback=text[-250000:])
    finally:
        _in_user_code = False
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _flush()
    _send(MsgType.DONE, rid)


def serve(ctl_in: int, ctl_out: int) -> None:
    """Kernel main loop: one EXEC at a time from the agent, until the pipe closes."""
    global _out_fd
    _out_fd = ctl_out
    # The agent starts without `site` (-S, ~8 ms saved on every sandbox start); user code
    # expects the system's site-packages, so the kernel sets them up here, off the agent's
    # critical path.
    if "site" not in sys.modules:
        import site

        site.main()
    os.set_inheritable(ctl_in, False)
    os.set_inheritable(ctl_out, False)
    signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGUSR2, _on_reseed)
    # Blocked by the agent since the fork or spawn (contexts._hold_reseed): a reseed that came
    # while this kernel started is delivered now, to the handler.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
    os.environ["MPLBACKEND"] = "module://moat.agent.mplbackend"
    imagehooks.PILHook().install()
    # Write-through text streams: output reaches the host as it is printed, not at the end.
    sys.stdout = io.TextIOWrapper(
        os.fdopen(1, "wb", buffering=0, closefd=False),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
    sys.stderr = io.TextIOWrapper(
        os.fdopen(2, "wb", buffering=0, closefd=False),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
    sys.stdin = open(os.devnull)
    # IPython's user namespace has display(): code written for Jupyter or E2B calls it bare
    ns: dict[str, Any] = {
        "__name__": "__main__",
        "__builtins__": __builtins__,
        "display": user_display,
    }
    decoder = Decoder()
    while True:
        try:
            data = os.read(ctl_in, 1 << 16)
        except KeyboardInterrupt:
            continue  # an interrupt that arrived between cells
        if not data:
            os._exit(0)
        for frame in decoder.feed(data):
            if frame.type is MsgType.EXEC:
                try:
                    _execute(frame.id, frame.fields["code"], frame.fields.get("envs") or {}, ns)
                except KeyboardInterrupt:
                    _send(MsgType.DONE, frame.id)  # interrupted while reporting


def main() -> None:
    """Entry point of a kernel started by exec: control fds on argv."""
    serve(int(sys.argv[1]), int(sys.argv[2]))
