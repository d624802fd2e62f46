"""File metadata and write failures from a taken-over agent (invariant 6).

The scripted agent of tests/test_hostile_agent.py answers with ``metadata`` fields and FAIL
kinds an honest agent would not send: the host must end the sandbox on a malformed reply,
guard what it passes on, and say what failed in its own words.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from tests.test_hostile_agent import _ENTRY, _end, _ended, _hostile

from moat.errors import DiskFullError, PolicyError, SandboxDiedError

pytestmark = pytest.mark.asyncio


async def test_metadata_keys_and_values_pass_the_guard() -> None:
    v = "sensitive-" + secrets.token_hex(8)
    entry = {**_ENTRY, "metadata": {"author": v, v: "value", "plain": "ok"}}
    script = {"file_stat": [["done", entry]], "file_list": [["done", {"entries": [entry]}]]}
    door, sbx = await _hostile(script, sensitive=[v])
    try:
        got = [await sbx.files.get_info("a"), *(await sbx.files.list("."))]
        for e in got:
            assert e.metadata is not None and e.metadata["plain"] == "ok"  # they came through
            assert v not in repr(e.metadata) and "REDACTED" in repr(e.metadata)
    finally:
        await _end(door)


_BAD_METADATA: list[Any] = [
    {"a": "\x1b]52;c;aGk=\x07"},  # a terminal escape
    {"a": "caf\u00e9"},  # not ASCII
    {"k" * 247: "v"},  # key over 246 bytes
    {"a": "v" * 4096},  # over 4 KiB in all
    {"a": 1},
    {"": "v"},
    ["a", "b"],
    "a=b",
]


@pytest.mark.parametrize("bad", _BAD_METADATA, ids=range(len(_BAD_METADATA)))
async def test_malformed_metadata_ends_the_sandbox(bad: Any) -> None:
    door, sbx = await _hostile({"file_stat": [["done", {**_ENTRY, "metadata": bad}]]})
    try:
        with pytest.raises(SandboxDiedError, match="protocol"):
            await sbx.files.get_info("a")
        assert await _ended(sbx)
    finally:
        await _end(door)


async def test_write_failures_are_said_in_the_hosts_words() -> None:
    v = "sensitive-" + secrets.token_hex(8)
    for kind, error in (("no_space", DiskFullError), ("unsupported", PolicyError)):
        door, sbx = await _hostile({"file_write": [["fail", {"kind": kind, "message": v}]]})
        try:
            with pytest.raises(error) as err:
                await sbx.files.write("a", b"x" * 10)
            assert v not in str(err.value)
            assert (await sbx.get_info()).state == "running"  # a refusal, not a violation
        finally:
            await _end(door)
