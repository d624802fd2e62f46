"""A fake runtime for tests: the agent as a plain subprocess of the host, with NO isolation.

For fast tests of engine and SDK logic on a machine without bubblewrap, runsc or QEMU.
It isolates nothing: code "in" it runs as the test's own user on the host. So it is refused
unless asked for by its ``unsafe_`` name (DESIGN §5: loud weakenings), warns at every start,
is no tier (no trust level or ``isolation=`` reaches it: only an engine built with it, see
``moat.testing.fake_front_door``), and it has no network (no egress gateway is wired).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile

from moat.errors import PolicyError
from moat.runtime.agentdir import prepare
from moat.runtime.spec import SandboxSpec

log = logging.getLogger("moat.testing")

__all__ = ["FakeProcess", "FakeRuntime"]


class FakeProcess:
    """The agent as a child process, in a session of its own, in a temporary home."""

    def __init__(self, proc: asyncio.subprocess.Process, home: str) -> None:
        self._proc = proc
        self._home = home
        assert proc.stdout is not None and proc.stdin is not None
        self._reader = proc.stdout
        self._writer = proc.stdin

    @property
    def reader(self) -> asyncio.StreamReader:
        return self._reader

    @property
    def writer(self) -> asyncio.StreamWriter:
        return self._writer

    async def kill(self) -> None:
        """Kill the agent's whole process group and remove its home. Idempotent."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(Exception):  # retrieves a broken pipe's error (a stopped agent)
            await self._writer.wait_closed()
        await self._proc.wait()
        # The agent is dead, but its stdout pipe stays open until a reader sees EOF, and the
        # engine's reader may be gone already: close the transport (asyncio keeps it on the
        # Process as `_transport`), or it is finalised later as an unclosed ResourceWarning.
        transport = getattr(self._proc, "_transport", None)
        if isinstance(transport, asyncio.BaseTransport):
            transport.close()
        await asyncio.to_thread(shutil.rmtree, self._home, True)

    def alive(self) -> bool:
        return self._proc.returncode is None

    def stats(self) -> dict[str, int]:
        return {}


class FakeRuntime:
    """The ``Runtime`` of tests (name "fake"). ``unsafe_no_isolation=True`` is required."""

    name = "fake"
    #: No gateway is wired for it: the agent's proxy port would be the host's own loopback.
    provides_network = False

    def __init__(self, *, unsafe_no_isolation: bool = False) -> None:
        if unsafe_no_isolation is not True:
            raise PolicyError(
                "the fake runtime isolates nothing; it is for tests only and must be "
                "asked for with unsafe_no_isolation=True"
            )

    def probe(self) -> str | None:
        return None

    def sweep(self) -> int:
        return 0

    async def start(self, spec: SandboxSpec) -> FakeProcess:
        log.warning("sandbox %s: FAKE runtime, no isolation (tests only)", spec.sandbox_id)
        home = tempfile.mkdtemp(prefix="moat-fake-")
        agent_dir = str(await asyncio.to_thread(prepare))
        boot = (
            f"import sys; sys.path.insert(0, {agent_dir!r}); "
            "import moat.agent.contexts as c, moat.agent.files as f, moat.agent.commands as m; "
            f"c.HOME = f.HOME = m.HOME = {home!r}; "
            "from moat.agent.main import main; main()"
        )
        env = spec.env()
        env["HOME"] = home
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-S",
            "-c",
            boot,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
            cwd=home,
            start_new_session=True,
        )
        return FakeProcess(proc, home)
