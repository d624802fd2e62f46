"""A private network namespace whose only interface is loopback, for the cluster tests, and
a reader of which addresses processes listen on (from /proc, outside the processes).

Ray 2.60 rewrites a loopback ``--node-ip-address``/``--address`` into the host's outbound
address (``resolve_ip_for_localhost``: a UDP "connect" towards 8.8.8.8) and then binds its
gRPC servers on all interfaces. In a namespace with no route out, that lookup finds no
outbound address and Ray falls back to the host name, which resolves to 127.0.0.1 here: the
node IP stays loopback, Ray's gRPC servers bind 127.0.0.1 only, and the namespace has no
other interface anyway. The caller's thread enters the namespace, so every process it
starts (head, ``moat node``, ``moat serve``) and every thread it creates (Ray's driver)
inherits it; leaving restores the thread's own namespace.

Beware of libraries that keep worker threads for the whole process (the E2B SDK's pyqwest
transport): they stay in the namespace of the thread that first used them. Run such clients
in a child process (tests/cluster_sdk.py), never in the test process inside the namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import subprocess
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _thread_netns() -> str:
    return f"/proc/self/task/{threading.get_native_id()}/ns/net"


@contextlib.contextmanager
def loopback_only_netns() -> Iterator[None]:
    """Move this thread into a new network namespace with only ``lo`` (up); move back on
    exit. Root only."""
    own = os.open(_thread_netns(), os.O_RDONLY)
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
            yield
        finally:
            _check(_libc.setns(own, CLONE_NEWNET), "setns back")
    finally:
        os.close(own)


@dataclass(frozen=True)
class Listener:
    pid: int
    comm: str
    address: str
    port: int

    @property
    def loopback(self) -> bool:
        addr = ipaddress.ip_address(self.address)
        return addr.is_loopback


def _unmapped(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)  # ::ffff:127.0.0.1 is 127.0.0.1
    return str(addr)


def _hex_addr(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return _unmapped(ipaddress.IPv4Address(raw[::-1]))
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return _unmapped(ipaddress.IPv6Address(words))


def listeners(pids: Iterable[int]) -> list[Listener]:
    """Every TCP listening socket the processes hold, with its bound address (read from
    each process's /proc/<pid>/net/tcp{,6}, i.e. in that process's own namespace)."""
    found: list[Listener] = []
    for pid in pids:
        try:
            inodes = set()
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            tables = [Path(f"/proc/{pid}/net/{t}").read_text() for t in ("tcp", "tcp6")]
        except OSError:
            continue  # gone meanwhile
        for table in tables:
            for line in table.splitlines()[1:]:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A: TCP_LISTEN
                    continue
                host, port = cols[1].split(":")
                found.append(Listener(pid, comm, _hex_addr(host), int(port, 16)))
    return found


def interfaces(pid: int) -> list[str]:
    """The network interfaces of ``pid``'s namespace."""
    lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    return [line.split(":", 1)[0].strip() for line in lines]
