"""Named profiles in a TOML policy file (moat.profiles, issue 4): pure, no sandboxes.

Every invalid input must give a PolicyError naming the file, the line and the dotted field
(invariant 7: fail closed; invariant 8: the file's base name only, never a host path).
"""

from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path

import pytest

from moat.errors import InvalidArgumentError, NotFoundError, PolicyError
from moat.profiles import (
    DEFAULT_PROFILE,
    ENV_VAR,
    Profile,
    _LineIndex,
    load_profiles,
    parse_profiles,
    policy_path,
    resolve_profile,
)
from moat.runtime.spec import Limits

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "moat.toml"


def _doc(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def _error(text: str) -> str:
    with pytest.raises(PolicyError) as info:
        parse_profiles(_doc(text), "moat.toml")
    return str(info.value)


# ------------------------------------------------------------------------ valid files


def test_example_file_loads_with_expected_tiers() -> None:
    profiles = load_profiles(EXAMPLE)
    assert set(profiles) == {DEFAULT_PROFILE, "data-analysis", "pip-install", "user-submitted"}
    assert profiles["default"].tier == "microvm"
    assert profiles["data-analysis"].tier == "gvisor"
    assert profiles["pip-install"].tier == "microvm"
    assert profiles["user-submitted"].tier == "microvm"
    pip = profiles["pip-install"]
    assert pip.network is not None
    assert pip.network["allow_out"] == ["pypi.org", "files.pythonhosted.org"]
    assert pip.network["internet_access"] is False
    assert profiles["user-submitted"].guard == {"mode": "block"}
    assert profiles["data-analysis"].limits == Limits(cpus=1.0, memory_mb=2048, disk_mb=2048)


def test_full_profile_round_trip() -> None:
    profiles = parse_profiles(
        _doc(
            """
            version = 1
            [profiles.full]
            description = "all fields"
            trust = "semi-trusted"
            isolation = "container"
            timeout = 120
            limits = { cpus = 2, memory_mb = 1024 }
            envs = { A = "1", B_2 = "x y" }
            [profiles.full.network]
            allow_out = ["PyPI.org", "*.pythonhosted.org:443"]
            deny_out = ["evil.example.com"]
            internet_access = true
            allow_tcp = ["GitHub.com:22"]
            [profiles.full.guard]
            mode = "block"
            allow = ["AKIAIOSFODNN7EXAMPLE"]
            detectors = ["exact", "aws"]
            [profiles.empty]
            """
        )
    )
    full = profiles["full"]
    assert full == Profile(
        name="full",
        description="all fields",
        trust="semi-trusted",
        isolation="container",
        timeout=120.0,
        limits=Limits(cpus=2.0, memory_mb=1024),
        network={
            "allow_out": ["pypi.org", "*.pythonhosted.org:443"],  # canonical spelling
            "deny_out": ["evil.example.com"],
            "internet_access": True,
            "allow_tcp": ["github.com:22"],
        },
        guard={"mode": "block", "allow": ["AKIAIOSFODNN7EXAMPLE"], "detectors": ["exact", "aws"]},
        envs={"A": "1", "B_2": "x y"},
    )
    assert full.tier == "container"  # isolation overrides trust
    assert Profile.from_mapping("full", full.to_dict()) == full
    assert profiles["empty"] == Profile(name="empty")
    assert profiles["empty"].tier == "microvm"  # nothing set: untrusted, the deepest tier
    assert profiles["empty"].create_kwargs() == {}


def test_no_profiles_table_is_valid_and_empty() -> None:
    assert parse_profiles("# nothing yet\nversion = 1\n") == {}


def test_tier_tables_are_the_models() -> None:
    # Defined once, in moat.model; the profiles and the engine use that very table.
    from moat import model, profiles
    from moat.engine import tiers

    assert profiles.TIERS is model.TIERS and tiers.TIERS is model.TIERS  # type: ignore[attr-defined]
    assert profiles.TRUST_TO_TIER is model.TRUST_TO_TIER  # type: ignore[attr-defined]
    assert tiers.TRUST_TO_TIER is model.TRUST_TO_TIER
    for p in load_profiles(EXAMPLE).values():
        kw = p.create_kwargs()
        assert model.choose_tier(kw.get("isolation"), kw.get("trust", "untrusted")) == p.tier


# ------------------------------------------------------------------------ create_kwargs


def test_create_kwargs_carries_isolation_through() -> None:
    # The engine, not this module, raises IsolationUnavailableError: the tier must arrive.
    p = Profile.from_mapping("vm", {"isolation": "microvm", "trust": "trusted"})
    assert p.create_kwargs() == {"isolation": "microvm", "trust": "trusted"}


def test_create_kwargs_explicit_arguments_win() -> None:
    p = Profile.from_mapping(
        "p",
        {
            "isolation": "container",
            "limits": {"memory_mb": 1024},
            "envs": {"A": "1"},
            "timeout": 30,
        },
    )
    # Trust and isolation are one decision: a caller's trust drops the profile's isolation.
    kw = p.create_kwargs({"trust": "untrusted", "timeout": None, "envs": {"B": "2"}})
    assert kw == {"trust": "untrusted", "limits": Limits(memory_mb=1024), "envs": {"B": "2"},
                  "timeout": 30.0}  # fmt: skip
    kw = p.create_kwargs({"limits": Limits(pids=10)})
    assert kw["limits"] == Limits(pids=10)  # replaced whole, not merged
    assert kw["isolation"] == "container"


def test_create_kwargs_returns_copies() -> None:
    p = load_profiles(EXAMPLE)["pip-install"]
    kw = p.create_kwargs()
    kw["network"]["allow_out"].append("evil.example.com")
    kw["envs"]["X"] = "1"
    assert p.network is not None and "evil.example.com" not in p.network["allow_out"]
    assert p.envs is not None and "X" not in p.envs


# --------------------------------------------------------------------- invalid content


INVALID = [
    pytest.param(
        """
        [profiles.pip-install]
        trust = "untrusted"

        [profiles.pip-install.limits]
        cpus = 1
        memory_mb = 2000000
        """,
        "moat.toml:6: profiles.pip-install.limits.memory_mb: must be between 32 and 1048576",
        id="limit-out-of-range",
    ),
    pytest.param(
        """
        [profiles.a]
        limits = { cpus = 1, memory_mb = 512.5 }
        """,
        "moat.toml:2: profiles.a.limits.memory_mb: must be an integer, not float",
        id="limit-float",
    ),
    pytest.param(
        """
        [profiles.a]
        limits.cpus = "2"
        """,
        "moat.toml:2: profiles.a.limits.cpus: must be a number, not string",
        id="limit-type-dotted-key",
    ),
    pytest.param(
        """
        [profiles.a]
        limits = { cpus = 1,  memory = 512 }
        """,
        "moat.toml:2: profiles.a.limits.memory: unknown key (expected one of: cpus, memory_mb,",
        id="limit-unknown-inline",
    ),
    pytest.param(
        """
        [profiles.a.limits]
        cpus = 0.01
        """,
        "moat.toml:2: profiles.a.limits.cpus: must be between 0.05 and 64.0",
        id="limit-cpus-low",
    ),
    pytest.param(
        """
        [profiles.a]
        limits = 5
        """,
        "moat.toml:2: profiles.a.limits: must be a table, not integer",
        id="limits-not-table",
    ),
    pytest.param(
        """
        version = 1
        colour = "blue"
        """,
        "moat.toml:2: colour: unknown key (expected one of: version, profiles)",
        id="unknown-top-level",
    ),
    pytest.param(
        """
        version = 2
        """,
        "moat.toml:1: version: must be 1",
        id="bad-version",
    ),
    pytest.param(
        """
        profiles = ["a"]
        """,
        "moat.toml:1: profiles: must be a table of profiles, not array",
        id="profiles-not-table",
    ),
    pytest.param(
        """
        [profiles."Bad Name"]
        trust = "trusted"
        """,
        'moat.toml:1: profiles."Bad Name": profile names are 1 to 64 characters',
        id="bad-profile-name",
    ),
    pytest.param(
        """
        [profiles]
        # a comment
        web = "trusted"
        """,
        "moat.toml:3: profiles.web: must be a table, not string",
        id="profile-not-table",
    ),
    pytest.param(
        """
        [profiles.a]
        trust = "trusted"
        limts = { cpus = 1 }
        """,
        "moat.toml:3: profiles.a.limts: unknown key (expected one of: description, trust,",
        id="unknown-profile-key",
    ),
    pytest.param(
        """
        [profiles.a]

        trust = "trustworthy"
        """,
        'moat.toml:3: profiles.a.trust: must be one of "trusted", "semi-trusted", "untrusted"',
        id="bad-trust",
    ),
    pytest.param(
        """
        [profiles.a]
        trust = 3
        """,
        "moat.toml:2: profiles.a.trust: must be a string, not integer",
        id="trust-type",
    ),
    pytest.param(
        """
        [profiles.a]
        isolation = "docker"
        """,
        'moat.toml:2: profiles.a.isolation: must be one of "container", "gvisor", "microvm"',
        id="bad-isolation",
    ),
    pytest.param(
        """
        [profiles.a]
        timeout = 0
        """,
        "moat.toml:2: profiles.a.timeout: must be between 1 and 86400 seconds",
        id="timeout-range",
    ),
    pytest.param(
        """
        [profiles.a]
        timeout = true
        """,
        "moat.toml:2: profiles.a.timeout: must be a number of seconds, not boolean",
        id="timeout-bool",
    ),
    pytest.param(
        """
        [profiles.a]
        timeout = nan
        """,
        "moat.toml:2: profiles.a.timeout: must be between 1 and 86400 seconds",
        id="timeout-nan",
    ),
    pytest.param(
        """
        [profiles.a]
        description = 7
        """,
        "moat.toml:2: profiles.a.description: must be a string, not integer",
        id="description-type",
    ),
    pytest.param(
        """
        [profiles.a.network]
        allow_out = [
            "pypi.org",   # fine
            "files.pythonhosted.org",
            "*.com",
        ]
        """,
        "moat.toml:5: profiles.a.network.allow_out[2]: wildcard over a public suffix is too broad",
        id="network-public-suffix-multiline-array",
    ),
    pytest.param(
        """
        [profiles.a.network]
        allow_tcp = ["github.com:22", "db.example.com"]
        """,
        "moat.toml:2: profiles.a.network.allow_tcp[1]: allow_tcp entry 'db.example.com' needs "
        "an explicit port",
        id="network-tcp-without-port",
    ),
    pytest.param(
        """
        [profiles.a]
        network.deny_out = ["ok.example.com", "http://x.example.com/"]
        """,
        "moat.toml:2: profiles.a.network.deny_out[1]: network patterns are host[:port]",
        id="network-url-dotted",
    ),
    pytest.param(
        """
        [profiles.a]
        network = { allow_out = "pypi.org" }
        """,
        "moat.toml:2: profiles.a.network.allow_out: must be an array of strings, not string",
        id="network-not-array",
    ),
    pytest.param(
        """
        [profiles.a]
        network = { allow_out = [1] }
        """,
        "moat.toml:2: profiles.a.network.allow_out[0]: must be a string, not integer",
        id="network-item-type",
    ),
    pytest.param(
        """
        [profiles.a.network]
        internet_access = "yes"
        """,
        "moat.toml:2: profiles.a.network.internet_access: must be a boolean, not string",
        id="network-internet-type",
    ),
    pytest.param(
        """
        [profiles.a.network]
        allow = ["pypi.org"]
        """,
        "moat.toml:2: profiles.a.network.allow: unknown key (expected one of: allow_out,",
        id="network-unknown-key",
    ),
    pytest.param(
        """
        [profiles.a]
        guard = { mode = "warn" }
        """,
        'moat.toml:2: profiles.a.guard.mode: must be one of "redact", "block", "off"',
        id="guard-mode",
    ),
    pytest.param(
        """
        [profiles.a.guard]
        mode = "redact"
        detectors = [
          "exact",
          "nonsense",
        ]
        """,
        "moat.toml:5: profiles.a.guard.detectors[1]: unknown detector",
        id="guard-detector",
    ),
    pytest.param(
        """
        [profiles.a.guard]
        allow = [""]
        """,
        "moat.toml:2: profiles.a.guard.allow[0]: must be 1 to 4096 characters",
        id="guard-allow-empty",
    ),
    pytest.param(
        """
        [profiles.a.guard]
        sensitive = ["x"]
        """,
        "moat.toml:2: profiles.a.guard.sensitive: unknown key (expected one of: mode, allow,",
        id="guard-unknown-key",
    ),
    pytest.param(
        """
        [profiles.a.envs]
        GOOD = "1"
        "BAD NAME" = "2"
        """,
        'moat.toml:3: profiles.a.envs."BAD NAME": is not a variable name',
        id="env-name",
    ),
    pytest.param(
        """
        [profiles.a]
        envs = { N = 1 }
        """,
        "moat.toml:2: profiles.a.envs.N: must be a string, not integer",
        id="env-value-type",
    ),
    pytest.param(
        """
        [profiles.a]
        envs = ["A=1"]
        """,
        "moat.toml:2: profiles.a.envs: must be a table of strings, not array",
        id="envs-not-table",
    ),
    pytest.param(
        """
        [profiles."pip-install".limits]
        pids = 4
        """,
        "moat.toml:2: profiles.pip-install.limits.pids: must be between 8 and 65536",
        id="quoted-header",
    ),
    pytest.param(
        """
        profiles.a.limits.pids = 4
        """,
        "moat.toml:1: profiles.a.limits.pids: must be between 8 and 65536",
        id="dotted-from-root",
    ),
    pytest.param(
        """
        profiles = { a = { trust = "trusted", limits = { disk_mb = 0 } } }
        """,
        "moat.toml:1: profiles.a.limits.disk_mb: must be between 1 and 1048576",
        id="nested-inline",
    ),
]


@pytest.mark.parametrize(("text", "expected"), INVALID)
def test_invalid_names_line_and_field(text: str, expected: str) -> None:
    assert _error(text).startswith(expected)


def test_line_numbers_survive_strings_comments_and_crlf() -> None:
    text = (
        "# [profiles.fake] in a comment\r\n"
        "[profiles.a]\r\n"
        'description = """\r\n'
        "[profiles.a.limits]\r\n"
        'pids = 1 ""\r\n'
        '"""\r\n'
        "trust = 'trusted' # ] } [\r\n"
        'network.allow_out = ["a.example.com", """b.example.com""", \'\'\'c"d\'\'\']\r\n'
        'isolation = "microvm"\r\n'
    )
    with pytest.raises(PolicyError) as info:
        parse_profiles(text, "moat.toml")
    assert str(info.value).startswith("moat.toml:8: profiles.a.network.allow_out[2]:")
    with pytest.raises(PolicyError) as info:
        parse_profiles(text.replace('c"d', "c.example.com").replace("microvm", "vm"), "moat.toml")
    assert str(info.value).startswith("moat.toml:9: profiles.a.isolation:")


def test_line_index_paths() -> None:
    index = _LineIndex(
        _doc(
            """
            a.b = 1
            [t]
            x = { y = { z = 2 }, w = [1, {v = 3}] }
            [[arr]]
            k = 1
            [[arr]]
            k = 2
            [t.sub]
            'lit.key' = "\\"quoted\\" = still a string"
            "esc\\u0041" = 4
            """
        )
    )
    assert index.line_for(("a", "b")) == 1
    assert index.line_for(("a",)) == 1
    assert index.line_for(("t", "x", "y", "z")) == 3
    assert index.line_for(("t", "x", "w", 1, "v")) == 3
    assert index.line_for(("arr", 0, "k")) == 5
    assert index.line_for(("arr", 1, "k")) == 7
    assert index.line_for(("t", "sub", "lit.key")) == 9
    assert index.line_for(("t", "sub", "escA")) == 10
    assert index.line_for(("t", "sub", "missing")) == 8  # nearest recorded ancestor
    assert index.line_for(("nowhere",)) is None


def test_syntax_errors_carry_file_and_line() -> None:
    msg = _error(
        """
        [profiles.a]
        trust = "trusted
        """
    )
    assert msg.startswith("moat.toml:2: invalid TOML:")
    msg = _error(
        """
        [profiles.a]
        [profiles.a]
        """
    )
    assert msg.startswith("moat.toml:2: invalid TOML: Cannot declare")
    assert _error("[profiles.a]\ntrust = ").startswith("moat.toml:2: invalid TOML: Invalid value")


def test_guard_off_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="moat.profiles"):
        parse_profiles('[profiles.loose]\nguard = { mode = "off" }\n')
    assert any("loose" in r.getMessage() and "guard off" in r.getMessage() for r in caplog.records)


def test_env_values_are_never_echoed() -> None:
    secret = "s3cr3t-value-\x00-with-nul"
    msg = _error(f'[profiles.a.envs]\nTOKEN = "{secret.replace(chr(0), chr(92) + "u0000")}"\n')
    assert msg.startswith("moat.toml:2: profiles.a.envs.TOKEN:")
    assert "s3cr3t" not in msg


def test_from_mapping_errors_name_field_without_file() -> None:
    with pytest.raises(PolicyError, match=r"^profiles\.x\.limits\.pids: must be between"):
        Profile.from_mapping("x", {"limits": {"pids": 1}})


# ------------------------------------------------------------------ files and env var


def test_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = tmp_path / "team.toml"
    policy.write_text('[profiles.web]\ntrust = "trusted"\n')
    monkeypatch.setenv(ENV_VAR, str(policy))
    assert policy_path() == policy
    assert load_profiles()["web"].tier == "container"
    assert resolve_profile("web").trust == "trusted"
    # An explicit path wins over the variable.
    assert set(load_profiles(EXAMPLE)) >= {"pip-install"}


def test_no_policy_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert load_profiles() == {}
    monkeypatch.setenv(ENV_VAR, "")  # empty counts as unset
    assert load_profiles() == {}
    with pytest.raises(NotFoundError, match=r'profile "pip-install" .*no policy file'):
        resolve_profile("pip-install")


def test_unknown_profile_names_it_and_lists_known() -> None:
    with pytest.raises(NotFoundError) as info:
        resolve_profile("pip-instal", EXAMPLE)
    msg = str(info.value)
    assert '"pip-instal"' in msg and "moat.toml" in msg and "pip-install" in msg
    assert str(EXAMPLE.parent) not in msg


def test_bad_profile_argument() -> None:
    with pytest.raises(InvalidArgumentError):
        resolve_profile("", EXAMPLE)
    with pytest.raises(InvalidArgumentError):
        resolve_profile(3, EXAMPLE)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        load_profiles("")


def test_missing_file_is_an_error_without_host_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "secret-dir" / "moat.toml"
    for call in (lambda: load_profiles(missing), lambda: resolve_profile("a", missing)):
        with pytest.raises(PolicyError) as info:
            call()
        assert str(info.value) == "policy file moat.toml does not exist"
    monkeypatch.setenv(ENV_VAR, str(missing))  # a configured file must exist: fail closed
    with pytest.raises(PolicyError, match="does not exist"):
        load_profiles()


def test_invalid_file_errors_show_base_name_only(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[profiles.a]\n\nisolation = "vm"\n')
    with pytest.raises(PolicyError) as info:
        resolve_profile("a", policy)
    assert str(info.value).startswith("policy.toml:3: profiles.a.isolation: must be one of")
    assert str(tmp_path) not in str(info.value)


def test_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"policy file .* is not a regular file"):
        load_profiles(tmp_path)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match=r"fifo\.toml is not a regular file"):
        load_profiles(fifo)  # must not block on open


def test_oversized_and_non_utf8_files(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text("# x\n" * (300 * 1024))
    with pytest.raises(PolicyError, match=r"big\.toml is larger than"):
        load_profiles(big)
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[profiles.a]\ndescription = "\xff"\n')
    with pytest.raises(PolicyError, match=r"^bad\.toml:2: invalid TOML: not valid UTF-8"):
        load_profiles(bad)


def test_line_index_on_the_example_points_at_each_leaf() -> None:
    import tomllib

    text = EXAMPLE.read_text()
    lines = text.splitlines()
    index = _LineIndex(text)

    def leaves(value: object, path: tuple[str | int, ...]) -> list[tuple[str | int, ...]]:
        if isinstance(value, dict):
            return [p for k, v in value.items() for p in leaves(v, (*path, k))]
        if isinstance(value, list):
            return [p for i, v in enumerate(value) for p in leaves(v, (*path, i))]
        return [path]

    found = leaves(tomllib.loads(text), ())
    assert len(found) > 30
    doc = tomllib.loads(text)
    for path in found:
        line = index.line_for(path)
        assert line is not None, path
        value: object = doc
        for part in path:
            value = value[part]  # type: ignore[index]
        # The line holds the key (or, for an array item, the item itself).
        needle = str(path[-1]) if isinstance(path[-1], str) else str(value)
        assert needle in lines[line - 1], (path, line)


@pytest.mark.container
def test_sandbox_create_with_profile(tmp_path: Path) -> None:
    """A profile's tier, limits and envs reach a real sandbox; explicit arguments win."""
    from tests.conftest import require_tier

    from moat import Sandbox

    require_tier("container")
    policy = tmp_path / "moat.toml"
    policy.write_text(
        "version = 1\n"
        "[profiles.quick]\n"
        'trust = "trusted"\n'
        "timeout = 120\n"
        "limits = { memory_mb = 256, pids = 64 }\n"
        'envs = { TASK = "quick" }\n'
    )
    with Sandbox.create(profile="quick", policy_file=str(policy)) as s:
        info = s.get_info()
        assert info.tier == "container" and info.limits.memory_mb == 256
        assert s.run_code("import os; os.environ['TASK']").text == "quick"
    with Sandbox.create(profile="quick", policy_file=str(policy), limits={"memory_mb": 384}) as s:
        assert s.get_info().limits.memory_mb == 384 and s.get_info().limits.pids == 256
