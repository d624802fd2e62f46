"""A stdlib HTTP server run INSIDE a sandbox by test_ingress_stream.py
(``python3 sandbox_http_shapes.py PORT``): responses of every framing ingress relays.

- ``/big?n=N``: N random bytes with Content-Length, their SHA-256 in ``X-Sha256`` (HEAD too);
- ``/chunked``: a chunked body of a few pieces;
- ``/short``: says Content-Length 100000, sends 1000 bytes and closes;
- ``/endless``: Content-Length 8 GB of zeros, written as fast as the reader takes them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Shapes(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _big(self, body: bool) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        data = os.urandom(int(query.get("n", ["1000"])[0]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Sha256", hashlib.sha256(data).hexdigest())
        self.end_headers()
        if body:
            for i in range(0, len(data), 65536):
                self.wfile.write(data[i : i + 65536])

    def do_HEAD(self) -> None:
        self._big(body=False)

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == "/big":
            self._big(body=True)
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"one,", b"two," * 1000, b"three"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/short":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"s" * 1000)
            self.wfile.flush()
            self.close_connection = True
        elif path == "/endless":
            self.send_response(200)
            self.send_header("Content-Length", str(8 * 10**9))
            self.end_headers()
            zeros = bytes(1 << 20)
            try:
                while True:
                    self.wfile.write(zeros)
            except OSError:
                pass

    def log_message(self, format: str, *args: object) -> None:
        pass


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Shapes).serve_forever()
