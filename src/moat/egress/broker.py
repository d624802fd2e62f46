"""Credential broker: placeholders inside, values outside, and the per-sandbox CA.

Trust domain: host engine; it holds the only copy of secret values and the CA private key
(DESIGN invariant 3). The sandbox sees a random placeholder per secret and the CA
*certificate*. The gateway intercepts TLS only to hosts a secret is bound to, swaps the
placeholder for the value there, and scrubs the value out of responses. The CA carries an
X.509 name constraint limited to the bound hosts, so even its certificates could not be
used to impersonate any other site inside the sandbox. Responses are scrubbed of every form
of every value (raw, JSON/URL/HTML-escaped, case-changed, base64, hex: :mod:`.reflect`).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import secrets as _random
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from moat.egress.hostport import HostKind
from moat.egress.policy import HostPattern
from moat.egress.reflect import Reflections, Scrubber
from moat.errors import InvalidArgumentError, PolicyError

__all__ = ["PLACEHOLDER_PREFIX", "CertificateAuthority", "Scrubber", "Secret", "SecretBroker"]

PLACEHOLDER_PREFIX = "moat-ph-"
_PLACEHOLDER = re.compile(re.escape(PLACEHOLDER_PREFIX) + r"[0-9a-f]{32}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
_VALUE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$")
_MIN_VALUE = 8
_MAX_VALUE = 8192


@dataclass(frozen=True)
class Secret:
    """A credential the sandbox may *use* on ``hosts`` but never read.

    ``header`` names the request header where the placeholder is replaced (case-insensitive);
    ``None`` means any request header. ``template`` shapes the header's expected value:
    ``"Bearer {value}"`` means the sandbox sends ``Bearer <placeholder>``. The value must be
    8 to 8192 printable ASCII characters (short values would make scrubbing meaningless).
    """

    value: str = field(repr=False)
    hosts: tuple[str, ...] = ()
    header: str | None = "Authorization"
    template: str = "{value}"

    def __init__(
        self,
        value: str,
        hosts: Iterable[str],
        header: str | None = "Authorization",
        template: str = "{value}",
    ) -> None:
        if not isinstance(value, str) or not _VALUE.match(value):
            raise InvalidArgumentError("secret value must be printable ASCII without CR/LF")
        if not _MIN_VALUE <= len(value) <= _MAX_VALUE:
            raise InvalidArgumentError("secret value must be 8 to 8192 characters")
        if isinstance(hosts, str) or not isinstance(hosts, Iterable):
            raise InvalidArgumentError("secret hosts must be a list of host patterns")
        host_list = tuple(hosts)
        if not host_list or len(host_list) > 64:
            raise InvalidArgumentError("a secret must be bound to 1 to 64 hosts")
        for h in host_list:
            try:
                pattern = HostPattern.parse(h)
            except PolicyError as exc:
                raise InvalidArgumentError("invalid secret host pattern") from exc
            if pattern.kind is not HostKind.NAME:
                raise InvalidArgumentError("secrets bind to host names, not addresses")
        if header is not None and (not isinstance(header, str) or not _HEADER.match(header)):
            raise InvalidArgumentError("secret header must be a header name")
        if (
            not isinstance(template, str)
            or template.count("{value}") != 1
            or len(template) > 256
            or not _VALUE.match(template.replace("{value}", "x" * 8))
        ):
            raise InvalidArgumentError("secret template must contain '{value}' exactly once")
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "hosts", host_list)
        object.__setattr__(self, "header", header)
        object.__setattr__(self, "template", template)

    def __repr__(self) -> str:
        return f"Secret(hosts={list(self.hosts)!r}, header={self.header!r}, value=<hidden>)"


@dataclass(frozen=True)
class _Bound:
    handle: str
    placeholder: bytes
    value: bytes
    patterns: tuple[HostPattern, ...]
    header: bytes | None
    template: bytes

    def bound_to(self, host: str) -> bool:
        return any(p.matches_host(host) for p in self.patterns)


class SecretBroker:
    """The secrets of one sandbox: placeholders, bindings, substitution and scrubbing."""

    def __init__(
        self, secrets: Mapping[str, Secret] | None, placeholders: Mapping[str, str] | None = None
    ) -> None:
        """``placeholders``: name -> placeholder to keep (a restored sandbox holds them; see
        moat.egress.identity); a name without a well-formed one draws a fresh one."""
        items = dict(secrets or {})
        kept = dict(placeholders or {})
        if len(items) > 64:
            raise InvalidArgumentError("too many secrets")
        self._bound: list[_Bound] = []
        self._reflections: Reflections | None = None
        self._compiling = threading.Lock()
        for name, secret in items.items():
            if not isinstance(name, str) or not _ENV_NAME.match(name):
                raise InvalidArgumentError("secret names must be environment variable names")
            if not isinstance(secret, Secret):
                raise InvalidArgumentError("secrets must be Secret instances")
            placeholder = kept.get(name, "")
            if not _PLACEHOLDER.fullmatch(placeholder) or any(
                b.placeholder == placeholder.encode() for b in self._bound
            ):  # malformed, or another secret's: one placeholder names one value
                placeholder = PLACEHOLDER_PREFIX + _random.token_hex(16)
            self._bound.append(
                _Bound(
                    handle=name,
                    placeholder=placeholder.encode(),
                    value=secret.value.encode(),
                    patterns=tuple(HostPattern.parse(h) for h in secret.hosts),
                    header=secret.header.lower().encode() if secret.header else None,
                    template=secret.template.encode(),
                )
            )

    def placeholders(self) -> dict[str, str]:
        """Environment variable name -> placeholder, for the sandbox's environment."""
        return {b.handle: b.placeholder.decode() for b in self._bound}

    def bound_hosts(self) -> list[HostPattern]:
        """Every host pattern some secret is bound to."""
        return [p for b in self._bound for p in b.patterns]

    def intercepts(self, host: str) -> bool:
        """Whether the gateway must intercept TLS to ``host`` (some secret is bound to it)."""
        return any(b.bound_to(host) for b in self._bound)

    @property
    def longest_placeholder(self) -> int:
        """Length of the longest placeholder (for overlap buffers)."""
        return max((len(b.placeholder) for b in self._bound), default=0)

    def foreign_placeholders(self, data: bytes, host: str | None) -> list[str]:
        """Handles whose placeholder occurs in ``data`` but are not bound to ``host``.

        ``host=None`` treats every secret as foreign (plain HTTP: never substituted).
        """
        return [
            b.handle
            for b in self._bound
            if b.placeholder in data and (host is None or not b.bound_to(host))
        ]

    def is_bound(self, handle: str, host: str) -> bool:
        """Whether the secret ``handle`` is bound to ``host``."""
        return any(b.handle == handle and b.bound_to(host) for b in self._bound)

    def substitute(
        self, headers: list[tuple[bytes, bytes]], host: str
    ) -> tuple[list[tuple[bytes, bytes]], list[str]]:
        """Swap placeholders for values in the configured headers of a request to ``host``.

        Only secrets bound to ``host`` are substituted, only in their configured header (or
        any header when it is ``None``), and only when the header's whole value is the
        secret's template around the placeholder (``Bearer <placeholder>``): the value can
        leave in exactly one shape. Returns the new headers and the handles used.
        """
        used: list[str] = []
        out: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            lname = name.lower()
            for b in self._bound:
                if b.header not in (None, lname) or not b.bound_to(host):
                    continue
                if value.strip() == b.template.replace(b"{value}", b.placeholder):
                    value = b.template.replace(b"{value}", b.value)
                    if b.handle not in used:
                        used.append(b.handle)
                    break
            out.append((name, value))
        return out, used

    def scrubber(self) -> Scrubber:
        """A fresh streaming scrubber for one response body (every form of every value:
        :mod:`moat.egress.reflect`). The matcher is compiled on first use (cached)."""
        return Scrubber(self.reflections())

    def reflections(self) -> Reflections:
        """The matcher of every form of every value, compiled once (thread-safe: the
        gateway compiles it off the event loop through :meth:`ready`)."""
        with self._compiling:
            if self._reflections is None:
                self._reflections = Reflections(b.value for b in self._bound)
            return self._reflections

    async def ready(self) -> None:
        """Compile the matcher off the event loop if it isn't yet (~0.1 s for short values,
        seconds for long ones; it would stall every connection of the gateway). Call before
        any response is scrubbed; once compiled this costs no thread hop."""
        if self._reflections is None:
            await asyncio.to_thread(self.reflections)

    def scrub(self, data: bytes) -> bytes:
        """Scrub one complete piece of bytes (a header value)."""
        s = self.scrubber()
        return s.feed(data) + s.flush()

    def has_secrets(self) -> bool:
        """Whether any secret is configured."""
        return bool(self._bound)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _take_over(
    saved: tuple[bytes, bytes], subtrees: list[x509.GeneralName]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """A saved CA's key and certificate, if they are a pair, a P-256 CA constrained to
    exactly ``subtrees`` and valid for at least a day more; else None (never raises)."""
    try:
        key = serialization.load_pem_private_key(saved[0], password=None)
        cert = x509.load_pem_x509_certificate(saved[1])
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            return None
        if cert.public_key() != key.public_key():
            return None
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        limits = cert.extensions.get_extension_for_class(x509.NameConstraints).value
        if not basic.ca or basic.path_length != 0 or limits.excluded_subtrees is not None:
            return None
        if set(limits.permitted_subtrees or ()) != set(subtrees):
            return None
        if cert.not_valid_after_utc < _now() + datetime.timedelta(days=1):
            return None
        return key, cert
    except (ValueError, TypeError, x509.ExtensionNotFound):
        return None


class CertificateAuthority:
    """A per-sandbox CA. Its key stays in this object; only the certificate is exported.

    Name-constrained to ``permitted`` host patterns (an X.509 critical extension that
    OpenSSL, Go, NSS and Node enforce), valid for ``days`` days.
    """

    def __init__(
        self,
        common_name: str,
        permitted: Iterable[HostPattern],
        days: int = 30,
        *,
        saved: tuple[bytes, bytes] | None = None,
    ) -> None:
        """``saved``: a CA's PEM key and certificate to take over (a restored sandbox trusts
        it), used only if it is exactly the CA these hosts would get and valid for a day
        more; otherwise a new one is made."""
        names = sorted({p.host for p in permitted})
        # With no bound host the CA may sign nothing: ".invalid" is reserved (RFC 6761).
        subtrees: list[x509.GeneralName] = [x509.DNSName(n) for n in names] or [
            x509.DNSName("invalid")
        ]
        self._days = days
        self._contexts: dict[str, ssl.SSLContext] = {}
        taken = _take_over(saved, subtrees) if saved is not None else None
        if taken is not None:
            self._key, self._cert = taken
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "moat sandbox"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
            ]
        )
        now = _now()
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.NameConstraints(permitted_subtrees=subtrees, excluded_subtrees=None),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )

    def key_pem(self) -> bytes:
        """The CA's private key (PEM): host side only, saved with a checkpoint (0600)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def cert_pem(self) -> bytes:
        """The CA certificate (public) to install inside the sandbox."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, host: str) -> tuple[bytes, bytes]:
        """A leaf certificate and key (PEM) for ``host``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=self._days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem(), key_pem

    def server_context(self, host: str) -> ssl.SSLContext:
        """A server-side TLS context presenting a leaf for ``host`` (cached per host)."""
        ctx = self._contexts.get(host)
        if ctx is not None:
            return ctx
        chain, key = self.issue(host)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        # ssl can only load a key from a file: write it to a private directory and remove
        # it at once (invariant 5: no temp file remains).
        tmp = tempfile.mkdtemp(prefix="moat-ca-")
        try:
            os.chmod(tmp, 0o700)
            cert_path, key_path = Path(tmp, "c.pem"), Path(tmp, "k.pem")
            cert_path.write_bytes(chain)
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
            ctx.load_cert_chain(cert_path, key_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._contexts[host] = ctx
        return ctx
