"""The MCP tools' arguments: one strict pydantic model per tool, its JSON schema for
``tools/list``, and validation errors as short sentences a model can act on.

Trust domain: a face. Arguments come from a model (untrusted input): validated here, again by
the front door, and never echoed back whole (a huge or hostile value stays out of the error).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moat.errors import InvalidArgumentError

__all__ = ["NAME_PATTERN", "TOOL_ARGS", "parse_args", "schema_of"]

#: Names a caller gives a sandbox that outlives its MCP session.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: Largest code, command or file content accepted in one call (the HTTP body cap is 4 MiB).
MAX_TEXT = 2 << 20

_SANDBOX_REF = (
    "The sandbox to use: the name given to create_sandbox, or the sandbox id it returned."
)
_FRESH = (
    "Optional. The name or id of a sandbox from create_sandbox, to keep state (variables, "
    "files, installed packages) across calls. Omit it to run in a fresh sandbox that is "
    "thrown away when the call returns."
)

SandboxRef = Annotated[str, Field(min_length=1, max_length=64, description=_SANDBOX_REF)]
Path = Annotated[
    str,
    Field(
        min_length=1,
        max_length=4096,
        description="A path inside the sandbox; relative paths start in the user's home "
        "directory (/home/user).",
    ),
]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RunCode(_Args):
    code: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_TEXT,
            description="The code to run. Python runs like a Jupyter cell: the value of the "
            "last expression is returned as the result, and matplotlib figures (plt.show() "
            "or a figure as the last expression) come back as PNG images. Bash runs as a "
            "script.",
        ),
    ]
    language: Annotated[
        Literal["python", "bash"],
        Field(description="The language of `code`."),
    ] = "python"
    sandbox: Annotated[str | None, Field(min_length=1, max_length=64, description=_FRESH)] = None
    timeout: Annotated[
        float,
        Field(gt=0, le=3600, description="Seconds the code may run before it is stopped."),
    ] = 60


class RunCommand(_Args):
    command: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_TEXT,
            description="A shell command line, run by bash (pipes, &&, redirections work), "
            "e.g. `pip install requests && python -V`.",
        ),
    ]
    sandbox: Annotated[str | None, Field(min_length=1, max_length=64, description=_FRESH)] = None
    cwd: Annotated[
        str | None,
        Field(min_length=1, max_length=4096, description="Working directory (default: home)."),
    ] = None
    timeout: Annotated[
        float,
        Field(gt=0, le=3600, description="Seconds the command may run before it is killed."),
    ] = 60


class ReadFile(_Args):
    sandbox: SandboxRef
    path: Path


class WriteFile(_Args):
    sandbox: SandboxRef
    path: Path
    content: Annotated[
        str,
        Field(
            max_length=MAX_TEXT * 2,
            description="The file's new content (the file is created or replaced; parent "
            "directories are made).",
        ),
    ]
    encoding: Annotated[
        Literal["utf-8", "base64"],
        Field(description="`utf-8` for text; `base64` when `content` encodes binary data."),
    ] = "utf-8"


class ListFiles(_Args):
    sandbox: SandboxRef
    path: Annotated[
        str,
        Field(min_length=1, max_length=4096, description="The directory to list."),
    ] = "/home/user"
    depth: Annotated[
        int,
        Field(ge=1, le=5, description="How many levels down to list (1: its entries only)."),
    ] = 1


class CreateSandbox(_Args):
    name: Annotated[
        str | None,
        Field(
            pattern=NAME_PATTERN,
            description="Optional. A name makes the sandbox outlive this MCP session (until "
            "its timeout or kill_sandbox) and lets later sessions find it by name. Without "
            "one, the sandbox is killed when this MCP session ends.",
        ),
    ] = None
    timeout: Annotated[
        float | None,
        Field(
            ge=10,
            le=3600,
            description="Seconds the sandbox lives before it is killed (default: the "
            "server's setting, usually 300).",
        ),
    ] = None


class KillSandbox(_Args):
    sandbox: SandboxRef


class ListSandboxes(_Args):
    pass


TOOL_ARGS: dict[str, type[_Args]] = {
    "run_code": RunCode,
    "run_command": RunCommand,
    "read_file": ReadFile,
    "write_file": WriteFile,
    "list_files": ListFiles,
    "create_sandbox": CreateSandbox,
    "kill_sandbox": KillSandbox,
    "list_sandboxes": ListSandboxes,
}


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema, plain for a model to read: no generated titles, and an
    optional argument is its own type (not ``anyOf`` with null, no ``default: null``)."""
    schema: dict[str, Any] = _untitle(model.model_json_schema())
    for name, prop in list(schema.get("properties", {}).items()):
        options = prop.get("anyOf")
        if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
            (kept,) = [o for o in options if o != {"type": "null"}]
            rest = {k: v for k, v in prop.items() if k != "anyOf"}
            if rest.get("default", 0) is None:
                del rest["default"]
            schema["properties"][name] = {**kept, **rest}
    schema["additionalProperties"] = False
    return schema


def _untitle(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: _untitle(v) for k, v in node.items() if not (k == "title" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [_untitle(v) for v in node]
    return node


def parse_args(tool: str, arguments: Any) -> Any:
    """The tool's arguments as its model; InvalidArgumentError naming each bad field."""
    model = TOOL_ARGS[tool]
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise InvalidArgumentError("arguments must be a JSON object")
    try:
        return model.model_validate(arguments)
    except ValidationError as exc:
        raise InvalidArgumentError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    """One line per problem: the field and what is wrong (never the value given)."""
    lines = []
    for err in exc.errors(include_input=False, include_url=False)[:8]:
        field = ".".join(str(p) for p in err["loc"]) or "arguments"
        kind = err["type"]
        if kind == "missing":
            lines.append(f"{field}: required")
        elif kind == "extra_forbidden":
            lines.append(f"{field}: not an argument of this tool")
        else:
            lines.append(f"{field}: {err['msg']}")
    return "invalid arguments: " + "; ".join(lines)
