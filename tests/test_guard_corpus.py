"""The guard against the generated leak and benign corpora (tests/corpus/build_corpus.py).

Every leak case is checked with an oracle independent of the guard (standard-library
decoders), whole and streamed: split at every offset, fed one character at a time, and cut
at random points; the benign corpus measures the false-positive rate (<= 1% of lines).
"""

from __future__ import annotations

import importlib.util
import random
import secrets
import string
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from moat.guard import Guard


def _load_corpus() -> ModuleType:
    path = Path(__file__).parent / "corpus" / "build_corpus.py"
    spec = importlib.util.spec_from_file_location("moat_guard_corpus", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


corpus = _load_corpus()
CASES: list[dict[str, Any]] = corpus.leak_cases()


def _guard(case: dict[str, Any]) -> Guard:
    return Guard(sensitive=[(v, label) for v, label in case["sensitive"]])


def test_corpus_covers_every_form() -> None:
    ids = {c["id"].split(":", 1)[1] for c in CASES}
    for form in (
        "raw", "hex", "HEX", "url", "url/plus", "json", "json/ascii", "html", "reversed",
        "spaced", "per-line", "per-line/crlf", "utf16le", "utf16be", "base64/0", "base64/1",
        "base64/2", "base64url/0", "base64url/1", "base64url/2", "base64-wrapped/0",
    ):  # fmt: skip
        assert form in ids
    rules = {c["id"] for c in CASES if c["kind"] == "rule"}
    for rule in ("aws", "github_token", "slack", "stripe", "openai", "jwt", "basic_auth",
                 "private_key_block"):  # fmt: skip
        assert f"rule:{rule}" in rules


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_leak_case_redacted_whole(case: dict[str, Any]) -> None:
    # Positive control: the oracle sees the secret in the raw text.
    assert corpus.leaks(case["text"], case["secret"])
    out = _guard(case).redact_text(case["text"], "stdout")
    assert not corpus.leaks(out, case["secret"])
    assert "[REDACTED:" in out


def test_leak_corpus_split_at_every_offset() -> None:
    streams = 0
    for case in CASES:
        guard = _guard(case)
        text = case["text"]
        whole = guard.redact_text(text, "stdout")
        for k in range(len(text) + 1):
            s = guard.stream("stdout")
            out = s.feed(text[:k]) + s.feed(text[k:]) + s.flush()
            streams += 1
            assert out == whole, (case["id"], k)
    assert streams > 10_000


def test_leak_corpus_one_character_at_a_time() -> None:
    for case in CASES:
        guard = _guard(case)
        s = guard.stream("stderr")
        out = "".join(s.feed(ch) for ch in case["text"]) + s.flush()
        assert out == guard.redact_text(case["text"], "stderr"), case["id"]
        assert not corpus.leaks(out, case["secret"])


def test_leak_corpus_random_cuts_inside_longer_output() -> None:
    rng = random.Random(11)
    filler = "\n".join(corpus.benign_lines(seed=3, n=200))
    for case in CASES:
        guard = _guard(case)
        text = filler[: rng.randrange(3000)] + "\n" + case["text"] + "\n" + filler[:500]
        whole = guard.redact_text(text, "stdout")
        for _ in range(5):
            cuts = sorted(rng.sample(range(len(text)), 4))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            s = guard.stream("stdout")
            out = "".join(s.feed(p) for p in pieces) + s.flush()
            assert out == whole, case["id"]
            assert not corpus.leaks(out, case["secret"])


def test_leak_corpus_as_bytes() -> None:
    for case in CASES:
        if case["kind"] != "exact":
            continue
        data = case["text"].encode("utf-8")
        out = _guard(case).redact_bytes(data, "file").decode("utf-8", "replace")
        assert not corpus.leaks(out, case["secret"]), case["id"]


def test_benign_false_positive_rate() -> None:
    lines = corpus.benign_lines()
    alphabet = string.ascii_letters + string.digits
    values = [
        ("".join(secrets.choice(alphabet) for _ in range(16 + i % 25)), f"V{i}")
        for i in range(1000)
    ]
    guard = Guard(sensitive=values)
    flagged = [line for line in lines if guard.scan_text(line)]
    rate = len(flagged) / len(lines)
    print(f"benign false positives: {len(flagged)}/{len(lines)} lines = {rate:.4%}")
    assert rate <= 0.01
    # The same lines pass through a stream unchanged.
    text = "\n".join(lines[:3000])
    s = guard.stream("stdout")
    out = "".join(s.feed(text[i : i + 4096]) for i in range(0, len(text), 4096)) + s.flush()
    assert out == text
