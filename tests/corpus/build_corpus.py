"""Build the guard's leak and benign corpora (deterministic from a seed; no typed secrets).

    python tests/corpus/build_corpus.py OUT_DIR   # writes OUT_DIR/leak.jsonl, benign.txt

The tests import this module and build the same corpora in memory. Every secret here is
made by a random generator in the shape of the real thing; every encoded form is made with
the standard library's own encoders (not the guard's), so the guard is checked against an
independent oracle (``leaks``).

The corpora are not checked in: the leak corpus is full of realistic-looking (fake) tokens
and private keys, which secret scanners on a code host would flag or block on push.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import random
import re
import string
import struct
import sys
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus

ALNUM = string.ascii_letters + string.digits
WS_DELETE = str.maketrans("", "", "\t\n\x0b\x0c\r ")


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def secret_values(rng: random.Random) -> list[tuple[str, str]]:
    """Registered values of every shape: tokens, passwords with specials, unicode, long."""
    return [
        (_rand(rng, ALNUM, 32), "API_TOKEN"),
        (_rand(rng, ALNUM, 8), "SHORT_PW"),
        (_rand(rng, ALNUM + "+/=&<>\"'%#?!", 24), "SPECIAL_PW"),
        ("correct horse " + _rand(rng, string.ascii_lowercase, 6) + " staple", "PASSPHRASE"),
        ("pässwörd-" + _rand(rng, ALNUM, 10) + "-日本", "UNICODE_PW"),
        (_rand(rng, ALNUM + "-_", 200), "LONG_TOKEN"),
        (_rand(rng, "0123456789abcdef", 40), "HEX_KEY"),
    ]


def _b64_variants(rng: random.Random, secret: str) -> list[tuple[str, str]]:
    out = []
    for pad in range(3):
        blob = rng.randbytes(pad) + secret.encode() + rng.randbytes(rng.randrange(3))
        std = base64.b64encode(blob).decode()
        out.append((f"base64/{pad}", f"data: {std}"))
        out.append((f"base64url/{pad}", f"token={base64.urlsafe_b64encode(blob).decode()}"))
        wrapped = "\n".join(std[i : i + 76] for i in range(0, len(std), 76))
        out.append((f"base64-wrapped/{pad}", f"-----\n{wrapped}\n-----"))
    return out


def encoded_texts(rng: random.Random, secret: str) -> list[tuple[str, str]]:
    """(form, text containing the secret in that form), each with ordinary output around."""
    forms = [
        ("raw", f"config loaded: value={secret} ok"),
        ("hex", f"dump {secret.encode().hex()} end"),
        ("HEX", f"DUMP {secret.encode().hex().upper()} END"),
        ("url", f"GET /cb?x={quote(secret, safe='')}&y=1"),
        ("url/plus", f"form: a={quote_plus(secret)}"),
        ("json", json.dumps({"user": "bob", "password": secret})),
        ("json/ascii", json.dumps([secret], ensure_ascii=True)),
        ("html", f"<td>{html.escape(secret)}</td>"),
        ("reversed", f"rev: {secret[::-1]}!"),
        ("spaced", "spelled: " + " ".join(secret)),
        ("per-line", "\n".join(secret)),
        ("per-line/crlf", "\r\n".join(secret) + "\r\n"),
        ("tabbed", "\t".join(secret)),
        ("multiline", f"line one\n  {secret}\nline three"),
    ]
    try:
        forms.append(("utf16le", "u16: " + secret.encode("utf-16-le").decode("utf-8")))
        forms.append(("utf16be", "u16: " + secret.encode("utf-16-be").decode("utf-8")))
    except UnicodeDecodeError:
        pass
    return forms + _b64_variants(rng, secret)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _private_keys() -> list[str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    keys: list[tuple[Any, str]] = [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "TraditionalOpenSSL"),
        (ec.generate_private_key(ec.SECP256R1()), "PKCS8"),
        (ed25519.Ed25519PrivateKey.generate(), "OpenSSH"),
    ]
    fmt = serialization.PrivateFormat
    out = []
    for key, name in keys:
        out.append(
            key.private_bytes(
                serialization.Encoding.PEM, getattr(fmt, name), serialization.NoEncryption()
            ).decode()
        )
    return out


def token_cases(rng: random.Random) -> list[tuple[str, str, str]]:
    """(rule, text, the part that must not survive) for secrets moat did not issue."""
    up, low = string.ascii_uppercase, string.ascii_lowercase
    jwt = ".".join(
        [
            _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()),
            _b64url(json.dumps({"sub": _rand(rng, ALNUM, 12), "iat": 1700000000}).encode()),
            _b64url(rng.randbytes(32)),
        ]
    )
    password = _rand(rng, ALNUM, 16)
    cases = [
        ("aws", "AKIA" + _rand(rng, up + "234567", 16)),
        ("aws", "ASIA" + _rand(rng, up + "0123456789", 16)),
        ("github_token", "ghp_" + _rand(rng, ALNUM, 36)),
        ("github_token", "ghs_" + _rand(rng, ALNUM, 36)),
        ("github_pat", "github_pat_" + _rand(rng, ALNUM + "_", 82)),
        ("gitlab_token", "glpat-" + _rand(rng, ALNUM, 20)),
        (
            "slack",
            "xoxb-" + _rand(rng, "0123456789", 11) + "-" + _rand(rng, low + "0123456789", 24),
        ),
        ("stripe", "sk_live_" + _rand(rng, ALNUM, 24)),
        ("openai", "sk-" + _rand(rng, ALNUM, 20) + "T3BlbkFJ" + _rand(rng, ALNUM, 20)),
        ("sendgrid", "SG." + _rand(rng, ALNUM, 22) + "." + _rand(rng, ALNUM, 43)),
        ("google_api_key", "AIza" + _rand(rng, ALNUM, 35)),
        ("anthropic", "sk-ant-api03-" + _rand(rng, ALNUM, 93)),
        ("pypi_token", "pypi-AgEIcHlwaS5vcmc" + _rand(rng, ALNUM, 80)),
        ("telegram_token", _rand(rng, "0123456789", 9) + ":" + _rand(rng, ALNUM, 35)),
        (
            "discord",
            "M" + _rand(rng, ALNUM, 23) + "." + _rand(rng, ALNUM, 6) + "." + _rand(rng, ALNUM, 27),
        ),
        ("twilio", "SK" + _rand(rng, low + "0123456789", 32)),
        ("mailchimp", _rand(rng, low + "0123456789", 32) + "-us12"),
        ("jwt", jwt),
    ]
    out = [(rule, f"export TOKEN={tok}\n", tok) for rule, tok in cases]
    out.append(
        ("basic_auth", f"connecting to postgres://admin:{password}@db.internal:5432/app", password)
    )
    out.append(
        (
            "npm",
            f"//registry.npmjs.org/:_authToken=npm_{_rand(rng, ALNUM, 36)}\n",
            "_authToken=npm_",
        )
    )
    for pem in _private_keys():
        body = pem.strip().splitlines()[2]  # a line of key material
        out.append(("private_key_block", f"$ cat id_key\n{pem}$ ls\n", body))
    return out


def leak_cases(seed: int = 5) -> list[dict[str, Any]]:
    """Every case: registered values (or none), the text, and what must not survive."""
    rng = random.Random(seed)
    cases: list[dict[str, Any]] = []
    values = secret_values(rng)
    for value, label in values:
        for form, text in encoded_texts(rng, value):
            cases.append(
                {
                    "id": f"{label}:{form}",
                    "sensitive": [[value, label]],
                    "text": text,
                    "secret": value,
                    "kind": "exact",
                }
            )
    for rule, text, secret in token_cases(rng):
        cases.append(
            {"id": f"rule:{rule}", "sensitive": [], "text": text, "secret": secret, "kind": "rule"}
        )
    return cases


# -- the independent oracle -------------------------------------------------------------

_B64_RUN = re.compile(r"[A-Za-z0-9+/_\-]{8,}")
_HEX_RUN = re.compile(r"[0-9a-fA-F]{8,}")


def _decoded_b64(text: str) -> list[bytes]:
    out = []
    for run in _B64_RUN.findall(text.translate(WS_DELETE)):
        std = run.replace("-", "+").replace("_", "/")
        for shift in range(4):
            part = std[shift:]
            if len(part) % 4 == 1:
                part = part[:-1]
            part += "=" * (-len(part) % 4)
            try:
                out.append(base64.b64decode(part))
            except binascii.Error:
                continue
    return out


def _decoded_hex(text: str) -> list[bytes]:
    out = []
    for run in _HEX_RUN.findall(text):
        for shift in range(2):
            part = run[shift:]
            out.append(bytes.fromhex(part[: len(part) - len(part) % 2]))
    return out


def leaks(out: str, secret: str) -> bool:
    """Does ``out`` still hold ``secret`` in any form the corpus uses? (oracle, not guard)"""
    raw = secret.encode()
    squeezed = secret.translate(WS_DELETE)
    json_unescaped = (
        re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), out)
        .replace('\\"', '"')
        .replace("\\\\", "\\")
    )
    views = [
        out,
        out[::-1],
        unquote(out),
        unquote_plus(out),
        html.unescape(out),
        json_unescaped,
        out.replace("\0", ""),
    ]
    for view in views:
        if secret in view or squeezed in view.translate(WS_DELETE):
            return True
    blobs = _decoded_b64(out) + _decoded_hex(out)
    return any(raw in blob for blob in blobs)


# -- benign output ------------------------------------------------------------------------


def _png(rng: random.Random, w: int = 16, h: int = 16) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\0" + rng.randbytes(w * 3) for _ in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"tEXt", b"Software\0matplotlib version 3.6.3")
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def benign_lines(seed: int = 7, n: int = 20_000) -> list[str]:
    """Ordinary output of the kinds a sandbox prints (none of it secret)."""
    rng = random.Random(seed)
    makers = [
        lambda: f"{rng.random():.6f},{rng.randint(0, 10**6)},{rng.gauss(0, 1):.4f}",
        lambda: f"{rng.getrandbits(160):040x}",  # git hash
        lambda: (
            "commit "
            + f"{rng.getrandbits(160):040x}"
            + f"\nAuthor: Dev <dev{rng.randint(1, 99)}@example.org>"
        ),
        lambda: "-".join(f"{rng.getrandbits(b):0{b // 4}x}" for b in (32, 16, 16, 16, 48)),  # uuid
        lambda: base64.b64encode(rng.randbytes(rng.randint(16, 90))).decode(),
        lambda: base64.b64encode(_png(rng)).decode()[:300],
        lambda: (
            'Traceback (most recent call last):\n  File "/home/user/main.py", line '
            + str(rng.randint(1, 400))
            + ", in <module>\n    result = compute(data[\"key\"])\nKeyError: 'key'"
        ),
        lambda: (
            "!function(e,t){var n={};function r(o){if(n[o])return n[o].exports}"
            + "r.m=e,r.c=n,r.d=function(e,t,o){r.o(e,t)||Object.defineProperty(e,t,"
            + f"{{enumerable:!0,get:o}})}}}}({rng.randint(0, 9)});"
        ),
        lambda: (
            f"INFO 2024-05-{rng.randint(10, 28)}T12:{rng.randint(10, 59)}:00Z "
            + f"worker-{rng.randint(1, 9)} processed {rng.randint(1, 10**5)} rows"
        ),
        lambda: (
            f"Epoch {rng.randint(1, 50)}/50 - loss: {rng.random():.4f} - acc: {rng.random():.4f}"
        ),
        lambda: (
            f"   {rng.randint(0, 999):>4}  {rng.random():.3e}  {rng.choice(['foo', 'bar', 'baz'])}"
        ),
        lambda: f"https://example.com/api/v1/items?page={rng.randint(1, 99)}&sort=desc",
        lambda: f"sha256:{rng.getrandbits(256):064x}",
        lambda: (
            f"Collecting numpy==1.{rng.randint(20, 26)}.{rng.randint(0, 5)}\n"
            + "  Downloading numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.whl (18.2 MB)"
        ),
    ]
    lines: list[str] = []
    while len(lines) < n:
        lines.extend(rng.choice(makers)().splitlines())
    return lines[:n]


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: build_corpus.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    leak = leak_cases()
    with (out / "leak.jsonl").open("w", encoding="utf-8") as f:
        for case in leak:
            f.write(json.dumps(case, ensure_ascii=True) + "\n")
    (out / "benign.txt").write_text("\n".join(benign_lines()) + "\n", encoding="utf-8")
    print(f"{len(leak)} leak cases and the benign lines written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
