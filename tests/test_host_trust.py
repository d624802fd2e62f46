"""The host against what a real sandbox sends (issue 17 §2-3, invariants 4, 6, 10): binary
results guarded, a stopped agent ends its sandbox, and a costly scan of one sandbox's output
does not stall another's calls. Container tier (the host-side code is the same on every tier).
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import signal
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from tests.conftest import require_tier

from moat import Sandbox
from moat.errors import SandboxDiedError
from moat.testing import session_of

SECRET = "s3cr3t-" + secrets.token_hex(12)
LABEL = "DB_PASSWORD"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(*extra: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + b"".join(extra)
        + _chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + _chunk(b"IEND", b"")
    )


def _show_png(data: bytes) -> str:
    """Code that displays ``data`` as a PNG result (``_repr_png_``)."""
    return (
        "import base64\n"
        "class P:\n"
        f"    def _repr_png_(self): return base64.b64decode({base64.b64encode(data)!r})\n"
        "P()"
    )


@pytest.mark.container
def test_a_png_carrying_a_value_is_cut_and_a_clean_one_passes_byte_exact() -> None:
    require_tier("container")
    clean = _png()
    leaky = _png(_chunk(b"tEXt", b"Comment\0" + SECRET.encode()))
    with Sandbox.create(isolation="container", timeout=120, sensitive={SECRET: LABEL}) as s:
        ok = s.run_code(_show_png(clean)).results[0]
        assert ok.png is not None and base64.b64decode(ok.png) == clean  # positive control
        got = s.run_code(_show_png(leaky)).results
        pngs = [base64.b64decode(r.png) for r in got if r.png]
        assert all(SECRET.encode() not in p for p in pngs)
        assert all(p == clean for p in pngs)  # the chunk was cut, or the png dropped
        not_png = s.run_code(_show_png(b"GIF89a" + SECRET.encode())).results
        assert not any(r.png for r in not_png)  # not what the type says: dropped
        rows = [r for r in s.audit(limit=10000) if r.get("kind") == "finding"]
        assert any(r.get("label") == LABEL and r.get("channel") == "result" for r in rows)
        assert SECRET not in repr(rows)


def _agent_pids(sandbox_id: str) -> list[int]:
    """Host pids of a sandbox's agent: processes in its cgroup running the moat agent (its
    launcher's command line names it too: both are stopped)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            cgroup = (entry / "cgroup").read_text()
        except OSError:
            continue
        if b"moat.agent.main" in cmd and sandbox_id in cgroup:
            found.append(int(entry.name))
    assert found, "agent not found"
    return found


@pytest.mark.container
def test_a_stopped_agent_ends_the_sandbox_within_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # User code can SIGSTOP the agent; here the host does it, the same for the host's side.
    from moat.engine import client

    require_tier("container")
    monkeypatch.setattr(client, "SEND_TIMEOUT", 2.0)
    for what in ("write", "run_code"):
        with Sandbox.create(isolation="container", timeout=120) as s:
            assert s.run_code("1").text == "1"
            pids = _agent_pids(session_of(s).id)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(SandboxDiedError, match=r"stopped|did not stop"):
                    if what == "write":
                        s.files.write("big.bin", b"\0" * (64 << 20))
                    else:
                        s.run_code("#" + "x" * 520_000, timeout=2)
                took = time.monotonic() - t0
                assert took < 2 + 8, (what, took)
                assert s.get_info().state == "ended" or not s.is_running()
            finally:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)


#: Findings every few bytes: the costliest input per byte for the guard (issue 17 §3).
_COSTLY = "eyJa.b {s} xoxb-1-2-a //a/:_authToken= "


@pytest.mark.container
def test_a_costly_scan_does_not_stall_another_sandbox() -> None:
    require_tier("container")
    text = _COSTLY.format(s=SECRET) * (700 * 1024 // len(_COSTLY.format(s=SECRET)))
    with (
        Sandbox.create(isolation="container", timeout=300, sensitive={SECRET: LABEL}) as a,
        Sandbox.create(isolation="container", timeout=300) as b,
    ):
        # Positive control: the same scan on the calling thread takes far longer than 0.5 s,
        # so inline on the event loop it would stall B's calls that long. A faster or quieter
        # machine scans 700 KiB in under 0.5 s: grow the file until the scan is costly enough.
        for _ in range(4):
            t0 = time.monotonic()
            a.guard.redact_text(text, "result")
            inline = time.monotonic() - t0
            if inline > 0.7:
                break
            text += text
        assert inline > 0.5, inline
        a.files.write("costly.txt", text)
        done = threading.Event()
        errors: list[BaseException] = []

        def costly() -> None:
            try:
                for _ in range(2):
                    r = a.run_code("open('costly.txt').read()")
                    assert SECRET not in (r.text or "")
                    assert SECRET not in a.files.read("costly.txt")[: 300 * 1024]
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                done.set()

        worst = 0.0
        threading.Thread(target=costly, daemon=True).start()
        while not done.is_set():
            t0 = time.monotonic()
            assert b.run_code("1").text == "1"
            worst = max(worst, time.monotonic() - t0)
        assert not errors, errors
        assert worst < 0.5, f"B's round trip took {worst:.2f} s (inline scan {inline:.2f} s)"


#: User code sending RESULT frames on the kernel's own channel (what a takeover can do).
_FLOOD = """
import sys
k = [m for n, m in sys.modules.items() if n.endswith('agent.kernel')][0]
for i in range(150):
    k._send(k.MsgType.RESULT, k._current, data={'html': 'h' * 700_000}, is_main=False)
'done'
"""


@pytest.mark.container
def test_results_count_against_the_output_cap() -> None:
    # Issue 17 §2: RESULT frames were not counted: one call kept 560 MB in host memory.
    import resource

    require_tier("container")
    with Sandbox.create(isolation="container", timeout=300, max_output_bytes=4 << 20) as s:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
        seen: list[str] = []
        ex = s.run_code(_FLOOD, timeout=120, on_stderr=seen.append)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - before
        kept = sum(len(r.html or "") for r in ex.results)
        assert 0 < kept <= 4 << 20  # positive control: the first results came through
        assert ex.truncated and "truncated" in "".join(seen)
        assert grown < 60 << 20, f"host memory grew by {grown >> 20} MiB (105 MB were sent)"
        assert s.run_code("1").text == "1"
