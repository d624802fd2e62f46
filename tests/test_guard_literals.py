"""The guard's multi-literal search: both back ends find exactly the same occurrences."""

from __future__ import annotations

import random
import threading

import pytest

from moat.guard import literals
from moat.guard.literals import LiteralSet

BACKENDS = ["ahocorasick"] + (
    ["hyperscan"] if getattr(literals, "hyperscan", None) is not None else []
)


def _naive(lits: list[bytes], data: bytes) -> set[tuple[int, int]]:
    out = set()
    for i, lit in enumerate(lits):
        start = data.find(lit)
        while start >= 0:
            out.add((i, start))
            start = data.find(lit, start + 1)
    return out


def test_hyperscan_is_the_default_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    # The 100 MB/s target depends on it; its wheel is a dependency on x86-64.
    import platform

    monkeypatch.delenv("MOAT_GUARD_MATCHER", raising=False)
    if platform.machine() == "x86_64":
        assert getattr(literals, "hyperscan", None) is not None
        assert LiteralSet([b"abc"]).backend == "hyperscan"


@pytest.mark.parametrize("use", BACKENDS)
def test_tricky_bytes(use: str) -> None:
    # NUL (UTF-16 forms), regex metacharacters, non-ASCII bytes, overlapping and nested
    # literals: every one found where it occurs, nothing else.
    lits = [b"a\x00b\x00", b"(.*)+?[", b"\xff\xfe\x00", b"aaa", b"aa", b"\\x41", b"A"]
    data = b"xx a\x00b\x00 (.*)+?[ \xff\xfe\x00 aaaa \\x41 zz"
    ls = LiteralSet(lits, use=use)
    assert set(ls.find(data)) == _naive(lits, data)
    assert ls.any(data)
    assert not LiteralSet([b"\x00\x00\x00", b"qq"], use=use).any(data)
    assert ls.find(b"") == [] and not ls.any(b"")


@pytest.mark.parametrize("use", BACKENDS)
def test_random_corpus_matches_naive_search(use: str) -> None:
    rng = random.Random(7)
    alphabet = b"ab\x00\xff"
    lits = list({bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(60)})
    for _ in range(30):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        ls = LiteralSet(lits, use=use)
        found = ls.find(data)
        assert len(found) == len(set(found))
        assert set(found) == _naive(lits, data)
        assert ls.any(data) == bool(found)


@pytest.mark.parametrize("use", BACKENDS)
def test_threads_share_one_set(use: str) -> None:
    # Hyperscan scratch space is per thread; a guard is used from several.
    ls = LiteralSet([b"needle"], use=use)
    data = b"hay " * 10_000 + b"needle"
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(200):
                assert ls.find(data) == [(0, len(data) - 6)]
                assert ls.any(data)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_bad_sets_are_refused() -> None:
    with pytest.raises(ValueError):
        LiteralSet([])
    with pytest.raises(ValueError):
        LiteralSet([b"ok", b""])
    with pytest.raises(ValueError):
        LiteralSet([b"ok"], use="grep")


def test_environment_forces_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOAT_GUARD_MATCHER", "ahocorasick")
    assert LiteralSet([b"abc"]).backend == "ahocorasick"


def test_anchor_widths_are_those_of_the_regexes() -> None:
    # The hyperscan pass computes an anchor's start from its declared width.
    import re._parser as sre_parser

    from moat.guard.rules import ALL_RULES, load_rules

    anchored = [r for r in load_rules(ALL_RULES) if r.anchor is not None]
    assert anchored
    for rule in anchored:
        assert rule.anchor is not None
        width = sre_parser.parse(rule.anchor.pattern.decode()).getwidth()
        assert width == (rule.anchor_width, rule.anchor_width), rule.name


def test_hyperscan_anchors_cover_every_regex_anchor() -> None:
    # Every anchor Python's regex finds, the gate pass reports too (it may report more:
    # overlapping ones), so rules see the same candidates on either back end. (With the
    # fallback matcher, anchors are None: the rule's regex searches the whole text.)
    from moat.guard.rules import DEFAULT_RULES, rule_set

    rules = rule_set(frozenset(DEFAULT_RULES))
    rng = random.Random(3)
    alphabet = "abcXYZ019_-.:u s\n"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        text += "-us7" + ".abcdef." + "A" * 27 + ":" + "b" * 35  # one of each, at least
        found = {rule.name: anchors for rule, _, anchors in rules.candidates(text.encode())}
        for rule in rules.rules:
            if rule.anchor is None:
                continue
            expected = {m.span() for m in rule.anchor.finditer(text.encode())}
            assert rule.name in found
            got = found[rule.name]
            if literals.backend() == "hyperscan":
                assert got is not None and expected <= set(got), rule.name
            else:
                assert got is None


@pytest.mark.skipif(
    getattr(literals, "hyperscan", None) is None,
    # Never on x86-64, where the wheel is a dependency (test_hyperscan_is_the_default_...
    # fails there without it); elsewhere the guard runs on the fallback, tested above.
    reason="no hyperscan wheel for this platform: the guard uses its Aho-Corasick fallback",
)
def test_a_matcher_that_cannot_be_built_fails_closed_and_typed() -> None:
    from moat.errors import PolicyError

    with pytest.raises(PolicyError):
        LiteralSet([b"ok"], use="hyperscan", patterns=[(b"(unbalanced", 3)])
