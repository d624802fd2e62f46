"""Frame types and their schemas: the agent's whole API.

Every request from the host carries a positive ``id``. The agent answers it with zero or more
stream frames (``STDOUT``, ``STDERR``, ``RESULT``, ``ERROR``, ``DATA``, ``STARTED``) and exactly
one terminal frame (``DONE`` or ``FAIL``) with the same id. Frames the agent starts on its own
(``READY``, ``LOG``, egress ``OPEN``) use id 0 or negative ids.
"""

from __future__ import annotations

import enum

# The agent starts in every sandbox: typing costs ~8 ms of imports, so it is only
# imported for the type checker (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


PROTOCOL_VERSION = 1
#: Hard ceiling on one encoded frame (header + payload). Chunked data stays well below it.
MAX_FRAME = 1 << 20
#: Raw bytes per DATA / STDOUT chunk the agent sends; leaves room for the JSON header.
CHUNK_SIZE = 64 * 1024


class ProtocolError(Exception):
    """A frame is malformed, too large, of an unknown type or fails its schema."""


class MsgType(enum.StrEnum):
    # host -> agent
    EXEC = "exec"  # run code in a context
    INTERRUPT = "interrupt"  # interrupt request `target`
    CTX_CREATE = "ctx_create"
    CTX_LIST = "ctx_list"
    CTX_RESTART = "ctx_restart"
    CTX_REMOVE = "ctx_remove"
    CMD_START = "cmd_start"
    CMD_STDIN = "cmd_stdin"  # payload = bytes; eof=True closes stdin
    CMD_KILL = "cmd_kill"
    CMD_LIST = "cmd_list"
    CMD_CONNECT = "cmd_connect"  # re-attach to a running command: its output from now on
    CMD_RESIZE = "cmd_resize"  # a PTY's new size (cols, rows)
    FILE_READ = "file_read"
    FILE_WRITE = "file_write"  # opens; then FILE_CHUNK frames with the same id, last has eof
    FILE_CHUNK = "file_chunk"
    FILE_LIST = "file_list"
    FILE_STAT = "file_stat"
    FILE_REMOVE = "file_remove"
    FILE_MKDIR = "file_mkdir"
    FILE_MOVE = "file_move"  # rename or move `path` to `dst`
    PING = "ping"
    RESEED = "reseed"  # after a restore or fork; payload = host entropy (moat.agent.reseed)
    NET_SETUP = "net_setup"  # start the local proxy port; payload = CA bundle (PEM)
    # before a memory checkpoint (gvisor): the agent answers DONE at a frame boundary and
    # writes nothing more until RESUME; the host sends nothing in between (protocol.resume)
    QUIESCE = "quiesce"
    # ends a QUIESCE: without ``nonce`` the same host goes on; with it (a restore, a new
    # host) the agent starts over and announces ``resume.line(nonce)`` + READY; payload =
    # host entropy for the agent's reseed
    RESUME = "resume"
    # connect to 127.0.0.1:<port> inside (ingress, id = a positive stream id the host chose);
    # the agent answers TCP_OPEN with that id, or TCP_CLOSE when nothing listens there
    TCP_DIAL = "tcp_dial"
    WATCH_START = "watch_start"  # watch a directory: WATCHING, FS_EVENTS..., DONE (watch.py)
    WATCH_STOP = "watch_stop"  # stop the watch of request `target`
    WATCH_FLUSH = "watch_flush"  # send what watch `target` has pending, then DONE
    # both ways: proxied TCP streams (id = stream id, negative: opened by the agent)
    TCP_DATA = "tcp_data"
    TCP_EOF = "tcp_eof"  # half-close: no more data this way
    TCP_CLOSE = "tcp_close"  # the stream is over
    TCP_ACK = "tcp_ack"  # n bytes consumed: that much more credit to the sender
    # agent -> host
    TCP_OPEN = "tcp_open"  # a sandbox process connected to the proxy port (or a dial succeeded)
    READY = "ready"
    STARTED = "started"  # a command started: pid
    STDOUT = "stdout"
    STDERR = "stderr"
    PTY = "pty"  # a chunk of a PTY's output (raw bytes, escape sequences and all)
    RESULT = "result"
    ERROR = "error"  # an execution error of user code (not a failed request)
    DATA = "data"  # a chunk of a file being read
    DONE = "done"
    FAIL = "fail"  # the request failed: kind + message
    WATCHING = "watching"  # a watch is in place
    FS_EVENTS = "fs_events"  # events of a watch (checked by moat.protocol.watch)


HOST_TO_AGENT = frozenset(
    {
        MsgType.EXEC,
        MsgType.INTERRUPT,
        MsgType.CTX_CREATE,
        MsgType.CTX_LIST,
        MsgType.CTX_RESTART,
        MsgType.CTX_REMOVE,
        MsgType.CMD_START,
        MsgType.CMD_STDIN,
        MsgType.CMD_KILL,
        MsgType.CMD_LIST,
        MsgType.CMD_CONNECT,
        MsgType.CMD_RESIZE,
        MsgType.FILE_READ,
        MsgType.FILE_WRITE,
        MsgType.FILE_CHUNK,
        MsgType.FILE_LIST,
        MsgType.FILE_STAT,
        MsgType.FILE_REMOVE,
        MsgType.FILE_MKDIR,
        MsgType.FILE_MOVE,
        MsgType.PING,
        MsgType.RESEED,
        MsgType.NET_SETUP,
        MsgType.QUIESCE,
        MsgType.RESUME,
        MsgType.TCP_DIAL,
        MsgType.WATCH_START,
        MsgType.WATCH_STOP,
        MsgType.WATCH_FLUSH,
        MsgType.TCP_DATA,
        MsgType.TCP_EOF,
        MsgType.TCP_CLOSE,
        MsgType.TCP_ACK,
    }
)
_BOTH_WAYS = frozenset({MsgType.TCP_DATA, MsgType.TCP_EOF, MsgType.TCP_CLOSE, MsgType.TCP_ACK})
AGENT_TO_HOST = frozenset((set(MsgType) - HOST_TO_AGENT) | _BOTH_WAYS)
#: Credit window of one proxied stream, each way: the most a side may send unacknowledged.
TCP_WINDOW = 256 * 1024
#: Credit window of an ingress stream's download direction (sandbox app -> host): a wider
#: window keeps a download flowing across the channel's round trip (issue 10's throughput).
#: Host memory per ingress stream stays bounded by it (MAX_INGRESS of them per sandbox).
INGRESS_WINDOW = 1024 * 1024
#: The most of a stream's bytes in one TCP_DATA frame (well under MAX_FRAME): fewer, larger
#: frames cost less per byte on both ends.
TCP_CHUNK = 256 * 1024

#: A PTY's size: columns and rows each in 1..MAX_PTY_SIDE.
MAX_PTY_SIDE = 4096

#: Failure kinds an agent may report in FAIL; anything else is a protocol error.
FAIL_KINDS = frozenset(
    {"not_found", "invalid", "exists", "io", "too_large", "busy", "internal", "no_space",
     "unsupported"}
)  # fmt: skip

_STR = str
_OPT = object()  # marker: optional field


class _F:
    """Field schema: a type, whether required, and a max length for str/list/dict."""

    __slots__ = ("max_len", "required", "type")

    def __init__(
        self, type: type | tuple[type, ...], required: bool = True, max_len: int | None = None
    ) -> None:
        self.type = type
        self.required = required
        self.max_len = max_len


_PATH = _F(str, max_len=4096)
_NAME = _F(str, max_len=256)
_ENVS = _F(dict, required=False, max_len=256)
#: true: the request runs as root inside the sandbox (docs/users.md); absent: as the user
_ROOT = _F(bool, required=False)

SCHEMAS: dict[MsgType, dict[str, _F]] = {
    MsgType.EXEC: {
        "context": _NAME,
        "language": _F(str, max_len=32),
        "code": _F(str, max_len=MAX_FRAME),
        "envs": _ENVS,
    },
    MsgType.INTERRUPT: {"target": _F(int)},
    MsgType.CTX_CREATE: {
        "language": _F(str, max_len=32),
        "cwd": _F(str, required=False, max_len=4096),
    },
    MsgType.CTX_LIST: {},
    MsgType.CTX_RESTART: {"context": _NAME},
    MsgType.CTX_REMOVE: {"context": _NAME},
    MsgType.CMD_START: {
        "cmd": _F(str, max_len=MAX_FRAME),
        "envs": _ENVS,
        "cwd": _F(str, required=False, max_len=4096),
        "stdin": _F(bool, required=False),
        # both or neither: the command runs on a new pseudo-terminal of this size
        "cols": _F(int, required=False),
        "rows": _F(int, required=False),
        "root": _ROOT,
    },
    MsgType.CMD_STDIN: {"pid": _F(int), "eof": _F(bool, required=False)},
    MsgType.CMD_KILL: {"pid": _F(int), "signal": _F(int, required=False)},
    MsgType.CMD_LIST: {},
    MsgType.CMD_CONNECT: {"pid": _F(int)},
    MsgType.CMD_RESIZE: {"pid": _F(int), "cols": _F(int), "rows": _F(int)},
    MsgType.FILE_READ: {"path": _PATH, "max_bytes": _F(int), "root": _ROOT},
    # metadata: the file's whole user metadata set (protocol.metadata checks its contents)
    MsgType.FILE_WRITE: {
        "path": _PATH,
        "max_bytes": _F(int),
        "metadata": _F(dict, required=False, max_len=512),
        "root": _ROOT,
    },
    MsgType.FILE_CHUNK: {"eof": _F(bool, required=False)},
    MsgType.FILE_LIST: {"path": _PATH, "depth": _F(int, required=False), "root": _ROOT},
    MsgType.FILE_STAT: {"path": _PATH, "root": _ROOT},
    MsgType.FILE_REMOVE: {"path": _PATH, "root": _ROOT},
    MsgType.FILE_MKDIR: {"path": _PATH, "root": _ROOT},
    MsgType.FILE_MOVE: {"path": _PATH, "dst": _PATH, "root": _ROOT},
    MsgType.PING: {},
    MsgType.RESEED: {},
    MsgType.NET_SETUP: {"port": _F(int), "ca_path": _PATH},
    MsgType.QUIESCE: {},
    MsgType.RESUME: {"nonce": _F(str, required=False, max_len=64)},
    MsgType.WATCH_START: {"path": _PATH, "recursive": _F(bool, required=False)},
    MsgType.WATCH_STOP: {"target": _F(int)},
    MsgType.WATCH_FLUSH: {"target": _F(int)},
    MsgType.WATCHING: {},
    MsgType.FS_EVENTS: {  # every event and its name: moat.protocol.watch.check_events
        "events": _F(list, required=False, max_len=256),
        "lost": _F(bool, required=False),
    },
    MsgType.TCP_DATA: {},
    MsgType.TCP_EOF: {},
    MsgType.TCP_CLOSE: {},
    MsgType.TCP_ACK: {"n": _F(int)},
    MsgType.TCP_OPEN: {},
    MsgType.TCP_DIAL: {"port": _F(int)},
    MsgType.READY: {"version": _F(int), "pid": _F(int, required=False)},
    MsgType.STARTED: {"pid": _F(int), "pty": _F(bool, required=False)},
    MsgType.STDOUT: {},
    MsgType.STDERR: {},
    MsgType.PTY: {},
    MsgType.RESULT: {"data": _F(dict, max_len=64), "is_main": _F(bool)},
    MsgType.ERROR: {
        "name": _F(str, max_len=256),
        "value": _F(str, max_len=64 * 1024),
        "traceback": _F(str, max_len=256 * 1024),
    },
    MsgType.DATA: {},
    MsgType.DONE: {},  # free-form reply fields are checked by the caller that asked
    MsgType.FAIL: {"kind": _F(str, max_len=32), "message": _F(str, max_len=4096)},
}


class Frame:
    """One protocol message: a type, a request id, JSON fields and an optional raw payload.

    A plain slotted class, not a dataclass: the agent imports this at every sandbox start and
    the dataclasses machinery costs milliseconds there.
    """

    __slots__ = ("fields", "id", "payload", "type")

    def __init__(
        self,
        type: MsgType,
        id: int,
        fields: dict[str, Any] | None = None,
        payload: bytes = b"",
    ) -> None:
        self.type = type
        self.id = id
        self.fields = {} if fields is None else fields
        self.payload = payload

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.type, self.id, self.fields, self.payload) == (
            other.type,
            other.id,
            other.fields,
            other.payload,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable fields: not hashable

    def __repr__(self) -> str:
        return f"Frame({self.type.value}, {self.id}, {self.fields!r}, {len(self.payload)}B)"


def validate(frame: Frame, *, direction: frozenset[MsgType] | None = None) -> Frame:
    """Check a frame against its schema (and optionally the allowed direction); return it."""
    if direction is not None and frame.type not in direction:
        raise ProtocolError(f"frame type {frame.type.value!r} not allowed in this direction")
    if isinstance(frame.id, bool) or not isinstance(frame.id, int) or abs(frame.id) > 2**53:
        raise ProtocolError("bad frame id")
    schema = SCHEMAS[frame.type]
    for name, spec in schema.items():
        if name not in frame.fields:
            if spec.required:
                raise ProtocolError(f"{frame.type.value}: missing field {name!r}")
            continue
        value = frame.fields[name]
        # bool is an int subclass: keep them apart so `true` never passes as a pid.
        if spec.type is int and isinstance(value, bool):
            raise ProtocolError(f"{frame.type.value}: field {name!r} must be int")
        if not isinstance(value, spec.type):
            raise ProtocolError(f"{frame.type.value}: field {name!r} has the wrong type")
        if spec.max_len is not None and len(value) > spec.max_len:  # type: ignore[arg-type]
            raise ProtocolError(f"{frame.type.value}: field {name!r} too long")
    if frame.type is MsgType.FAIL and frame.fields["kind"] not in FAIL_KINDS:
        raise ProtocolError("fail: unknown kind")
    if frame.type in (MsgType.CMD_START, MsgType.CMD_RESIZE):
        _check_size(frame)
    envs = frame.fields.get("envs")
    if envs is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in envs.items()
    ):
        raise ProtocolError(f"{frame.type.value}: envs must map str to str")
    return frame


def _check_size(frame: Frame) -> None:
    """A PTY size: cols and rows together, each 1..MAX_PTY_SIDE."""
    cols, rows = frame.fields.get("cols"), frame.fields.get("rows")
    if (cols is None) != (rows is None):
        raise ProtocolError(f"{frame.type.value}: cols and rows go together")
    if (
        cols is not None
        and rows is not None
        and not (0 < cols <= MAX_PTY_SIDE and 0 < rows <= MAX_PTY_SIDE)
    ):
        raise ProtocolError(f"{frame.type.value}: PTY size out of range")
