"""TLS for the proxy: origination towards servers, and interception for https workloads.

A workload that speaks https to its MCP server reaches the proxy still speaking TLS. The
proxy terminates it with a leaf certificate for the name the workload asked for (SNI),
minted by a node-local *injection CA* and cached per name, reads and credentials the
request, and originates a fresh TLS connection to the real server, verified as that server's
one trust setting says (agent/oauth/trust.py server_tls(): its ca_file, else
inject.upstream_ca_file, else the system store). The injection CA is separate from the
SPIFFE CA (it only ever vouches for names on this node's loopback path), lives in
<state_dir>/inject-ca (key 0600), and its certificate is exported at <run_dir>/inject-ca.crt
(0644, in a directory workloads can reach, unlike the 0700 state directory) for workloads to
trust (SSL_CERT_FILE, NODE_EXTRA_CA_CERTS). A workload that does not trust it fails its
handshake: it never falls back to plaintext.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.fsutil import atomic_write

CA_TTL = dt.timedelta(days=365)
LEAF_TTL = dt.timedelta(days=1)


class InjectionCA:
    def __init__(
        self,
        state_dir: str | os.PathLike,
        export_path: str | os.PathLike | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ):
        self.dir = Path(state_dir) / "inject-ca"
        self._own_cert_path = self.dir / "ca.crt"
        self._key_path = self.dir / "ca.key"
        self._clock = clock
        # per name: its context, and when to mint its leaf again
        self._contexts: dict[str, tuple[ssl.SSLContext, dt.datetime]] = {}
        self._lock = threading.Lock()
        self._load_or_create()
        self.cert_path = Path(export_path) if export_path else self._own_cert_path
        if export_path:  # the certificate (public) where workloads can read it
            self.cert_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.cert_path, self.cert.public_bytes(serialization.Encoding.PEM), 0o644)

    def _load_or_create(self) -> None:
        if self._key_path.exists():
            if self._key_path.stat().st_mode & 0o077:
                raise PermissionError(
                    f"{self._key_path} is readable by others: chmod 600 {self._key_path}"
                )
            key = serialization.load_pem_private_key(self._key_path.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):  # made below, P-256
                raise ValueError(f"{self._key_path} is not the EC key credless made")
            self._key = key
            self.cert = x509.load_pem_x509_certificate(self._own_cert_path.read_bytes())
            if self.cert.not_valid_after_utc > self._clock() + LEAF_TTL:
                return
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = self._clock()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "credless injection CA"),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, secrets.token_hex(8)),
            ]
        )
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + CA_TTL)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        atomic_write(
            self._key_path,
            self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            0o600,
        )
        atomic_write(self._own_cert_path, self.cert.public_bytes(serialization.Encoding.PEM), 0o644)

    def _leaf(self, name: str) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = self._clock()
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + LEAF_TTL)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return (
            cert.public_bytes(serialization.Encoding.PEM)
            + self.cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )

    def server_context(self, name: str) -> ssl.SSLContext:
        """A TLS server context presenting a leaf for `name`, kept per name and minted again
        at half its leaf's life: a leaf kept for good expired a day after the agent started,
        and every https workload's handshake failed from then on."""
        with self._lock:
            kept = self._contexts.get(name)
            if kept is not None and self._clock() < kept[1]:
                return kept[0]
        renew_at = self._clock() + LEAF_TTL / 2
        chain, key = self._leaf(name)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        # load_cert_chain needs files: a private temp dir, removed at once
        with tempfile.TemporaryDirectory() as d:
            cert_file, key_file = Path(d, "c.pem"), Path(d, "k.pem")
            cert_file.write_bytes(chain)
            atomic_write(key_file, key, 0o600)
            ctx.load_cert_chain(cert_file, key_file)
        with self._lock:
            self._contexts[name] = (ctx, renew_at)
        return ctx
