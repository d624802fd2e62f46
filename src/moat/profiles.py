"""Named sandbox profiles read from a TOML policy file (issue 4, "Tier selection").

Trust domain: caller. The policy file is written by whoever runs moat (trusted), yet it is
validated at this boundary like any other input: a typo must fail loudly, never open the
network or pick a weaker tier (DESIGN invariant 7). Pure apart from reading the one file.

::

    profiles = load_profiles("moat.toml")        # or $MOAT_POLICY_FILE; {} when neither
    p = resolve_profile("pip-install")           # NotFoundError when there is no such profile
    Sandbox.create(**p.create_kwargs())          # the profile's trust/isolation/limits/...

The file format (see docs/profiles.md)::

    version = 1                                  # optional; only 1 exists
    [profiles.pip-install]
    description = "pip install from PyPI"
    trust = "untrusted"                          # trusted | semi-trusted | untrusted
    isolation = "microvm"                        # container | gvisor | microvm (overrides trust)
    timeout = 600                                # seconds, 1 to 86400
    limits = { cpus = 1, memory_mb = 1024 }      # moat.Limits fields; the rest keep defaults
    network.allow_out = ["pypi.org", "files.pythonhosted.org"]
    guard = { mode = "redact" }                  # mode, allow, detectors (moat.guard.GuardPolicy)
    [profiles.pip-install.envs]
    PIP_NO_INPUT = "1"

Every error is a :class:`~moat.errors.PolicyError` whose message names the file (its base
name only: invariant 8), the line and the dotted field::

    moat.toml:12: profiles.pip-install.limits.memory_mb: must be between 32 and 1048576

``tomllib`` reports no positions for values, so once it has parsed a file, :class:`_LineIndex`
walks the same (now known valid) source with a small TOML lexer and records the line on which
each key path is defined: table headers (``[profiles.x.limits]``), dotted keys
(``limits.cpus = 1``), keys inside inline tables (``limits = { cpus = 1 }``) and array
items (``allow_out[2]``). A field without an entry of its own takes the line of its nearest
recorded ancestor, so every error still points at the table it belongs to.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from moat.errors import InvalidArgumentError, NotFoundError, PolicyError
from moat.model.config import Limits
from moat.model.tiers import GUARD_MODES, TIERS, TRUST_TO_TIER
from moat.model.validate import check_env

__all__ = [
    "DEFAULT_PROFILE",
    "ENV_VAR",
    "Profile",
    "load_profiles",
    "parse_profiles",
    "policy_path",
    "resolve_profile",
]

log = logging.getLogger("moat.profiles")

#: Environment variable naming the policy file when no path is passed.
ENV_VAR = "MOAT_POLICY_FILE"
#: Name of the profile meant for callers that ask for none (applying it is the SDK's choice).
DEFAULT_PROFILE = "default"
#: Bounds on what a policy file may hold (a policy is small; anything larger is a mistake).
MAX_FILE_BYTES = 1 << 20
MAX_PROFILES = 256
MAX_ENVS = 256
MAX_DESCRIPTION = 1024


_PROFILE_KEYS = (
    "description",
    "trust",
    "isolation",
    "limits",
    "network",
    "guard",
    "timeout",
    "envs",
)
_LIMIT_KEYS = tuple(f.name for f in dataclasses.fields(Limits))
_NETWORK_KEYS = ("allow_out", "deny_out", "internet_access", "allow_tcp")
_GUARD_KEYS = ("mode", "allow", "detectors")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_BARE = re.compile(r"[A-Za-z0-9_-]+")

_Path = tuple[str | int, ...]


# --------------------------------------------------------------------------- the profile


@dataclass(frozen=True)
class Profile:
    """One named, validated profile. ``None`` means "not set: the SDK's default applies".

    ``network`` is the canonical dict of :meth:`moat.egress.NetworkPolicy.to_dict`;
    ``guard`` holds the given subset of ``mode``/``allow``/``detectors`` (the keyword
    arguments of :class:`moat.guard.GuardPolicy`). Build one from a file with
    :func:`load_profiles`, or from a plain mapping with :meth:`from_mapping`.
    """

    name: str
    description: str | None = None
    trust: str | None = None
    isolation: str | None = None
    limits: Limits | None = None
    network: dict[str, Any] | None = None
    guard: dict[str, Any] | None = None
    timeout: float | None = None
    envs: dict[str, str] | None = None

    @property
    def tier(self) -> str:
        """The tier this profile asks for: ``isolation``, else the tier of ``trust``
        (``"untrusted"`` -> microvm when neither is set). The engine raises
        IsolationUnavailableError if the host can't run it; moat never downgrades."""
        if self.isolation is not None:
            return self.isolation
        return TRUST_TO_TIER[self.trust or "untrusted"]

    def create_kwargs(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``Sandbox.create`` keyword arguments this profile implies, fresh copies.

        Only fields the profile sets appear (keys: ``trust``, ``isolation``, ``limits``,
        ``network``, ``guard``, ``timeout``, ``envs``). ``overrides`` holds the arguments
        the caller gave explicitly (``None`` values count as not given) and wins:

        - each value replaces the profile's whole value (``limits={...}`` replaces the
          profile's limits; it is not merged key by key);
        - trust and isolation are one decision: if the caller gives either, the profile's
          trust *and* isolation are dropped, so a caller's ``trust="untrusted"`` can never
          be undercut by a profile's ``isolation="container"``.
        """
        out: dict[str, Any] = {}
        for key in ("trust", "isolation", "limits", "timeout"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        for key in ("network", "guard", "envs"):
            value = getattr(self, key)
            if value is not None:
                out[key] = _copy(value)
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        if "trust" in given or "isolation" in given:
            out.pop("trust", None)
            out.pop("isolation", None)
        out.update(given)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The profile as a TOML-shaped table (round-trips through :meth:`from_mapping`)."""
        out: dict[str, Any] = {}
        for key in _PROFILE_KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            out[key] = dataclasses.asdict(value) if isinstance(value, Limits) else _copy(value)
        return out

    @classmethod
    def from_mapping(cls, name: str, data: Mapping[str, Any]) -> Profile:
        """Validate one profile given as a plain mapping (the body of ``[profiles.NAME]``).

        Errors are PolicyError naming the dotted field (no file, so no line).
        """
        ctx = _Context(None, None)
        return _build_profile(ctx, ("profiles", name), name, data)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


# ------------------------------------------------------------------------ loading a file


def policy_path(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The policy file to use: ``path``, else ``$MOAT_POLICY_FILE`` (empty = unset), else None."""
    if path is None:
        env = os.environ.get(ENV_VAR, "")
        return Path(env) if env else None
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise InvalidArgumentError("the policy file path must be a non-empty str or path")
    return Path(path)


def load_profiles(path: str | os.PathLike[str] | None = None) -> dict[str, Profile]:
    """All profiles of the policy file (see :func:`policy_path`); ``{}`` when there is none.

    A file that is named but missing, unreadable, too large or invalid raises PolicyError:
    a configured policy that can't be read must not silently become "no policy".
    """
    p = policy_path(path)
    if p is None:
        return {}
    return parse_profiles(_read(p), p.name)


def resolve_profile(name: str, path: str | os.PathLike[str] | None = None) -> Profile:
    """The profile called ``name`` in the policy file.

    NotFoundError when no policy file is configured or it has no such profile; PolicyError
    when the file is invalid (the whole file is validated, not just this profile).
    """
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError("profile must be a non-empty str")
    shown = json.dumps(name[:64])
    p = policy_path(path)
    if p is None:
        raise NotFoundError(
            f"profile {shown} was asked for but no policy file is configured "
            f"(pass one or set {ENV_VAR})"
        )
    profiles = parse_profiles(_read(p), p.name)
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise NotFoundError(f"no profile {shown} in {_display(p.name)} (profiles: {known})")
    return profiles[name]


def parse_profiles(text: str, filename: str = "policy") -> dict[str, Profile]:
    """Parse and validate the TOML text of a policy file; ``filename`` only labels errors."""
    if not isinstance(text, str):
        raise InvalidArgumentError("policy text must be a str")
    shown = _display(filename)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(shown, text, str(exc)) from None
    ctx = _Context(shown, _LineIndex(text))
    return _build_document(ctx, doc)


def _display(filename: str) -> str:
    # Base name only (invariant 8), and nothing that could forge extra lines in a message.
    base = os.path.basename(filename) or "policy"
    return base if re.fullmatch(r"[\w.+-]{1,64}", base) else "policy"


def _read(path: Path) -> str:
    shown = _display(path.name)
    try:
        # O_NONBLOCK: a FIFO named as the policy file must not hang us at open().
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise PolicyError(f"policy file {shown} does not exist") from None
    except PermissionError:
        raise PolicyError(f"policy file {shown} is not readable") from None
    except OSError:
        raise PolicyError(f"policy file {shown} cannot be opened") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PolicyError(f"policy file {shown} is not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise PolicyError(f"policy file {shown} is larger than {MAX_FILE_BYTES} bytes")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        raise PolicyError(f"policy file {shown} cannot be read") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_FILE_BYTES:  # it grew after fstat
        raise PolicyError(f"policy file {shown} is larger than {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyError(f"{shown}:{line}: invalid TOML: not valid UTF-8") from None


_TOML_POS = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")


def _syntax_error(shown: str, text: str, message: str) -> PolicyError:
    # tomllib (3.11) puts the position only in the message: "... (at line 3, column 9)".
    m = _TOML_POS.search(message)
    if m is None:
        return PolicyError(f"{shown}: invalid TOML: {message}")
    what = message[: m.start()]
    if m.group(1) is None:
        line = text.count("\n") + (0 if text.endswith("\n") else 1)
        return PolicyError(f"{shown}:{max(line, 1)}: invalid TOML: {what} (at end of file)")
    return PolicyError(f"{shown}:{m.group(1)}: invalid TOML: {what} (column {m.group(2)})")


# -------------------------------------------------------------------------- validation


class _Context:
    """Where errors point: the file's shown name and the line index (both None for mappings)."""

    def __init__(self, filename: str | None, index: _LineIndex | None) -> None:
        self.filename = filename
        self.index = index

    def fail(self, path: _Path, message: str) -> NoReturn:
        where = ""
        if self.filename is not None:
            line = self.index.line_for(path) if self.index is not None else None
            where = f"{self.filename}:{line}: " if line is not None else f"{self.filename}: "
        raise PolicyError(f"{where}{_dotted(path)}: {message}")


def _dotted(path: _Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        # Keys are echoed (they are names, not values), quoted when not bare, and bounded.
        text = part if _BARE.fullmatch(part) and len(part) <= 64 else json.dumps(part[:64])
        out += f".{text}" if out else text
    return out


_TOML_TYPES = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (list, "array"),
    (dict, "table"),
)


def _type_name(value: object) -> str:
    for cls, name in _TOML_TYPES:
        if isinstance(value, cls):
            return name
    return "date/time"


def _table(ctx: _Context, path: _Path, value: object, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        ctx.fail(path, f"must be a table, not {_type_name(value)}")
    for key in value:
        if key not in keys:
            ctx.fail((*path, str(key)), f"unknown key (expected one of: {', '.join(keys)})")
    return dict(value)


def _string(ctx: _Context, path: _Path, value: object) -> str:
    if not isinstance(value, str):
        ctx.fail(path, f"must be a string, not {_type_name(value)}")
    return value


def _choice(ctx: _Context, path: _Path, value: object, allowed: tuple[str, ...]) -> str:
    text = _string(ctx, path, value)
    if text not in allowed:
        ctx.fail(path, "must be one of " + ", ".join(json.dumps(a) for a in allowed))
    return text


def _strings(ctx: _Context, path: _Path, value: object) -> list[str]:
    if not isinstance(value, list):
        ctx.fail(path, f"must be an array of strings, not {_type_name(value)}")
    return [_string(ctx, (*path, i), item) for i, item in enumerate(value)]


def _build_document(ctx: _Context, doc: dict[str, Any]) -> dict[str, Profile]:
    root = _table(ctx, (), doc, ("version", "profiles"))
    if "version" in root:
        version = root["version"]
        if type(version) is not int or version != 1:
            ctx.fail(("version",), "must be 1 (the only version of this format)")
    raw = root.get("profiles", {})
    if not isinstance(raw, Mapping):
        ctx.fail(("profiles",), f"must be a table of profiles, not {_type_name(raw)}")
    profiles = dict(raw)
    if len(profiles) > MAX_PROFILES:
        ctx.fail(("profiles",), f"at most {MAX_PROFILES} profiles are allowed")
    out: dict[str, Profile] = {}
    for name, body in profiles.items():
        out[name] = _build_profile(ctx, ("profiles", name), name, body)
    return out


def _build_profile(ctx: _Context, path: _Path, name: object, body: object) -> Profile:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        ctx.fail(
            path,
            "profile names are 1 to 64 characters of a-z, 0-9, '-' and '_', "
            "starting with a letter or digit",
        )
    table = _table(ctx, path, body, _PROFILE_KEYS)
    fields: dict[str, Any] = {}
    if "description" in table:
        text = _string(ctx, (*path, "description"), table["description"])
        if len(text) > MAX_DESCRIPTION or "\0" in text:
            ctx.fail((*path, "description"), f"must be at most {MAX_DESCRIPTION} characters")
        fields["description"] = text
    if "trust" in table:
        fields["trust"] = _choice(ctx, (*path, "trust"), table["trust"], tuple(TRUST_TO_TIER))
    if "isolation" in table:
        fields["isolation"] = _choice(ctx, (*path, "isolation"), table["isolation"], TIERS)
    if "timeout" in table:
        fields["timeout"] = _timeout(ctx, (*path, "timeout"), table["timeout"])
    if "limits" in table:
        fields["limits"] = _limits(ctx, (*path, "limits"), table["limits"])
    if "network" in table:
        fields["network"] = _network(ctx, (*path, "network"), table["network"])
    if "guard" in table:
        fields["guard"] = _guard(ctx, (*path, "guard"), table["guard"])
        if fields["guard"].get("mode") == "off":
            # A loud weakening (DESIGN §5): the reply channel is unguarded for this profile.
            log.warning("profile %s turns the guard off (invariant 4 relaxed)", name)
    if "envs" in table:
        fields["envs"] = _envs(ctx, (*path, "envs"), table["envs"])
    return Profile(name=name, **fields)


def _timeout(ctx: _Context, path: _Path, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ctx.fail(path, f"must be a number of seconds, not {_type_name(value)}")
    if math.isnan(value) or not 1 <= value <= 86400:
        ctx.fail(path, "must be between 1 and 86400 seconds")
    return float(value)


def _limits(ctx: _Context, path: _Path, value: object) -> Limits:
    table = _table(ctx, path, value, _LIMIT_KEYS)
    for key, item in table.items():
        # One field at a time (the others at their defaults) so the error names its field.
        try:
            Limits(**{key: item})
        except InvalidArgumentError as exc:
            message = str(exc).removeprefix(f"Limits.{key} ")
            if message.startswith("must be a") and "between" not in message:
                message += f", not {_type_name(item)}"
            ctx.fail((*path, key), message)
    if isinstance(table.get("cpus"), int):
        table["cpus"] = float(table["cpus"])
    try:
        return Limits(**table)
    except InvalidArgumentError as exc:  # a rule across fields, should Limits grow one
        ctx.fail(path, str(exc))


def _network(ctx: _Context, path: _Path, value: object) -> dict[str, Any]:
    from moat.egress.policy import HostPattern, NetworkPolicy

    table = _table(ctx, path, value, _NETWORK_KEYS)
    for key in ("allow_out", "deny_out", "allow_tcp"):
        if key in table:
            for i, item in enumerate(_strings(ctx, (*path, key), table[key])):
                try:
                    HostPattern.parse(item)
                    if key == "allow_tcp":
                        NetworkPolicy(allow_tcp=[item])  # an explicit port is required
                except PolicyError as exc:
                    ctx.fail((*path, key, i), str(exc))
    if "internet_access" in table and not isinstance(table["internet_access"], bool):
        kind = _type_name(table["internet_access"])
        ctx.fail((*path, "internet_access"), f"must be a boolean, not {kind}")
    try:
        return NetworkPolicy.parse(table).to_dict()
    except PolicyError as exc:  # rules over the whole policy (e.g. too many entries)
        ctx.fail(path, str(exc))


def _guard(ctx: _Context, path: _Path, value: object) -> dict[str, Any]:
    from moat.guard.policy import EXACT, MAX_ALLOW, MAX_ALLOW_LEN, GuardPolicy
    from moat.guard.rules import ALL_RULES

    table = _table(ctx, path, value, _GUARD_KEYS)
    out: dict[str, Any] = {}
    if "mode" in table:
        out["mode"] = _choice(ctx, (*path, "mode"), table["mode"], GUARD_MODES)
    if "allow" in table:
        allow = _strings(ctx, (*path, "allow"), table["allow"])
        if len(allow) > MAX_ALLOW:
            ctx.fail((*path, "allow"), f"may hold at most {MAX_ALLOW} entries")
        for i, item in enumerate(allow):
            if not 0 < len(item) <= MAX_ALLOW_LEN:
                ctx.fail((*path, "allow", i), f"must be 1 to {MAX_ALLOW_LEN} characters")
        out["allow"] = allow
    if "detectors" in table:
        detectors = _strings(ctx, (*path, "detectors"), table["detectors"])
        for i, item in enumerate(detectors):
            if item != EXACT and item not in ALL_RULES:
                ctx.fail(
                    (*path, "detectors", i),
                    f'unknown detector (known: "{EXACT}" and the names in moat.guard.ALL_RULES)',
                )
        out["detectors"] = detectors
    try:
        GuardPolicy(**out)
    except InvalidArgumentError as exc:  # a rule over the whole policy
        ctx.fail(path, str(exc))
    return out


def _envs(ctx: _Context, path: _Path, value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        ctx.fail(path, f"must be a table of strings, not {_type_name(value)}")
    if len(value) > MAX_ENVS:
        ctx.fail(path, f"at most {MAX_ENVS} environment variables are allowed")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(item, str):
            ctx.fail((*path, str(key)), f"must be a string, not {_type_name(item)}")
        try:
            check_env(key, "")
        except InvalidArgumentError:
            ctx.fail((*path, str(key)), "is not a variable name ([A-Za-z_][A-Za-z0-9_]*)")
        try:
            check_env(key, item)
        except InvalidArgumentError:
            # Never echo the value: it may be sensitive.
            ctx.fail((*path, str(key)), "value must be at most 128 KiB and contain no NUL")
        out[key] = item
    return out


# ---------------------------------------------------------------- line numbers of fields


class _ScanError(Exception):
    """The lexer met something it does not understand; the index stays partial."""


class _LineIndex:
    """Line of definition of each key path of a TOML document (best effort; see the module
    docstring). Only ever run on text ``tomllib`` has accepted."""

    def __init__(self, text: str) -> None:
        self._newlines = [i for i, c in enumerate(text) if c == "\n"]
        self._explicit: dict[_Path, int] = {}
        self._implicit: dict[_Path, int] = {}
        try:
            _Lexer(text, self).document()
        except (_ScanError, IndexError, ValueError, tomllib.TOMLDecodeError):
            # Positions are a courtesy: a gap only makes an error point at an ancestor.
            pass

    def define(self, path: _Path, pos: int) -> None:
        line = bisect.bisect_left(self._newlines, pos) + 1
        self._explicit.setdefault(path, line)
        for n in range(1, len(path)):
            self._implicit.setdefault(path[:n], line)

    def line_for(self, path: _Path) -> int | None:
        """The line of ``path`` or of its nearest recorded ancestor."""
        for n in range(len(path), 0, -1):
            prefix = path[:n]
            line = self._explicit.get(prefix, self._implicit.get(prefix))
            if line is not None:
                return line
        return None


class _Lexer:
    """Walks valid TOML, reporting where each key path is defined to a :class:`_LineIndex`."""

    def __init__(self, text: str, index: _LineIndex) -> None:
        self.s = text
        self.i = 0
        self.index = index
        self.array_tables: dict[_Path, int] = {}

    def document(self) -> None:
        current: _Path = ()
        while True:
            self.skip_blank()
            if self.i >= len(self.s):
                return
            start = self.i
            if self.s.startswith("[[", self.i):
                self.i += 2
                keys = self.key()
                self.expect("]]")
                n = self.array_tables.get(keys, 0)
                self.array_tables[keys] = n + 1
                current = (*keys, n)
                self.index.define(current, start)
            elif self.s[self.i] == "[":
                self.i += 1
                current = self.key()
                self.expect("]")
                self.index.define(current, start)
            else:
                self.keyval(current)

    def keyval(self, base: _Path) -> None:
        start = self.i
        path = (*base, *self.key())
        self.expect("=")
        self.index.define(path, start)
        self.skip_space()
        self.value(path)

    def key(self) -> tuple[str, ...]:
        parts: list[str] = []
        while True:
            self.skip_space()
            c = self.s[self.i]
            if c == '"':
                # Let tomllib itself decode the escapes of a quoted key.
                parts.append(str(tomllib.loads("k = " + self.basic_string())["k"]))
            elif c == "'":
                parts.append(self.literal_string()[1:-1])
            else:
                m = _BARE.match(self.s, self.i)
                if m is None:
                    raise _ScanError
                parts.append(m.group())
                self.i = m.end()
            self.skip_space()
            if self.s[self.i] != ".":
                return tuple(parts)
            self.i += 1

    def value(self, path: _Path) -> None:
        s, c = self.s, self.s[self.i]
        if s.startswith('"""', self.i) or s.startswith("'''", self.i):
            self.multiline_string()
        elif c == '"':
            self.basic_string()
        elif c == "'":
            self.literal_string()
        elif c == "{":
            self.i += 1
            while True:
                self.skip_space()
                if s[self.i] == "}":
                    self.i += 1
                    return
                self.keyval(path)
                self.skip_space()
                if s[self.i] == ",":
                    self.i += 1
        elif c == "[":
            self.i += 1
            n = 0
            while True:
                self.skip_blank()
                if s[self.i] == "]":
                    self.i += 1
                    return
                self.index.define((*path, n), self.i)
                self.value((*path, n))
                n += 1
                self.skip_blank()
                if s[self.i] == ",":
                    self.i += 1
        else:  # number, boolean, date/time (which may hold a space)
            start = self.i
            while self.i < len(s) and s[self.i] not in ",]}#\n":
                self.i += 1
            if self.i == start:
                raise _ScanError

    def basic_string(self) -> str:
        j = self.i + 1
        while self.s[j] != '"':
            if self.s[j] == "\n":
                raise _ScanError
            j += 2 if self.s[j] == "\\" else 1
        token, self.i = self.s[self.i : j + 1], j + 1
        return token

    def literal_string(self) -> str:
        j = self.s.index("'", self.i + 1)
        token, self.i = self.s[self.i : j + 1], j + 1
        return token

    def multiline_string(self) -> None:
        delim = self.s[self.i : self.i + 3]
        j = self.i + 3
        while not self.s.startswith(delim, j):
            if j >= len(self.s):
                raise _ScanError
            j += 2 if delim == '"""' and self.s[j] == "\\" else 1
        j += 3
        # Up to two more quote characters belong to the content ('''a'''' is "a'").
        for _ in range(2):
            if self.s.startswith(delim[0], j):
                j += 1
        self.i = j

    def expect(self, token: str) -> None:
        self.skip_space()
        if not self.s.startswith(token, self.i):
            raise _ScanError
        self.i += len(token)

    def skip_space(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def skip_blank(self) -> None:
        """Spaces, newlines and comments."""
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif c == "#":
                end = self.s.find("\n", self.i)
                self.i = len(self.s) if end < 0 else end
            else:
                return
