"""Every guard rule runs in linear time (issue 17 §3: "Quadratic guard rules").

For each rule, adversarial inputs (the prefix that makes a backtracking regex rescan, many
times over) are scanned at two sizes: 700 KiB must take well under a second, and doubling
the input may not much more than double the time. The positive control runs the upstream
(Python ``re``) regexes of two rules on the same inputs and shows them quadratic.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from moat.guard import Guard, GuardPolicy
from moat.guard.rules import ALL_RULES, load_rules

T = TypeVar("T")
#: CPU seconds for 700 KiB that is a finding every few bytes (Python works per finding): the
#: densest, opt-in ip_public, measures 0.6 s quiet and 0.84-0.97 s with the 2 cores loaded.
#: A stall (the upstream rules) takes minutes; linearity is the 4x-step check.
DENSE_S = 1.5

KIB = 1024

#: Per rule: repeated units that are worst cases for a backtracking engine (a gate or an
#: anchor at every few bytes, long runs a greedy repetition scans and gives back).
ADVERSARIAL: dict[str, list[str]] = {
    "aws": ["AKIA", "aws key '", "aws" + "x" * 19],
    "azure_storage_key": ["AccountKey=", "AccountKey=" + "a" * 87 + "!"],
    "basic_auth": ["://", "://a:", "://" + "a" * 50],
    "discord": [".aaaaaa", "M" + "a" * 25 + ".aaaaaa"],
    "github_token": ["ghp_", "ghp_" + "a" * 35 + "!"],
    "gitlab_token": ["glpat-", "glagent-" + "a" * 1100, "glcbt-00_", "GR1348941"],
    "jwt": ["eyJ", "eyJa", "eyJa.b", "eyJa.b."],
    "mailchimp": ["-us1", "a" * 31 + "-us"],
    "npm": ["//", "//a/:_authToken="],
    "openai": ["sk-", "sk-" + "a" * 20 + "T3BlbkFJ"],
    "private_key": ["BEGIN RSA PRIVATE KEY"],
    "pypi_token": ["pypi-AgEIcHlwaS5vcmc"],
    "sendgrid": ["SG.", "SG." + "a" * 22 + "."],
    "slack": ["xoxb-", "xoxb-1-", "1-"],
    "square_oauth": ["sq0csp-"],
    "stripe": ["sk_live_"],
    "telegram_token": ["1234567890:", ":" + "a" * 34],
    "twilio": ["AC", "SK" + "a" * 31],
    "github_pat": ["github_pat_"],
    "google_api_key": ["AIza"],
    "anthropic": ["sk-ant-", "sk-ant-a0", "sk-ant-aa00-" + "a" * 70 + "!"],
    "private_key_block": [
        "-----BEGIN RSA PRIVATE KEY-----",
        "-----BEGIN RSA PRIVATE KEY-----" + "a" * 16400,
        "-----END PRIVATE KEY",
    ],
    "artifactory": [" AKC", " AP1", " AKC" + "a" * 40],
    "cloudant": ["cl_key", "cl_key" + " " * 2000, "https://a:", "https://a:" + "0" * 64 + "@a"],
    "ibm_cloud_iam": ["ibm_key", "ibm_key" + " " * 2000, "iam_key=" + "a" * 44],
    "ibm_cos_hmac": ["secret_key", "secret_key" + " " * 2000],
    "ip_public": ["1.", "1.1.1.1.", "8.8.8.8:"],
    "softlayer": ["sl_key", "sl_key" + " " * 2000, "https://api.softlayer.com/soap/v3/"],
}
#: The token used to close the input: gates present, so the rule really runs.
TRAILER = " _authToken= T3BlbkFJ PRIVATE KEY eyJ "


def _text(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size] + TRAILER


def _best(fn: Callable[[T], object], arg: T, runs: int = 3) -> float:
    """Least CPU time of this thread over ``runs`` (other jobs on the cores don't count)."""
    best = float("inf")
    for _ in range(runs):
        t0 = time.thread_time()
        fn(arg)
        best = min(best, time.thread_time() - t0)
    return best


def _pairs(fn: Callable[[T], object], small: T, large: T, pairs: int = 3) -> tuple[float, float]:
    """Least CPU time of ``fn(large)``, and the median of ``large/small`` over ``pairs``
    runs of each, interleaved.

    Thread CPU time still moves with the load on a shared VM (steal, caches): one sample of
    each size let a load spike between them decide a ratio (seen in CI). Interleaved pairs
    see the same load, and the median ignores a spike; the least time is the best estimate
    of the true cost for an absolute bound.
    """
    ratios: list[float] = []
    least = float("inf")
    for _ in range(pairs):
        t0 = time.thread_time()
        fn(small)
        t1 = time.thread_time()
        fn(large)
        t2 = time.thread_time()
        least = min(least, t2 - t1)
        ratios.append((t2 - t1) / max(t1 - t0, 1e-6))
    return least, statistics.median(ratios)


def test_every_rule_has_adversarial_inputs() -> None:
    assert set(ADVERSARIAL) == set(ALL_RULES)


@pytest.mark.parametrize("name", sorted(ALL_RULES))
def test_rule_scans_adversarial_input_in_linear_time(name: str) -> None:
    guard = Guard(GuardPolicy(detectors=(name,)))

    def scan(text: str) -> None:
        guard.redact_text(text, "result")

    for unit in ADVERSARIAL[name]:
        text = _text(unit, 700 * KIB)
        large, ratio = _pairs(scan, _text(unit, 175 * KIB), text)
        # Generous bounds (2 shared cores); the upstream jwt rule takes minutes here. Inputs
        # that are findings every few bytes cost Python per finding (still linear).
        dense = guard.redact_text(text, "result") != text
        assert large < (DENSE_S if dense else 0.25), (name, unit[:20], large)
        # Linear: 4x the input, ~4x the time (5x measured: RE2 plus Python per finding);
        # quadratic would be ~16x. The threshold sits
        # between them, so a loaded machine's noise (seen: 3.4x on a 2x step) can't decide it
        # (noise allowed for scans under 0.1 s).
        assert ratio < 10 or large < 0.1, (name, unit[:20], ratio, large)


@pytest.mark.parametrize("name", sorted(ALL_RULES))
def test_rule_bytes_path_is_linear_too(name: str) -> None:
    guard = Guard(GuardPolicy(detectors=(name,)))
    for unit in ADVERSARIAL[name]:
        data = _text(unit, 700 * KIB).encode()
        out = guard.redact_bytes(data, "file")
        took = _best(lambda d: guard.redact_bytes(d, "file"), data)
        assert took < (DENSE_S if out != data else 0.25), (name, unit[:20], took)


@pytest.mark.parametrize(("name", "unit"), [("jwt", "eyJ"), ("npm", "//"), ("openai", "sk-")])
def test_positive_control_upstream_regexes_are_quadratic(name: str, unit: str) -> None:
    # The same inputs on the upstream regex (Python's backtracking re), as the guard ran
    # them before: doubling the input roughly quadruples the time.
    (rule,) = [r for r in load_rules(frozenset({name})) if unit in ADVERSARIAL[name]]

    def scan(text: str) -> None:
        list(rule.source.finditer(text))

    # 6 and 12 KiB, five interleaved pairs: ~4 s of CPU for the slowest rule (npm).
    _, ratio = _pairs(scan, _text(unit, 6 * KIB), _text(unit, 12 * KIB), pairs=5)
    assert ratio > 3, (name, ratio)


def test_jwt_extension_is_not_rescanned() -> None:
    # "eyJa.b" repeated: every match's signature extension runs to the end of the run.
    guard = Guard(GuardPolicy(detectors=("jwt",)))
    text = "eyJa.b" * (700 * KIB // 6)
    out = guard.redact_text(text, "result")
    assert out == "[REDACTED:jwt]"


def test_rules_run_on_re2_except_the_reviewed_ones() -> None:
    engines = {r.name: r.engine for r in load_rules(frozenset(ALL_RULES))}
    assert {n for n, e in engines.items() if e != "re2"} == {"ip_public"}


#: Inputs for the exact matcher's readings (decoded escapes, folded Unicode, ANSI gaps,
#: hexdump lines): each reading is made in one pass, whatever the text.
EXACT_ADVERSARIAL = [
    "%41",
    "\\u0041",
    "&#65;",
    "&amp;",
    "\x1b[31m",
    "\x1b[31ma",
    "\u200ba",
    "\uff41",
    "é",
    "00000000  41 41 41 41 41 41 41 41  41 41 41 41 41 41 41 41  |AAAAAAAAAAAAAAAA|\n",
    "41:",
    "a ",
    "  |",
]


@pytest.mark.parametrize("unit", EXACT_ADVERSARIAL)
def test_exact_readings_are_linear(unit: str) -> None:
    guard = Guard(GuardPolicy(detectors=("exact",)), sensitive=[("AAAAAAAAzzzz", "V")])

    def scan(text: str) -> None:
        guard.redact_text(text, "result")

    large, ratio = _pairs(scan, _text(unit, 350 * KIB), _text(unit, 700 * KIB))
    assert large < 1.0, (unit, large)
    assert ratio < 3 or large < 0.1, (unit, ratio, large)


def _png_chunks(n: int) -> bytes:
    import struct
    import zlib

    body = b"Comment\0" + b"a" * 20
    chunk = (
        struct.pack(">I", len(body))
        + b"tEXt"
        + body
        + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    )
    return b"\x89PNG\r\n\x1a\n" + chunk * (n // len(chunk)) + b"\0\0\0\0IEND\xaeB`\x82"


#: Binary results made of the parsers' worst cases: many tiny streams, unbalanced
#: strings, hex strings without an end, many chunks and segments.
BINARY_ADVERSARIAL: dict[str, tuple[str, Callable[[int], bytes]]] = {
    "pdf/streams": ("pdf", lambda n: b"%PDF-1.4\n" + b"obj stream\nx\nendstream\n" * (n // 23)),
    "pdf/parens": ("pdf", lambda n: b"%PDF-1.4\n" + b"(" * n),
    "pdf/escapes": ("pdf", lambda n: b"%PDF-1.4\n(" + b"\\101" * (n // 4) + b")"),
    "pdf/hex": ("pdf", lambda n: b"%PDF-1.4\n" + b"<a" * (n // 2) + b">"),
    "pdf/dicts": ("pdf", lambda n: b"%PDF-1.4\n" + b"<<" * (n // 2)),
    "png/chunks": ("png", _png_chunks),
    "jpeg/segments": (
        "jpeg",
        lambda n: b"\xff\xd8" + b"\xff\xfe\x00\x06abcd" * (n // 8) + b"\xff\xd9",
    ),
    "jpeg/entropy": (
        "jpeg",
        lambda n: b"\xff\xd8\xff\xda\x00\x02" + b"\xff\x00" * (n // 2) + b"\xff\xd9",
    ),
}


@pytest.mark.parametrize("name", sorted(BINARY_ADVERSARIAL))
def test_binary_parsers_are_linear(name: str) -> None:
    kind, make = BINARY_ADVERSARIAL[name]
    guard = Guard(sensitive=[("AAAAAAAAzzzz", "V")])
    small_data, large_data = make(350 * KIB), make(700 * KIB)

    def scan(data: bytes) -> None:
        guard.scan_binary_result(kind, data)

    large, ratio = _pairs(scan, small_data, large_data, pairs=5)
    assert large < 1.0, (name, large)
    assert ratio < 3 or large < 0.1, (name, ratio, large)


@pytest.mark.parametrize(
    "unit",
    [
        "eyJhbGciOi.eyJzdWIi." + "QUJD" * 20_000 + " ",  # JWTs longer than a stream holds
        "-----BEGIN RSA PRIVATE KEY-----\n" + "QUJD" * 5_000 + "\n",  # blocks without END
        "sk-ant-api03-" + "a" * 30_000 + " ",
    ],
)
def test_streams_holding_a_growing_match_stay_linear(unit: str) -> None:
    # A rule match that reaches the end of the buffer is held (up to MAX_HOLD); fed in
    # small chunks, the held buffer must not be rescanned on every chunk.
    guard = Guard(sensitive=[("AAAAAAAAzzzz", "V")])

    def feed(text: str) -> None:
        s = guard.stream("stdout")
        for i in range(0, len(text), 64):
            s.feed(text[i : i + 64])
        s.flush()

    large, ratio = _pairs(feed, _text(unit, 350 * KIB), _text(unit, 700 * KIB))
    assert large < 1.0, large
    assert ratio < 3 or large < 0.1, (ratio, large)
