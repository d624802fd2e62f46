"""Request framing through the gateway: no smuggling, strict heads, clean upstream reuse.

The upstream here is a deliberately naive keep-alive server written on raw sockets: it frames
every request by ``Content-Length`` only (it ignores ``Transfer-Encoding``) and logs each
request it parsed. That is the backend a request-smuggling attack needs: if the gateway ever
forwards bytes it framed differently, the upstream reads part of one request as another and
completes it with the gateway's *next* request, headers and substituted credential included
(issue 17 §1). Every assertion is made from outside the gateway: the upstream's own log and
byte count, what the sandbox-side client reads, the audit rows (DESIGN invariant 3).
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from moat.egress import NetworkPolicy, Secret
from test_egress_support import GatewayFactory, Harness, LocalPKI

pytest_plugins = ["test_egress_support"]  # shared fixtures (servers, PKI, gateway)

VALUE = "sk-live-SMUGGLED-CRED-4b1d9e77"
HOST = "api.example.test"


@dataclass
class CLUpstream:
    """A keep-alive HTTP(S) server that frames requests by Content-Length alone.

    ``/store`` keeps its body; ``/read`` answers everything stored, raw and base64 (an echo
    API); any other path answers its path and Authorization header. ``log`` holds every
    request it parsed (head and body), ``received`` counts every byte it got, ``conns`` the
    connections it accepted.
    """

    ctx: ssl.SSLContext | None
    #: ``/echo/<form>`` answers ``echo(form, value)`` for the Authorization value it got.
    echo: Callable[[str, bytes], tuple[bytes, list[tuple[bytes, bytes]]]] | None = None
    sock: socket.socket = field(init=False)
    log: list[dict[str, Any]] = field(default_factory=list)
    stored: list[bytes] = field(default_factory=list)
    received: int = 0
    conns: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.conns += 1
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _recv(self, s: socket.socket) -> bytes:
        data = s.recv(65536)
        with self._lock:
            self.received += len(data)
        return data

    def _serve(self, raw: socket.socket) -> None:
        try:
            s = self.ctx.wrap_socket(raw, server_side=True) if self.ctx else raw
        except (OSError, ssl.SSLError):
            raw.close()
            return
        s.settimeout(5)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = self._recv(s)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.split(b"\r\n")
                parts = lines[0].split(b" ")
                path = parts[1].decode("latin-1") if len(parts) > 1 else ""
                headers: dict[str, bytes] = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers.setdefault(name.strip().lower().decode("latin-1"), value.strip())
                n = int(headers.get("content-length", b"0") or 0)
                # Naive: wait up to a second for the body, then take what came.
                s.settimeout(1)
                try:
                    while len(buf) < n:
                        data = self._recv(s)
                        if not data:
                            break
                        buf += data
                except TimeoutError:
                    pass
                s.settimeout(5)
                body, buf = buf[:n], buf[n:]
                self.log.append({"path": path, "head": head, "body": body})
                extra: list[tuple[bytes, bytes]] = []
                if path.startswith("/echo/") and self.echo is not None:
                    auth = headers.get("authorization", b"").removeprefix(b"Bearer ")
                    out, extra = self.echo(path[6:], auth)
                elif path == "/store":
                    self.stored.append(body)
                    out = b"stored"
                elif path == "/read":
                    out = json.dumps(
                        {
                            "raw": [b.decode("latin-1") for b in self.stored],
                            "b64": [base64.b64encode(b).decode() for b in self.stored],
                        }
                    ).encode()
                else:
                    auth_value = headers.get("authorization", b"").decode("latin-1")
                    out = json.dumps({"path": path, "auth": auth_value}).encode()
                more = b"".join(b"%s: %s\r\n" % kv for kv in extra)
                s.sendall(
                    b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (more, len(out), out)
                )
        except (OSError, ssl.SSLError):
            return
        finally:
            s.close()

    def stop(self) -> None:
        """Stop accepting, then release the listening socket.

        Closing it while the accept thread is inside ``accept`` freed its fd number for the
        next socket the process made, often the next test module's upstream server: the old
        thread then accepted that server's connections and answered with this module's
        certificate (test_egress_secrets failed with upstream_tls_failed after this module).
        ``shutdown`` wakes ``accept`` (EINVAL) while the fd is still ours; close after join.
        """
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(timeout=10)
        self.sock.close()


@pytest.fixture
def cl_upstream(pki: LocalPKI) -> Iterator[CLUpstream]:
    up = CLUpstream(pki.server_context())
    yield up
    up.stop()


@pytest.fixture
def cl_plain_upstream() -> Iterator[CLUpstream]:
    up = CLUpstream(None)
    yield up
    up.stop()


def _gateway(gateway: GatewayFactory, port: int) -> Harness:
    return gateway(
        NetworkPolicy(allow_out=[f"{HOST}:{port}"]),
        secrets={"API_KEY": Secret(VALUE, hosts=[HOST], template="Bearer {value}")},
    )


class Client:
    """A sandbox-side client: CONNECT through the gateway, TLS trusting only its CA."""

    def __init__(self, h: Harness, port: int) -> None:
        s = socket.create_connection(("127.0.0.1", h.port), timeout=10)
        s.sendall(f"CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        ctx = ssl.create_default_context(cadata=h.gw.ca_cert_pem().decode())
        self.s = ctx.wrap_socket(s, server_hostname=HOST)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def response(self) -> tuple[bytes, bytes] | None:
        """One Content-Length-framed response (head, body), or None at EOF."""
        try:
            while b"\r\n\r\n" not in self.buf:
                data = self.s.recv(65536)
                if not data:
                    return None
                self.buf += data
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            n = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    n = int(value)
            while len(self.buf) < n:
                data = self.s.recv(65536)
                if not data:
                    break
                self.buf += data
            body, self.buf = self.buf[:n], self.buf[n:]
            return head, body
        except (OSError, ssl.SSLError):
            return None

    def close(self) -> None:
        self.s.close()


def _forms(value: str) -> list[bytes]:
    raw = value.encode()
    return [raw, base64.b64encode(raw)[:-4], raw.hex().encode(), raw.upper(), raw.lower()]


def test_cl_te_smuggling_cannot_capture_the_credential(
    gateway: GatewayFactory, cl_upstream: CLUpstream
) -> None:
    """The issue's exploit, end to end: CL+TE smuggles a ``/store`` prefix that the upstream
    would complete with the gateway's next request (substituted Authorization included)."""
    p = cl_upstream.port
    h = _gateway(gateway, p)
    ph = h.gw.placeholders()["API_KEY"]
    smuggled = f"POST /store HTTP/1.1\r\nHost: {HOST}:{p}\r\nContent-Length: 400\r\n\r\n".encode()
    # h11 re-chunks the body as "<hex len>\r\n<data>\r\n0\r\n\r\n": a Content-Length covering
    # just the chunk-size line leaves the smuggled head as the start of a second request.
    size_line = b"%x\r\n" % len(smuggled)
    attack = (
        (
            f"POST /a HTTP/1.1\r\nHost: {HOST}:{p}\r\nContent-Length: {len(size_line)}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + size_line
        + smuggled
        + b"\r\n0\r\n\r\n"
    )
    legit = f"GET /legit HTTP/1.1\r\nHost: {HOST}:{p}\r\nAuthorization: Bearer {ph}\r\n\r\n"

    c = Client(h, p)
    c.send(attack)
    first = c.response()
    try:
        c.send(legit.encode())
        second = c.response()
    except (OSError, ssl.SSLError):
        second = None
    c.close()
    if second is None:  # the connection ended after the refusal: a fresh one for the request
        c = Client(h, p)
        c.send(legit.encode())
        second = c.response()
        c.close()
    time.sleep(1.5)  # let a naive /store finish its body wait
    c = Client(h, p)
    c.send(f"GET /read HTTP/1.1\r\nHost: {HOST}:{p}\r\n\r\n".encode())
    read_back = c.response()
    c.close()

    # Refused as ambiguous framing, before any byte of it went upstream.
    assert first is not None and first[0].startswith(b"HTTP/1.1 400"), first
    assert b"ambiguous_framing" in first[0]
    # Positive control: the legitimate request carried the real value to the bound host.
    legit_logs = [r for r in cl_upstream.log if r["path"] == "/legit"]
    assert len(legit_logs) == 1
    assert f"Bearer {VALUE}".encode() in legit_logs[0]["head"]
    assert second is not None and second[0].startswith(b"HTTP/1.1 200")
    # From the upstream's own log: no other request ever held the value (head or body).
    for rec in cl_upstream.log:
        if rec["path"] != "/legit":
            assert VALUE.encode() not in rec["head"] + rec["body"], rec["path"]
    assert [r["path"] for r in cl_upstream.log if r["path"] != "/read"] == ["/legit"]
    # And the sandbox never reads it back, in any form.
    for resp in (first, second, read_back):
        assert resp is not None
        for form in _forms(VALUE):
            assert form not in resp[0] + resp[1]
    rows = h.audit.query(denied_only=True)
    assert any(r["reason"] == "ambiguous_framing:cl_and_te" for r in rows)


def _head(mode: str, port: int, lines: str, version: str = "1.1") -> bytes:
    target = f"http://{HOST}:{port}/x" if mode == "plain" else "/x"
    return f"POST {target} HTTP/{version}\r\nHost: {HOST}:{port}\r\n{lines}".encode()


# (name, extra header lines (CRLF-terminated) + blank line + body, expected reason prefix)
REFUSED: list[tuple[str, str, str]] = [
    ("cl_and_te", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     "ambiguous_framing"),
    ("te_and_cl", "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
     "ambiguous_framing"),
    ("duplicate_cl", "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", "ambiguous_framing"),
    ("differing_cl", "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", "ambiguous_framing"),
    ("cl_list", "Content-Length: 5, 5\r\n\r\nhello", "ambiguous_framing"),
    ("cl_sign", "Content-Length: +5\r\n\r\nhello", "ambiguous_framing"),
    ("te_not_chunked", "Transfer-Encoding: gzip\r\n\r\nxx", "ambiguous_framing"),
    ("te_chunked_identity", "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
     "ambiguous_framing"),
    ("te_gzip_chunked", "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "ambiguous_framing"),
    ("te_twice", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     "ambiguous_framing"),
    ("te_xchunked", "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", "ambiguous_framing"),
    ("obs_fold", "X-A: a\r\n b\r\nContent-Length: 0\r\n\r\n", "bad_header"),
    ("obs_fold_te", "X-A: a\r\n\tTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "bad_header"),
    ("bare_lf", "X-A: a\nContent-Length: 0\n\n", "bad_header"),
    ("bare_lf_end", "Content-Length: 0\r\n\n", "bad_header"),
    ("space_before_colon", "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", "bad_header"),
    ("name_space", "X A: b\r\nContent-Length: 0\r\n\r\n", "bad_header"),
    ("name_paren", "X(A): b\r\nContent-Length: 0\r\n\r\n", "bad_header"),
    ("name_empty", ": b\r\nContent-Length: 0\r\n\r\n", "bad_header"),
    ("value_nul", "X-A: a\x00b\r\nContent-Length: 0\r\n\r\n", "bad_header"),
    ("value_cr", "X-A: a\rb\r\nContent-Length: 0\r\n\r\n", "bad_header"),
    ("value_ctl", "X-A: a\x1bb\r\nContent-Length: 0\r\n\r\n", "bad_header"),
    ("value_del", "X-A: a\x7fb\r\nContent-Length: 0\r\n\r\n", "bad_header"),
]  # fmt: skip


def _send_and_read(h: Harness, mode: str, port: int, data: bytes) -> bytes:
    if mode == "plain":
        with socket.create_connection(("127.0.0.1", h.port), timeout=10) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out
    c = Client(h, port)
    c.send(data)
    resp = c.response()
    c.close()
    return b"" if resp is None else resp[0] + b"\r\n\r\n" + resp[1]


@pytest.mark.parametrize("mode", ["plain", "tls"])
@pytest.mark.parametrize(("name", "rest", "reason"), REFUSED, ids=[r[0] for r in REFUSED])
def test_ambiguous_or_malformed_request_refused_before_upstream(
    gateway: GatewayFactory,
    cl_upstream: CLUpstream,
    cl_plain_upstream: CLUpstream,
    mode: str,
    name: str,
    rest: str,
    reason: str,
) -> None:
    up = cl_plain_upstream if mode == "plain" else cl_upstream
    h = _gateway(gateway, up.port)
    out = _send_and_read(h, mode, up.port, _head(mode, up.port, rest))
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    assert f"X-Moat-Reason: {reason}:".encode() in out, out[:300]
    time.sleep(0.1)
    assert up.conns == 0 and up.received == 0 and up.log == []
    rows = h.audit.query(denied_only=True)
    assert any(r["reason"].startswith(reason + ":") for r in rows), rows


def test_te_in_http10_refused(gateway: GatewayFactory, cl_plain_upstream: CLUpstream) -> None:
    p = cl_plain_upstream.port
    h = _gateway(gateway, p)
    data = _head("plain", p, "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", version="1.0")
    out = _send_and_read(h, "plain", p, data)
    assert out.startswith(b"HTTP/1.1 400") and b"ambiguous_framing:" in out
    assert cl_plain_upstream.received == 0


@pytest.mark.parametrize("mode", ["plain", "tls"])
def test_valid_framings_pass_with_the_gateways_own_framing(
    gateway: GatewayFactory, cl_upstream: CLUpstream, cl_plain_upstream: CLUpstream, mode: str
) -> None:
    """Positive control: a Content-Length body and a chunked body both arrive whole; the
    upstream sees the gateway's framing (never the client's), one framing header each."""
    up = cl_plain_upstream if mode == "plain" else cl_upstream
    h = _gateway(gateway, up.port)
    out = _send_and_read(h, mode, up.port, _head(mode, up.port, "Content-Length: 5\r\n\r\nhello"))
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    rec = [r for r in up.log if r["path"].endswith("/x")][-1]
    assert rec["body"] == b"hello"
    assert rec["head"].lower().count(b"content-length: 5") == 1
    assert b"transfer-encoding" not in rec["head"].lower()
    out = _send_and_read(
        h,
        mode,
        up.port,
        _head(mode, up.port, "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    )
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    # (this upstream ignores chunked framing: it sees the chunks as another request)
    head = [r for r in up.log if r["path"].endswith("/x")][-1]["head"].lower()
    assert head.count(b"transfer-encoding: chunked") == 1 and b"content-length" not in head


def test_upstream_reused_only_after_a_clean_exchange(
    gateway: GatewayFactory, cl_upstream: CLUpstream
) -> None:
    """Keep-alive to the upstream survives Content-Length exchanges (control), but a chunked
    upload is never followed by another request on the same upstream connection."""
    p = cl_upstream.port
    h = _gateway(gateway, p)
    ph = h.gw.placeholders()["API_KEY"]
    get = f"GET /g HTTP/1.1\r\nHost: {HOST}:{p}\r\nAuthorization: Bearer {ph}\r\n\r\n".encode()
    c = Client(h, p)
    for _ in range(3):
        c.send(get)
        resp = c.response()
        assert resp is not None and resp[0].startswith(b"HTTP/1.1 200")
    assert cl_upstream.conns == 1  # control: clean exchanges keep the upstream alive
    c.send(
        f"POST /c HTTP/1.1\r\nHost: {HOST}:{p}\r\nTransfer-Encoding: chunked\r\n\r\n"
        "3\r\nabc\r\n0\r\n\r\n".encode()
    )
    resp = c.response()
    assert resp is not None and resp[0].startswith(b"HTTP/1.1 200")
    c.send(get)
    resp = c.response()
    assert resp is not None and resp[0].startswith(b"HTTP/1.1 200")
    c.close()
    assert cl_upstream.conns == 2  # the credentialed request after it went on a fresh one
    # (this upstream ignores chunked framing: it reads the chunks as one more request)
    assert [r["path"] for r in cl_upstream.log if r["path"]] == ["/g", "/g", "/g", "/c", "/g"]


# -- encoded reflections of the credential -------------------------------------------------

#: Punctuation that each encoding treats differently: / + & < > " = ~ space-free.
REFLECTED = 'sk_live/4f+Ab&Cd<Ef>"Gh=9z~Q'
UNRELATED = b"UNRELATED canary 12345 &amp; %41 \\u0041 QUJD &#65; <b>ok</b>"


def _b64_at(value: bytes, offset: int, alt: bool = False) -> bytes:
    enc = base64.b64encode(b"x" * offset + value + b"tail")
    return enc.replace(b"+", b"-").replace(b"/", b"_").rstrip(b"=") if alt else enc


def reflected_forms(value: bytes) -> dict[str, bytes]:
    """How an echoing API might spell the value (written independently of the gateway)."""
    from html import escape
    from urllib.parse import quote, quote_plus

    text = value.decode()
    mime = base64.encodebytes(b"y" * 50 + value + b"z" * 50)  # wrapped at 76 columns
    return {
        "raw": value,
        "json": json.dumps(text).encode(),
        "json_slash": json.dumps(text).replace("/", "\\/").encode(),
        "json_u_all": b"".join(b"\\u%04x" % c for c in value),
        "json_u_upper": b"".join(b"\\u%04X" % c for c in value),
        "json_u_mixed": b"".join(
            b"\\u%04x" % c if i % 2 else bytes([c]) for i, c in enumerate(value)
        ),
        "json_go": json.dumps(text)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .encode(),
        "pct_all": b"".join(b"%%%02X" % c for c in value),
        "pct_all_lower": b"".join(b"%%%02x" % c for c in value),
        "pct_partial": quote(text, safe="").encode(),
        "pct_path": quote(text, safe="/").encode(),
        "pct_plus": quote_plus(text).encode(),
        "pct_double": quote(quote(text, safe=""), safe="").encode(),
        "b64_0": _b64_at(value, 0),
        "b64_1": _b64_at(value, 1),
        "b64_2": _b64_at(value, 2),
        "b64url_0": _b64_at(value, 0, True),
        "b64url_1": _b64_at(value, 1, True),
        "b64url_2": _b64_at(value, 2, True),
        "b64_plain": base64.b64encode(value),
        "b64_mime": mime,
        "upper": value.upper(),
        "lower": value.lower(),
        "html": escape(text).encode(),
        "html_dec": b"".join(b"&#%d;" % c for c in value),
        "html_hex": b"".join(b"&#x%X;" % c for c in value),
        "html_dec_zeros": b"".join(b"&#00%d;" % c for c in value),
        "html_mixed": b"".join(
            (b"&#%d;" % c, b"&#x%x;" % c, bytes([c]))[i % 3] for i, c in enumerate(value)
        ),
        "hex": value.hex().encode(),
        "HEX": value.hex().upper().encode(),
        # exact forms with their letter case changed (the guard folds ASCII case too)
        "b32": base64.b32encode(value),
        "b32_lower": base64.b32encode(value).lower(),
        "hex_colon_upper": value.hex(":").upper().encode(),
        "reversed_upper": value[::-1].upper(),
    }


def _leaks(data: bytes, value: bytes) -> list[str]:
    """The forms of ``value`` present in ``data``, decoding what can be decoded."""
    found = [name for name, form in reflected_forms(value).items() if form in data]
    # Belt and braces: base64 / hex / case are also checked by decoding what came back.
    if value.lower() in data.lower():
        found.append("case-insensitive")
    for blob in data.split():
        for dec in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                if value in dec(blob + b"==="):
                    found.append("decoded base64")
            except ValueError:
                pass
    return found


def _auth(ph: str) -> bytes:
    return f"Authorization: Bearer {ph}\r\n\r\n".encode()


def _echo(form: str, value: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    if form == "clte":  # a response framed both ways (the server adds Content-Length)
        return b"5\r\nhello\r\n0\r\n\r\n", [(b"Transfer-Encoding", b"chunked")]
    if form == "gzip":
        import gzip

        return gzip.compress(b"value=" + value), [(b"Content-Encoding", b"gzip")]
    spelled = reflected_forms(value)[form]
    header = spelled.replace(b"\n", b"")
    body = b'{"echo": "' + spelled + b'", "other": "' + UNRELATED + b'"}'
    return body, [(b"X-Echo", header), (b"Location", b"/cb?key=" + header)]


@pytest.fixture
def echo_upstream(pki: LocalPKI) -> Iterator[CLUpstream]:
    up = CLUpstream(pki.server_context(), echo=_echo)
    yield up
    up.stop()


@pytest.mark.parametrize("form", list(reflected_forms(REFLECTED.encode())))
def test_encoded_reflection_never_reaches_the_sandbox(
    gateway: GatewayFactory, echo_upstream: CLUpstream, form: str
) -> None:
    p = echo_upstream.port
    h = gateway(
        NetworkPolicy(allow_out=[f"{HOST}:{p}"]),
        secrets={"API_KEY": Secret(REFLECTED, hosts=[HOST], template="Bearer {value}")},
    )
    ph = h.gw.placeholders()["API_KEY"]
    value = REFLECTED.encode()
    spelled = reflected_forms(value)[form]
    assert _leaks(spelled, value)  # the check itself sees this form (control)
    c = Client(h, p)
    c.send(f"GET /echo/{form} HTTP/1.1\r\nHost: {HOST}:{p}\r\n".encode() + _auth(ph))
    resp = c.response()
    c.close()
    assert resp is not None and resp[0].startswith(b"HTTP/1.1 200"), resp
    # The upstream got the real value (substitution still works) and echoed it back ...
    assert f"Bearer {REFLECTED}".encode() in echo_upstream.log[-1]["head"]
    # ... but no form of it reached the sandbox, in the body or the headers.
    assert _leaks(resp[0] + b"\r\n\r\n" + resp[1], value) == []
    # Positive control: unrelated bytes (entities, escapes, base64 of other data) pass exact,
    # and the body length is unchanged (replacement keeps Content-Length right).
    expected = b'{"echo": "' + spelled + b'", "other": "' + UNRELATED + b'"}'
    assert UNRELATED in resp[1] and len(resp[1]) == len(expected)
    assert resp[1].startswith(b'{"echo": "') and resp[1].endswith(b'"}')


def test_compressed_response_refused_not_passed(
    gateway: GatewayFactory, echo_upstream: CLUpstream
) -> None:
    p = echo_upstream.port
    h = gateway(
        NetworkPolicy(allow_out=[f"{HOST}:{p}"]),
        secrets={"API_KEY": Secret(REFLECTED, hosts=[HOST], template="Bearer {value}")},
    )
    ph = h.gw.placeholders()["API_KEY"]
    c = Client(h, p)
    c.send(f"GET /echo/gzip HTTP/1.1\r\nHost: {HOST}:{p}\r\n".encode() + _auth(ph))
    resp = c.response()
    c.close()
    assert resp is not None and resp[0].startswith(b"HTTP/1.1 502"), resp
    assert b"unscannable_response_encoding" in resp[0]
    # the gateway asked for identity; the upstream ignored it and was refused
    assert b"accept-encoding: identity" in echo_upstream.log[-1]["head"].lower()
    rows = h.audit.query(denied_only=True)
    assert any(r["reason"] == "unscannable_response_encoding" for r in rows)


@pytest.mark.parametrize("matcher_backend", ["hyperscan", "ahocorasick"])
def test_scrubber_catches_every_form_split_at_every_offset(
    monkeypatch: pytest.MonkeyPatch, matcher_backend: str
) -> None:
    """With the hyperscan prefilter and without it (plain ``re``): same result."""
    from moat.egress.reflect import Reflections, Scrubber

    monkeypatch.setenv("MOAT_GUARD_MATCHER", matcher_backend)
    value = REFLECTED.encode()
    matcher = Reflections([value])  # compiled once, as the broker does
    assert matcher.prefiltered == (matcher_backend == "hyperscan")
    for name, form in reflected_forms(value).items():
        blob = b"pre " + form + b" post " + UNRELATED
        for cut in range(1, len(blob)):
            s = Scrubber(matcher)
            out = s.feed(blob[:cut]) + s.feed(blob[cut:]) + s.flush()
            assert len(out) == len(blob) and UNRELATED in out
            assert _leaks(out, value) == [], (name, cut)


def test_pipelined_second_request_is_checked_too(
    gateway: GatewayFactory, cl_upstream: CLUpstream
) -> None:
    """A bad head pipelined behind a good request (same write: it sits in h11's buffer) is
    still checked before h11 parses it; only the good request reaches the upstream."""
    p = cl_upstream.port
    h = _gateway(gateway, p)
    ph = h.gw.placeholders()["API_KEY"]
    good = f"GET /first HTTP/1.1\r\nHost: {HOST}:{p}\r\nAuthorization: Bearer {ph}\r\n\r\n"
    bad = (
        f"POST /second HTTP/1.1\r\nHost: {HOST}:{p}\r\nContent-Length: 4\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    c = Client(h, p)
    c.send((good + bad).encode())
    first, second = c.response(), c.response()
    c.close()
    assert first is not None and first[0].startswith(b"HTTP/1.1 200")
    assert second is not None and second[0].startswith(b"HTTP/1.1 400")
    assert b"ambiguous_framing:cl_and_te" in second[0]
    assert [r["path"] for r in cl_upstream.log] == ["/first"]


def test_pipelined_good_requests_are_both_served(
    gateway: GatewayFactory, cl_upstream: CLUpstream
) -> None:
    """Two good requests in one write (the second's body still on its way) are both served:
    a second head already in h11's buffer is checked without feeding h11 an empty read,
    which h11 takes for the client's end of connection."""
    p = cl_upstream.port
    h = _gateway(gateway, p)
    first = f"GET /first HTTP/1.1\r\nHost: {HOST}:{p}\r\n\r\n"
    second = f"POST /second HTTP/1.1\r\nHost: {HOST}:{p}\r\nContent-Length: 4\r\n\r\nab"
    c = Client(h, p)
    c.send((first + second).encode())
    one = c.response()
    c.send(b"cd")
    two = c.response()
    c.close()
    assert one is not None and one[0].startswith(b"HTTP/1.1 200")
    assert two is not None and two[0].startswith(b"HTTP/1.1 200"), two
    assert [(r["path"], r["body"]) for r in cl_upstream.log] == [
        ("/first", b""),
        ("/second", b"abcd"),
    ]


def test_head_sent_one_byte_at_a_time_passes(
    gateway: GatewayFactory, cl_upstream: CLUpstream
) -> None:
    """Control for the pre-parse buffer: a valid head trickling in byte by byte is served."""
    p = cl_upstream.port
    h = _gateway(gateway, p)
    c = Client(h, p)
    for b in f"POST /slow HTTP/1.1\r\nHost: {HOST}:{p}\r\nContent-Length: 2\r\n\r\nok".encode():
        c.send(bytes([b]))
    resp = c.response()
    c.close()
    assert resp is not None and resp[0].startswith(b"HTTP/1.1 200")
    assert cl_upstream.log[-1]["path"] == "/slow" and cl_upstream.log[-1]["body"] == b"ok"


def test_response_framed_both_ways_ends_its_upstream_connection(
    gateway: GatewayFactory, echo_upstream: CLUpstream
) -> None:
    p = echo_upstream.port
    h = _gateway(gateway, p)
    ph = h.gw.placeholders()["API_KEY"]
    c = Client(h, p)
    c.send(f"GET /echo/clte HTTP/1.1\r\nHost: {HOST}:{p}\r\n".encode() + _auth(ph))
    head = b""
    while not head.endswith(b"0\r\n\r\n"):  # passed on chunked, as h11 read it
        head += c.s.recv(65536)
    assert head.startswith(b"HTTP/1.1 200") and b"hello" in head
    assert b"content-length" not in head.lower()
    c.send(f"GET /after HTTP/1.1\r\nHost: {HOST}:{p}\r\n".encode() + _auth(ph))
    resp = c.response()
    c.close()
    assert resp is not None and resp[0].startswith(b"HTTP/1.1 200")
    assert echo_upstream.conns == 2  # the credentialed request went on a fresh connection
    assert f"Bearer {VALUE}".encode() in echo_upstream.log[-1]["head"]
