"""The guard's public API: policy, registration, canaries (output and egress), bytes, PNG
metadata, and the standalone scan/redact for an agent's own reply."""

from __future__ import annotations

import base64
import re
import socket
import struct
import threading
import zlib
from urllib.parse import quote

import httpx
import pytest

from moat.errors import InvalidArgumentError, LeakBlockedError, PolicyError
from moat.guard import ALL_RULES, DEFAULT_RULES, Finding, Guard, GuardPolicy, redact, scan

SECRET = "Zq8vR2mXw4Lp9TnB7kYc3HdF6sJa1GeU"  # made-up value for the tests


def test_policy_defaults_and_validation() -> None:
    p = GuardPolicy()
    assert p.mode == "redact" and p.detectors[0] == "exact"
    assert set(DEFAULT_RULES) <= ALL_RULES and set(p.detectors[1:]) == set(DEFAULT_RULES)
    hash(p)
    for bad in (
        {"mode": "warn"},
        {"detectors": "exact"},
        {"detectors": ("exact", "nonsense")},
        {"allow": "x"},
        {"allow": ("",)},
        {"allow": (1,)},
    ):
        with pytest.raises(InvalidArgumentError):
            GuardPolicy(**bad)
    with pytest.raises(InvalidArgumentError):
        Guard(policy="redact")  # type: ignore[arg-type]


def test_register_validation() -> None:
    g = Guard()
    for value, label in (
        ("abc", "L"),  # too short
        ("x" * 9000, "L"),  # too long
        ("    ", "L"),
        ("ok-value", ""),
        ("ok-value", "bad label!"),
        ("ok-value", "ok-value-label"),  # the label would show the value
        (b"bytes-value", "L"),
    ):
        with pytest.raises(InvalidArgumentError) as info:
            g.register(value, label)  # type: ignore[arg-type]
        assert "ok-value" not in str(info.value)
    with pytest.raises(InvalidArgumentError):
        Guard(sensitive="just-a-string")
    with pytest.raises(InvalidArgumentError):
        g.stream("")


def test_exact_detector_can_be_turned_off_but_canaries_stay() -> None:
    g = Guard(GuardPolicy(detectors=("github_token",)), sensitive=[(SECRET, "T")])
    canary = g.canary("generic")
    out = g.redact_text(f"{SECRET} {canary}", "stdout")
    assert SECRET in out and canary not in out


def test_allow_list_applies_to_rules_only() -> None:
    example = "AKIAIOSFODNN7EXAMPLE"  # AWS's documented example key id
    g = Guard(GuardPolicy(allow=(example,)), sensitive=[(SECRET, "T")])
    assert g.redact_text(f"key {example}", "stdout") == f"key {example}"
    assert g.redact_text("key AKIAABCDEFGHIJKLMNOP", "stdout") == "key [REDACTED:aws]"
    g2 = Guard(GuardPolicy(allow=(SECRET,)), sensitive=[(SECRET, "T")])
    assert g2.redact_text(SECRET, "stdout") == "[REDACTED:T]"


@pytest.mark.parametrize("kind", ["aws", "github", "generic"])
def test_canary_in_output_is_flagged(kind: str) -> None:
    findings: list[Finding] = []
    g = Guard(on_finding=findings.append)
    token = g.canary(kind)
    assert token != g.canary(kind)  # unique
    if kind == "aws":
        assert re.fullmatch(r"AKIA[A-Z2-7]{16}", token)
    elif kind == "github":
        assert re.fullmatch(r"ghp_[A-Za-z0-9]{36}", token)
    out = g.redact_text(f"creds: {token}\n", "stdout")
    assert token not in out and "canary" not in out  # the marker doesn't give the trap away
    canaries = [f for f in findings if f.canary]
    assert canaries and canaries[0].label.startswith(f"canary:{kind}:")
    assert all(token not in repr(f) for f in findings)
    # Streamed, base64'd, in a file read as bytes: still seen.
    findings.clear()
    s = g.stream("stderr")
    s.feed(base64.b64encode(token.encode()).decode()[:10])
    s.feed(base64.b64encode(token.encode()).decode()[10:])
    s.flush()
    assert any(f.canary for f in findings)


def test_canary_in_block_mode_blocks() -> None:
    g = Guard(GuardPolicy(mode="block"))
    token = g.canary("aws")
    with pytest.raises(LeakBlockedError) as info:
        g.redact_text(token, "result")
    assert info.value.labels == ["aws"] and token not in str(info.value)
    with pytest.raises(LeakBlockedError):
        g.check_egress(f"GET /?k={token} HTTP/1.1\r\n\r\n")
    with pytest.raises(InvalidArgumentError):
        g.canary("ssh")


def _serve_one(sock: socket.socket, received: list[bytes]) -> None:
    conn, _ = sock.accept()
    with conn:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        m = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
        while m and len(body) < int(m.group(1)):
            body += conn.recv(65536)
        received.append(head + b"\r\n\r\n" + body)
        conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["query", "basic-auth", "json-body", "clean"])
def test_canary_in_an_egress_request_is_flagged(where: str) -> None:
    """A real HTTP request over 127.0.0.1, as bytes on the wire, checked like the gateway."""
    findings: list[Finding] = []
    g = Guard(on_finding=findings.append)
    token = g.canary("aws")
    received: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        t = threading.Thread(target=_serve_one, args=(srv, received), daemon=True)
        t.start()
        url = f"http://127.0.0.1:{port}/upload"
        with httpx.Client(timeout=5, trust_env=False) as client:
            if where == "query":
                client.get(url, params={"k": token})
            elif where == "basic-auth":
                client.get(url, auth=("user", token))
            elif where == "json-body":
                client.post(url, json={"note": "hi", "key": token})
            else:
                client.get(url, params={"k": "nothing to see"})
        t.join(5)
    assert received
    result = g.check_egress(received[0])
    if where == "clean":
        assert result == [] and findings == []
    else:
        assert result and all(f.canary and f.channel == "egress" for f in result)
        assert findings == result


def test_redact_bytes_finds_raw_and_encoded_forms() -> None:
    g = Guard(sensitive=[(SECRET, "T")])
    for data in (
        b"\x00\x01" + SECRET.encode() + b"\xff",
        b"\xff\xfe" + SECRET.encode("utf-16-le"),
        b"\xfe\xff" + SECRET.encode("utf-16-be"),
        SECRET.encode("utf-32-le"),
        b"x" + base64.b64encode(b"\x9c" + SECRET.encode()) + b"\n",
        quote(SECRET).encode(),
    ):
        out = g.redact_bytes(data, "file")
        assert b"[REDACTED:T]" in out
        assert SECRET.encode() not in out and SECRET.encode("utf-16-le")[2:-2] not in out
    assert g.redact_bytes(b"\x89PNG clean", "file") == b"\x89PNG clean"


def _png_with_text(kind: bytes, payload: bytes) -> bytes:
    def chunk(k: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(kind, payload)
        + chunk(b"IDAT", zlib.compress(b"\0\0\0\0"))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "kind,payload",
    [
        (b"tEXt", b"Comment\0token=" + SECRET.encode()),
        (b"zTXt", b"Comment\0\0" + zlib.compress(SECRET.encode())),
        (b"iTXt", b"Comment\0\0\0en\0\0" + SECRET.encode()),
        (b"iTXt", b"Comment\0\x01\0en\0\0" + zlib.compress(SECRET.encode())),
    ],
)
def test_png_text_metadata_is_scanned_and_pixels_pass(kind: bytes, payload: bytes) -> None:
    findings: list[Finding] = []
    g = Guard(sensitive=[(SECRET, "T")], on_finding=findings.append)
    png = _png_with_text(kind, payload)
    out = g.guard_png(png, "result/png")
    assert kind not in out and b"IDAT" in out and out.startswith(b"\x89PNG")
    assert findings and findings[0].channel == "result/png"
    clean = _png_with_text(b"tEXt", b"Software\0matplotlib")
    assert g.guard_png(clean, "result/png") == clean
    with pytest.raises(LeakBlockedError):
        Guard(GuardPolicy(mode="block"), sensitive=[(SECRET, "T")]).guard_png(png, "r")
    with pytest.raises(InvalidArgumentError):
        g.guard_png(png[:20], "r")  # truncated: not passed through unscanned


def test_standalone_scan_and_redact_for_the_agents_reply() -> None:
    answer = f"Done. I used the key {SECRET} and the token ghp_{'a1B2' * 9}."
    findings = scan(answer, sensitive=[(SECRET, "DEPLOY_KEY")])
    assert {f.label for f in findings} == {"DEPLOY_KEY", "github_token"}
    assert all(f.channel == "reply" for f in findings)
    assert redact(answer, sensitive=[SECRET]) == (
        "Done. I used the key [REDACTED:sensitive] and the token [REDACTED:github_token]."
    )
    with pytest.raises(LeakBlockedError):
        redact(answer, policy=GuardPolicy(mode="block"))
    assert redact(answer, policy=GuardPolicy(mode="off")) == answer


def test_rules_fail_closed_without_detect_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    import moat.guard.rules as rules

    # both caches: a test run before this one may have built the rule set already
    rules.load_rules.cache_clear()
    rules.rule_set.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "detect_secrets.plugins.aws", None)
    try:
        with pytest.raises(PolicyError) as info:
            Guard(GuardPolicy(detectors=("exact", "aws")))
        assert "/" not in str(info.value)
    finally:
        rules.load_rules.cache_clear()
        rules.rule_set.cache_clear()


def test_findings_report_offsets_not_values() -> None:
    findings: list[Finding] = []
    g = Guard(sensitive=[(SECRET, "T")], on_finding=findings.append)
    text = f"ab {SECRET} cd {SECRET[::-1]}"
    g.redact_text(text, "result")
    assert [(f.detector, text[f.start : f.end]) for f in findings] == [
        ("exact:raw", SECRET),
        ("exact:reversed", SECRET[::-1]),
    ]
    for f in findings:
        assert SECRET not in repr(f) and SECRET[::-1] not in repr(f)


def test_prepare_builds_the_matchers_ahead_and_register_invalidates_them() -> None:
    # The engine calls prepare() in a worker thread before each call when prepared is False,
    # so that thousands of values are not compiled on the event loop.
    guard = Guard(sensitive=[("s3cr3t-value-1234", "A")])
    assert not guard.prepared
    guard.prepare()
    assert guard.prepared
    guard.register("an0ther-value-5678", "B")
    assert not guard.prepared
    guard.prepare()
    assert guard.redact_text("x an0ther-value-5678 y", "result") == "x [REDACTED:B] y"


def test_guards_with_the_same_values_share_their_matchers_and_nothing_else() -> None:
    values = [(f"shared-value-{i:04d}-xyz", f"S{i}") for i in range(20)]
    a, b = Guard(sensitive=values), Guard(sensitive=values)
    a.prepare()
    b.prepare()
    assert a._idx().text is b._idx().text and a._idx().binary is b._idx().binary
    b.register("only-in-b-value-9", "B")
    assert a._idx().text is not b._idx().text
    assert a.redact_text("only-in-b-value-9", "result") == "only-in-b-value-9"
    assert b.redact_text("only-in-b-value-9", "result") == "[REDACTED:B]"
    assert a.redact_text("shared-value-0003-xyz", "result") == "[REDACTED:S3]"
