"""The sandbox's only way out: a local proxy port whose connections travel to the host.

Each TCP connection accepted on 127.0.0.1:<port> becomes a stream of TCP_* frames on the
agent channel; the host's egress gateway speaks HTTP proxy on the other end and decides.
There is no route and no DNS otherwise (DESIGN §3, invariant 2). Flow control is by credit:
a side sends at most TCP_WINDOW bytes the other has not acknowledged.

Trust domain: sandbox (this runs inside it, next to the code it serves). One thread serves
every stream with non-blocking sockets and a selector: threads per stream would count against
the sandbox's pids limit (with gVisor's ptrace platform each is a host thread too) and would
need a blocked ``recv`` to be woken before a close takes effect.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import threading

from moat.agent.channel import Channel
from moat.protocol import INGRESS_WINDOW, TCP_CHUNK, TCP_WINDOW, MsgType

# socket and selectors cost tens of ms of start-up under TCG and only sandboxes with egress
# use them: setup() imports them (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import selectors
    import socket

# selectors.EVENT_READ, selectors.EVENT_WRITE and socket.SHUT_WR (fixed values)
_EVENT_READ, _EVENT_WRITE, _SHUT_WR = 1, 2, 1

#: Streams open at once, at most (the host gateway has its own, smaller caps).
MAX_STREAMS = 512


class _Stream:
    """One accepted connection and its state on both directions."""

    def __init__(self, sid: int, sock: socket.socket, window: int = TCP_WINDOW) -> None:
        self.id = sid
        self.sock = sock
        self.window = window  # the host's credit window for what we send it
        self.credit = window  # what we may still send to the host
        self.out = bytearray()  # from the host, not yet written to the socket
        self.read_eof = False  # the process half-closed; TCP_EOF sent
        self.eof_in = False  # the host half-closed; shut our write side once out is empty
        self.wrote_eof = False
        self.closing = False  # the host closed; close once out is delivered
        self.events = 0  # what the selector watches for this socket


class NetProxy:
    """The agent's proxy port: accepts connections and carries them as TCP_* frames."""

    def __init__(self, channel: Channel) -> None:
        self.ch = channel
        self.streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self.listener: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        # Frames from the agent's reader thread, handled on the proxy thread (deque appends
        # and pops are thread-safe); a byte on the pipe wakes the selector.
        self._inbox: collections.deque[tuple[MsgType, int, bytes, int]] = collections.deque()
        self._wake_r = self._wake_w = -1
        #: restores asking for every stream to end (drop_streams), each set once done
        self._drops: collections.deque[threading.Event] = collections.deque()

    def setup(self, port: int, ca_path: str, bundle: bytes) -> None:
        """Write the CA bundle (the template's system roots + ``bundle``, this sandbox's CA)
        where the environment says, then listen on the proxy port. Again (an agent restored
        with its memory, under a new gateway): the new CA bundle only."""
        os.makedirs(os.path.dirname(ca_path), exist_ok=True)
        system = b""
        for roots in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
            try:
                with open(roots, "rb") as f:
                    system = f.read().rstrip(b"\n") + b"\n"
                break
            except OSError:
                continue
        tmp = ca_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(system + bundle)  # the template's roots, then this sandbox's CA
        os.chmod(tmp, 0o444)
        os.replace(tmp, ca_path)
        if self.listener is not None:
            return
        import selectors
        import socket

        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(128)
        srv.set_inheritable(False)
        srv.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # poll(2), not epoll: gVisor's checkpoint (runsc 20221219) refuses a listening TCP
        # endpoint that still has waiters, and an epoll registration stays one between calls;
        # poll's lasts only while the call blocks (the sentry interrupts it to save). At most
        # MAX_STREAMS + 2 descriptors, so poll's linear scan costs little.
        sel = selectors.PollSelector()
        sel.register(srv, _EVENT_READ)
        sel.register(self._wake_r, _EVENT_READ)
        self._sel = sel
        self.listener = srv
        threading.Thread(target=self._loop, name="moat-netproxy", daemon=True).start()

    # frames from the host (called on the agent's reader thread) -----------------------------

    def on_frame(self, mtype: MsgType, sid: int, payload: bytes, n: int = 0) -> None:
        if self._sel is None:
            if mtype is MsgType.TCP_DIAL:
                self.ch.send(MsgType.TCP_CLOSE, sid)  # no stream machinery: refuse at once
            return  # no proxy: no streams either
        self._inbox.append((mtype, sid, payload, n))
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")  # a full pipe means a wake-up is pending anyway

    def drop_streams(self, wait: float = 0.0) -> None:
        """After a restore: the host ends of every stream are gone; close ours at once, on
        the proxy thread, after what it has queued (a dial in progress too). ``wait``: up
        to that many seconds for it to be done (the channel is muted meanwhile, so no frame
        of an old stream reaches the new host). The proxy port keeps listening."""
        if self._sel is None:
            return
        done = threading.Event()
        self._drops.append(done)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")
        if wait:
            done.wait(wait)

    # the proxy thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        sel = self._sel
        if sel is None:
            return
        while True:
            for key, mask in sel.select():
                if key.fileobj is self.listener:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    self._handle_inbox()
                else:
                    st: _Stream = key.data
                    if mask & _EVENT_WRITE and st.id in self.streams:
                        self._write(st)
                    if mask & _EVENT_READ and st.id in self.streams:
                        self._read(st)

    def _accept(self) -> None:
        if self.listener is None:
            return
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. out of fds: try again on the next readiness
            if len(self.streams) >= MAX_STREAMS:
                conn.close()
                continue
            conn.setblocking(False)
            sid = -next(self._ids)
            st = _Stream(sid, conn)
            self.streams[sid] = st
            self.ch.send(MsgType.TCP_OPEN, sid)
            self._watch(st)

    def _watch(self, st: _Stream) -> None:
        """Watch for what the stream can do now: read within credit, write what is queued."""
        if self._sel is None or st.id not in self.streams:
            return
        events = 0
        if st.credit > 0 and not st.read_eof:
            events |= _EVENT_READ
        if st.out:
            events |= _EVENT_WRITE
        if events == st.events:
            return
        if st.events == 0:
            self._sel.register(st.sock, events, st)
        elif events == 0:
            self._sel.unregister(st.sock)
        else:
            self._sel.modify(st.sock, events, st)
        st.events = events

    def _read(self, st: _Stream) -> None:
        """Sandbox process -> host, within the credit the host grants."""
        try:
            data = st.sock.recv(min(st.credit, TCP_CHUNK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(st, notify=True)
            return
        if not data:
            st.read_eof = True
            self.ch.send(MsgType.TCP_EOF, st.id)
        else:
            st.credit -= len(data)
            self.ch.send(MsgType.TCP_DATA, st.id, data)
        self._watch(st)

    def _write(self, st: _Stream) -> None:
        """Host -> sandbox process; acknowledges what was delivered."""
        if st.out:
            try:
                n = st.sock.send(st.out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._close(st, notify=True)
                return
            if n:
                del st.out[:n]
                self.ch.send(MsgType.TCP_ACK, st.id, n=n)
        if not st.out:
            if st.closing:
                self._close(st, notify=False)
                return
            if st.eof_in and not st.wrote_eof:
                st.wrote_eof = True
                with contextlib.suppress(OSError):
                    st.sock.shutdown(_SHUT_WR)
        self._watch(st)

    def _handle_inbox(self) -> None:
        self._do_inbox()
        while self._drops:
            for st in list(self.streams.values()):
                self._close(st, notify=False)
            self._drops.popleft().set()

    def _do_inbox(self) -> None:
        while self._inbox:
            mtype, sid, payload, n = self._inbox.popleft()
            if mtype is MsgType.TCP_DIAL:
                self._dial(sid, n)
                continue
            st = self.streams.get(sid)
            if st is None:
                continue  # already closed here; the host will see (or saw) our TCP_CLOSE
            if mtype is MsgType.TCP_DATA:
                if st.closing or st.eof_in:
                    continue
                st.out += payload
                if len(st.out) > TCP_WINDOW:
                    # The host sent beyond the credit we gave it: not a stream we can serve.
                    self._close(st, notify=True)
                    continue
                self._write(st)  # most writes complete at once; the rest wait for EVENT_WRITE
            elif mtype is MsgType.TCP_EOF:
                st.eof_in = True
                self._write(st)
            elif mtype is MsgType.TCP_CLOSE:
                st.closing = True  # after what is queued is delivered
                self._write(st)
            elif mtype is MsgType.TCP_ACK:
                st.credit = min(st.credit + n, st.window)
                self._watch(st)

    def _dial(self, sid: int, port: int) -> None:
        """Ingress: the host asks for a stream to a port a sandbox process listens on."""
        import socket

        if sid <= 0 or sid in self.streams or not 0 < port < 65536:
            self.ch.send(MsgType.TCP_CLOSE, sid)
            return
        if len(self.streams) >= MAX_STREAMS:
            self.ch.send(MsgType.TCP_CLOSE, sid)
            return
        try:
            # Loopback: refused or accepted at once (a full backlog waits, hence the bound).
            conn = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:
            self.ch.send(MsgType.TCP_CLOSE, sid)
            return
        conn.setblocking(False)
        st = _Stream(sid, conn, INGRESS_WINDOW)  # the host grants ingress downloads more
        self.streams[sid] = st
        self.ch.send(MsgType.TCP_OPEN, sid)
        self._watch(st)

    def _close(self, st: _Stream, notify: bool) -> None:
        if self.streams.pop(st.id, None) is None:
            return
        if st.events and self._sel is not None:
            self._sel.unregister(st.sock)
            st.events = 0
        with contextlib.suppress(OSError):
            st.sock.close()
        st.out.clear()
        if notify:
            self.ch.send(MsgType.TCP_CLOSE, st.id)
