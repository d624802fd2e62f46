"""Channel behaviour of the guard at its API: streams, interleaving, callbacks, block mode
and the prefix side channel (DESIGN invariant 4)."""

from __future__ import annotations

import random

import pytest

from moat.errors import InvalidArgumentError, LeakBlockedError
from moat.guard import Finding, Guard, GuardPolicy

SECRET = "Zq8vR2mXw4Lp9TnB7kYc3HdF6sJa1GeU"  # made-up value for the tests
CONTROL = "aB3dE5fG7hJ9kL2mN4pQ6rS8tV1wX0yZ"  # same length, never registered


def _run(guard: Guard, chunks: list[str], channel: str = "stdout") -> tuple[list[str], str]:
    s = guard.stream(channel)
    outs = [s.feed(c) for c in chunks]
    return outs, s.flush()


def test_stream_holds_back_a_fixed_window_and_flushes_it() -> None:
    guard = Guard(sensitive=[(SECRET, "TOKEN")])
    w = guard.window
    s = guard.stream("stdout")
    assert s.feed("a" * (2 * w - 1)) == ""  # released in batches of at least a window
    assert s.feed("bc") == "a" * (w + 1)  # then all but the last window
    assert s.flush() == "a" * (w - 2) + "bc"
    assert s.closed
    with pytest.raises(InvalidArgumentError):
        s.feed("more")


def test_held_back_tail_is_released_on_flush_even_if_it_is_a_prefix() -> None:
    guard = Guard(sensitive=[(SECRET, "TOKEN")])
    outs, tail = _run(guard, ["hello ", SECRET[:20]])
    assert "".join(outs) + tail == "hello " + SECRET[:20]


def test_secret_split_across_stdout_and_stderr_at_every_offset() -> None:
    guard = Guard(sensitive=[(SECRET, "TOKEN")])
    for k in range(1, len(SECRET)):
        out, err = guard.stream("stdout"), guard.stream("stderr")
        o = out.feed("hello " + SECRET[:k])
        e = err.feed(SECRET[k:] + " bye")
        o += out.flush()
        e += err.flush()
        assert o == "hello [REDACTED:TOKEN]", k
        assert e == "[REDACTED:TOKEN] bye", k


def test_interleaved_char_by_char_across_streams() -> None:
    guard = Guard(sensitive=[(SECRET, "TOKEN")])
    streams = [guard.stream("stdout"), guard.stream("stderr")]
    got = ["", ""]
    for i, ch in enumerate(SECRET):
        got[i % 2] += streams[i % 2].feed(ch)
    got = [g + s.flush() for g, s in zip(got, streams, strict=True)]
    assert got == ["[REDACTED:TOKEN]", "[REDACTED:TOKEN]"]
    for g in got:
        assert SECRET[::2] not in g and SECRET[1::2] not in g


def test_interleaving_does_not_flag_unrelated_output() -> None:
    guard = Guard(sensitive=[(SECRET, "TOKEN")])
    out, err = guard.stream("stdout"), guard.stream("stderr")
    o = out.feed("progress 10%\n") + out.flush()
    e = err.feed("warning: deprecated\n") + err.flush()
    assert (o, e) == ("progress 10%\n", "warning: deprecated\n")


def test_callback_receives_only_redacted_chunks() -> None:
    findings: list[Finding] = []
    guard = Guard(sensitive=[(SECRET, "TOKEN")], on_finding=findings.append)
    received: list[str] = []
    cb = guard.stream("stdout").into(received.append)
    text = ("line\n" * 300) + f"token={SECRET}\n" + ("tail\n" * 300)
    rng = random.Random(3)
    pos = 0
    while pos < len(text):
        step = rng.randint(1, 40)
        cb(text[pos : pos + step])
        pos += step
    cb.close()
    assert "".join(received) == text.replace(SECRET, "[REDACTED:TOKEN]")
    for chunk in received:
        assert SECRET not in chunk
    assert not any(SECRET[:16] in chunk for chunk in received)
    assert [f.label for f in findings] == ["TOKEN"]
    assert findings[0].channel == "stdout" and not findings[0].canary
    assert text[findings[0].start : findings[0].end] == SECRET  # offsets into raw stream
    assert SECRET not in repr(findings[0])


def test_block_mode_raises_and_returns_nothing() -> None:
    findings: list[Finding] = []
    guard = Guard(
        GuardPolicy(mode="block"), sensitive=[(SECRET, "TOKEN")], on_finding=findings.append
    )
    s = guard.stream("stdout")
    s.feed("x" * 10)
    with pytest.raises(LeakBlockedError) as info:
        s.feed(f"here: {SECRET}\n")
    err = info.value
    assert err.labels == ["TOKEN"] and err.channel == "stdout"
    assert SECRET not in str(err) and SECRET not in repr(err.args)
    with pytest.raises(LeakBlockedError):
        s.flush()  # the held tail (with the prefix "x"*10) is never released
    with pytest.raises(LeakBlockedError):
        s.feed("innocent")
    assert findings and findings[0].label == "TOKEN"
    with pytest.raises(LeakBlockedError):
        guard.redact_text(f"a {SECRET} b", "result")
    with pytest.raises(LeakBlockedError):
        guard.redact_bytes(SECRET.encode("utf-16-le"), "file")


def test_block_mode_passes_clean_output() -> None:
    guard = Guard(GuardPolicy(mode="block"), sensitive=[(SECRET, "TOKEN")])
    outs, tail = _run(guard, ["clean ", "output\n"])
    assert "".join(outs) + tail == "clean output\n"


def test_off_mode_passes_everything_through() -> None:
    findings: list[Finding] = []
    guard = Guard(GuardPolicy(mode="off"), sensitive=[(SECRET, "T")], on_finding=findings.append)
    s = guard.stream("stdout")
    assert s.feed(SECRET) == SECRET
    assert s.flush() == ""
    assert guard.redact_text(SECRET, "result") == SECRET
    assert findings == []


@pytest.mark.parametrize("k", range(1, len(SECRET) + 1))
def test_partial_prefix_does_not_change_the_output_pattern(k: int) -> None:
    """secret[:k] and a non-secret of the same length give the same release pattern.

    What comes out (and when, in chunk lengths) depends only on the lengths fed, unless the
    whole value is there: a prefix oracle can't learn a secret character by character.
    """
    guard = Guard(sensitive=[(SECRET, "TOKEN")])
    rng = random.Random(k)
    pad = "p" * rng.randint(0, 2 * guard.window)
    sizes = [rng.randint(1, 64) for _ in range(200)]

    def chunks(value: str) -> list[str]:
        text = pad + value[:k] + "\n" + "q" * guard.window
        out, pos = [], 0
        for size in sizes:
            out.append(text[pos : pos + size])
            pos += size
        out.append(text[pos:])
        return out

    secret_outs, secret_tail = _run(guard, chunks(SECRET))
    control_outs, _control_tail = _run(guard, chunks(CONTROL))
    if k < len(SECRET):
        assert [len(o) for o in secret_outs] == [len(o) for o in control_outs]
        assert "".join(secret_outs) + secret_tail == "".join(chunks(SECRET))
    else:
        assert "[REDACTED:TOKEN]" in "".join(secret_outs) + secret_tail
        assert SECRET not in "".join(secret_outs) + secret_tail


def test_register_at_run_time_applies_to_later_output() -> None:
    guard = Guard()
    s = guard.stream("stdout")
    first = s.feed("before\n")
    guard.register(SECRET, "LATE")
    rest = s.feed(f"after {SECRET}\n") + s.flush()
    assert SECRET not in first + rest and "[REDACTED:LATE]" in rest


def test_repeated_value_back_to_back_is_bounded_and_redacted() -> None:
    guard = Guard(sensitive=[("abab", "R")])
    s = guard.stream("stdout")
    out = "".join(s.feed("ab" * 5000) for _ in range(40)) + s.flush()
    assert "abab" not in out
