"""The ``moat`` command line: doctor, run (a real container sandbox) and audit."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.conftest import require_tier

from moat.cli import main
from moat.store import AuditLog

MOAT = [sys.executable, "-m", "moat.cli"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: its own process (exit codes, cleanup at exit)."""
    return subprocess.run(
        [*MOAT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


# -- doctor --------------------------------------------------------------------------------


def test_doctor_lists_every_tier() -> None:
    result = CliRunner().invoke(main, ["doctor"])
    lines = result.output.splitlines()
    for tier in ("container", "gvisor", "microvm"):
        line = next(ln for ln in lines if ln.split()[0] == tier)
        assert "available" in line or "UNAVAILABLE" in line
    # The exit code says whether every tier works here.
    assert result.exit_code == (1 if "UNAVAILABLE" in result.output else 0)


# -- run -----------------------------------------------------------------------------------


@pytest.mark.container
def test_run_prints_output_and_result() -> None:
    require_tier("container")
    token = secrets.token_hex(6)
    code = f"print('hello {token}')\n6 * 7"
    proc = run_cli("run", "-c", code, "--isolation", "container", "--timeout", "30")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"hello {token}", "42"]
    # The execution was audited (by its hash, never its code).
    sha = hashlib.sha256(code.encode()).hexdigest()
    audit = run_cli("audit", "--kind", "exec", "--limit", "200", "--json")
    assert audit.returncode == 0, audit.stderr
    rows = [r for r in json.loads(audit.stdout) if r.get("code_sha256") == sha]
    assert len(rows) == 1 and rows[0]["result"] == "ok" and rows[0]["language"] == "python"
    assert token not in audit.stdout


@pytest.mark.container
def test_run_error_exit_codes(tmp_path: Path) -> None:
    require_tier("container")
    proc = run_cli("run", "-c", "raise ValueError('boom')", "--isolation", "container")
    assert proc.returncode == 1
    assert "ValueError: boom" in proc.stderr and "Traceback" in proc.stderr
    assert "/work/" not in proc.stderr and "site-packages" not in proc.stderr  # invariant 8
    script = tmp_path / "s.sh"
    script.write_text("echo from-bash; exit 3\n")
    proc = run_cli("run", str(script), "--language", "bash", "--isolation", "container")
    assert proc.returncode == 1 and "from-bash" in proc.stdout


def test_run_usage_errors() -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["run"]).exit_code == 2  # neither FILE nor -c
    assert runner.invoke(main, ["run", "-c", "1", "--isolation", "docker"]).exit_code == 2
    assert runner.invoke(main, ["run", "-c", "1", "--memory", "lots"]).exit_code == 2


# -- audit ---------------------------------------------------------------------------------


@pytest.fixture
def audit_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state directory with a few known rows, used through $MOAT_STATE_DIR."""
    monkeypatch.setenv("MOAT_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MOAT_AUDIT_DB")  # the suite's own store (conftest) would win
    with AuditLog(tmp_path / "audit.db") as log:
        row = log.record_egress(
            "sbx-aaaa", method="CONNECT", host="pypi.org", port=443,
            resolved_ip="151.101.0.223", allowed=True, reason="tunnel",
        )  # fmt: skip
        log.update_egress(row, reason="tunnel", bytes_up=1200, bytes_down=45000)
        log.record_egress(
            "sbx-aaaa", method="GET", host="evil.example", port=80, resolved_ip=None,
            allowed=False, reason="not_allowed",
        )  # fmt: skip
        log.record_egress(
            "sbx-bbbb", method="GET", host="other.example", port=443, resolved_ip="10.0.0.1",
            allowed=False, reason="secret_exfiltration", secret="OPENAI_API_KEY",
        )  # fmt: skip
        log.record_exec("sbx-aaaa", "python", "ab" * 32, 12, None)
        log.record_exec("sbx-bbbb", "bash", "cd" * 32, 7, "CommandExitError")
        log.record_finding("sbx-bbbb", "aws_access_key", "stdout", canary=None)
    return tmp_path


def test_audit_table(audit_dir: Path) -> None:
    result = CliRunner().invoke(main, ["audit"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["TIME", "SANDBOX", "KIND", "RESULT", "DETAIL"]
    assert len(lines) == 7
    assert "CONNECT pypi.org:443 ip=151.101.0.223 tunnel up=1200 down=45000" in lines[1]
    assert "deny" in lines[2] and "evil.example:80 not_allowed" in lines[2]
    assert "secret=OPENAI_API_KEY" in lines[3]
    assert "python sha256=abababababab 12ms" in lines[4]
    assert "error=CommandExitError" in lines[5]
    assert "aws_access_key on stdout" in lines[6]


def test_audit_filters_and_json(audit_dir: Path) -> None:
    runner = CliRunner()

    def rows(*args: str) -> list[dict[str, object]]:
        result = runner.invoke(main, ["audit", "--json", *args])
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert isinstance(data, list)
        return data

    everything = rows()
    assert len(everything) == 6
    ids = [int(str(r["id"])) for r in everything]
    assert ids == sorted(ids)  # oldest first
    assert {r["sandbox_id"] for r in rows("--sandbox", "sbx-aaaa")} == {"sbx-aaaa"}
    assert len(rows("--sandbox", "sbx-aaaa")) == 3
    denied = rows("--denied")
    assert len(denied) == 2 and all(r["result"] == "deny" for r in denied)
    assert {r["kind"] for r in rows("--kind", "exec")} == {"exec"}
    assert rows("--kind", "finding")[0]["label"] == "aws_access_key"
    last_two = rows("--limit", "2")
    assert [r["kind"] for r in last_two] == ["exec", "finding"]
    assert rows("--sandbox", "sbx-none") == []
    assert rows("--sandbox", "sbx-bbbb", "--denied", "--kind", "egress")[0]["secret"] == (
        "OPENAI_API_KEY"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--kind", "network"],
        ["--limit", "0"],
        ["--limit", "100001"],
        ["--limit", "x"],
        ["--sandbox", "sbx-1; DROP TABLE events"],
        ["--sandbox", ""],
        ["--sandbox", "../etc"],
    ],
)
def test_audit_bad_arguments(audit_dir: Path, args: list[str]) -> None:
    result = CliRunner().invoke(main, ["audit", *args])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert len(json.loads(CliRunner().invoke(main, ["audit", "--json"]).output)) == 6


def test_audit_without_a_log_creates_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "MOAT_STATE_DIR": str(tmp_path / "state"), "MOAT_AUDIT_DB": None}
    result = CliRunner().invoke(main, ["audit"], env=env)
    assert result.exit_code == 0 and result.output.strip() == "no audit rows"
    assert json.loads(CliRunner().invoke(main, ["audit", "--json"], env=env).output) == []
    assert not (tmp_path / "state" / "audit.db").exists()


def test_audit_unreadable_log_is_a_clean_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "audit.db").write_bytes(b"this is not a database" * 100)
    result = CliRunner().invoke(
        main, ["audit"], env={"MOAT_STATE_DIR": str(state), "MOAT_AUDIT_DB": None}
    )
    assert result.exit_code == 2
    assert "cannot read the audit log" in result.output
    assert str(tmp_path) not in result.output and "Traceback" not in result.output


@pytest.mark.container
def test_shell_runs_a_terminal_session_from_piped_input() -> None:
    """``moat shell`` with input that is not a terminal: the lines are typed into the
    sandbox's PTY, EOF is Ctrl-D, and the exit code is the shell's."""
    require_tier("container")
    result = subprocess.run(
        [*MOAT, "shell", "--isolation", "container"],
        input="stty size; echo in-$((20+3))-sandbox; exit 7\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 7, result.stderr
    assert "in-23-sandbox" in result.stdout
    assert "24 80" in result.stdout  # no local terminal: the default size
