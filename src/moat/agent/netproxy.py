"""The sandbox's only way out: a local proxy port whose connections travel to the host.

Each TCP connection accepted on 127.0.0.1:<port> becomes a stream of TCP_* frames on the
agent channel; the host's egress gateway speaks HTTP proxy on the other end and decides.
There is no route and no DNS otherwise (DESIGN §3, invariant 2). Flow control is by credit:
a side sends at most TCP_WINDOW bytes the other has not acknowledged.
"""

from __future__ import annotations

import itertools
import os
import queue
import socket
import threading

from moat.agent.channel import Channel
from moat.protocol import CHUNK_SIZE, TCP_WINDOW, MsgType

#: Streams open at once, at most (the host gateway has its own, smaller caps).
MAX_STREAMS = 512
_EOF = b""
_CLOSE = None


class _Stream:
    def __init__(self, sid: int, sock: socket.socket) -> None:
        self.id = sid
        self.sock = sock
        self.credit = TCP_WINDOW  # what we may still send to the host
        self.cv = threading.Condition()
        self.closed = False
        self.out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()


class NetProxy:
    def __init__(self, channel: Channel) -> None:
        self.ch = channel
        self.streams: dict[int, _Stream] = {}
        self.mu = threading.Lock()
        self._ids = itertools.count(1)
        self.listener: socket.socket | None = None

    def setup(self, port: int, ca_path: str, bundle: bytes) -> None:
        """Write the CA bundle where the environment says, then listen on the proxy port."""
        if self.listener is not None:
            return
        os.makedirs(os.path.dirname(ca_path), exist_ok=True)
        tmp = ca_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(bundle)
        os.chmod(tmp, 0o444)
        os.replace(tmp, ca_path)
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(128)
        srv.set_inheritable(False)
        self.listener = srv
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self.listener is not None  # noqa: S101 - set before the thread starts
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.mu:
                if len(self.streams) >= MAX_STREAMS:
                    conn.close()
                    continue
                sid = -next(self._ids)
                st = _Stream(sid, conn)
                self.streams[sid] = st
            self.ch.send(MsgType.TCP_OPEN, sid)
            threading.Thread(target=self._upstream, args=(st,), daemon=True).start()
            threading.Thread(target=self._downstream, args=(st,), daemon=True).start()

    def _upstream(self, st: _Stream) -> None:
        """Sandbox process -> host, within the credit the host grants."""
        try:
            while True:
                with st.cv:
                    while st.credit <= 0 and not st.closed:
                        st.cv.wait()
                    if st.closed:
                        return
                    budget = min(st.credit, CHUNK_SIZE)
                data = st.sock.recv(budget)
                if not data:
                    self.ch.send(MsgType.TCP_EOF, st.id)
                    return
                with st.cv:
                    st.credit -= len(data)
                self.ch.send(MsgType.TCP_DATA, st.id, data)
        except OSError:
            self._close(st, notify=True)

    def _downstream(self, st: _Stream) -> None:
        """Host -> sandbox process; acknowledges what was delivered."""
        while True:
            item = st.out.get()
            if item is _CLOSE:
                self._close(st, notify=False)
                return
            if item == _EOF:
                try:
                    st.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                continue
            try:
                st.sock.sendall(item)
            except OSError:
                self._close(st, notify=True)
                return
            self.ch.send(MsgType.TCP_ACK, st.id, n=len(item))

    def _close(self, st: _Stream, notify: bool) -> None:
        with self.mu:
            if self.streams.pop(st.id, None) is None:
                return
        with st.cv:
            st.closed = True
            st.cv.notify_all()
        try:
            st.sock.close()
        except OSError:
            pass
        st.out.put(_CLOSE)
        if notify:
            self.ch.send(MsgType.TCP_CLOSE, st.id)

    # frames from the host ------------------------------------------------------------------

    def on_frame(self, mtype: MsgType, sid: int, payload: bytes, n: int = 0) -> None:
        with self.mu:
            st = self.streams.get(sid)
        if st is None:
            return  # already closed here; the host will see our TCP_CLOSE
        if mtype is MsgType.TCP_DATA:
            st.out.put(payload)
        elif mtype is MsgType.TCP_EOF:
            st.out.put(_EOF)
        elif mtype is MsgType.TCP_CLOSE:
            st.out.put(_CLOSE)  # after what is queued is delivered
        elif mtype is MsgType.TCP_ACK:
            with st.cv:
                st.credit = min(st.credit + n, TCP_WINDOW)
                st.cv.notify_all()
