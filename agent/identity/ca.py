"""The embedded signing CA: a self-signed root, or an intermediate issued by the organisation.

The CA key is the most valuable secret on the node, so this module is strict about disk:
the state directory is 0700, key files are 0600 and written atomically (tmp + fsync + rename),
and a key file that anyone but its owner can read is refused rather than used — a key that
may already have leaked must be replaced, not silently trusted.

State directory layout (the directory is dedicated to the CA):
    ca.key   PKCS#8 PEM private key, 0600
    ca.crt   the signing certificate, PEM
    chain.crt  the certificates above it (intermediates, then root), PEM; empty for a root CA
    ca.json  {"format": 1, "trust_domain": ...}; written last, so its absence means an
             interrupted save
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent.fsutil import atomic_write
from agent.identity.spiffeid import InvalidSpiffeId, SpiffeId, TrustDomain

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")
DEFAULT_CA_TTL = dt.timedelta(days=365)
# Backdating notBefore absorbs clock skew between this node and whoever validates its certs.
CLOCK_SKEW = dt.timedelta(seconds=60)

KEY_FILE, CERT_FILE, CHAIN_FILE, META_FILE = "ca.key", "ca.crt", "chain.crt", "ca.json"
_STATE_FORMAT = 1


class CAError(Exception):
    """The CA cannot be created, loaded or used; the message says what to do."""


def generate_private_key(key_type: str) -> PrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type.startswith("rsa-") and key_type in KEY_TYPES:
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise CAError(f"unknown key type {key_type!r}; use one of: {', '.join(KEY_TYPES)}")


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    # Match the hash strength to the key (P-384 → SHA-384), as CA/B and RFC 5480 recommend.
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def key_usage(signs_certificates: bool, key_encipherment: bool = False) -> x509.KeyUsage:
    """keyUsage of a signing CA (keyCertSign and cRLSign only) or of a leaf
    (digitalSignature, and keyEncipherment when asked)."""
    return x509.KeyUsage(
        digital_signature=not signs_certificates,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _spki(key) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The certificate's URI SANs (none without a SAN extension)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca:
        return False
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return True  # RFC 5280 allows KU to be absent; SPIFFE wants it, but we don't own this cert


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


@dataclass(frozen=True)
class SigningCA:
    """A CA that signs X509-SVIDs for one trust domain.

    ``chain`` holds the certificates between ``certificate`` and the root, *excluding* roots;
    ``roots`` are the trust anchors to publish in the bundle. For a self-signed CA,
    ``chain == ()`` and ``roots == (certificate,)``.
    """

    trust_domain: TrustDomain
    certificate: x509.Certificate
    _private_key: PrivateKey = field(repr=False, compare=False)
    chain: tuple[x509.Certificate, ...] = ()
    roots: tuple[x509.Certificate, ...] = ()

    # ------------------------------------------------------------------ creation
    @classmethod
    def generate(
        cls,
        trust_domain: TrustDomain,
        key_type: str = "ec-p256",
        ttl: dt.timedelta = DEFAULT_CA_TTL,
        now: dt.datetime | None = None,
    ) -> SigningCA:
        """A new self-signed root CA for `trust_domain` (URI SAN ``spiffe://<td>``)."""
        if ttl <= dt.timedelta(0):
            raise CAError(f"CA ttl must be positive, got {ttl}")
        now = now or _utcnow()
        key = generate_private_key(key_type)
        serial = x509.random_serial_number()
        # A unique subject per CA generation (serialNumber attribute, as SPIRE does) keeps path
        # building unambiguous while an old and a new root are both in the bundle.
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "credless"),
                x509.NameAttribute(NameOID.COMMON_NAME, "credless CA"),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, format(serial, "x")[:32]),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ttl)
            # pathLen 0: this root signs leaf SVIDs only, never further CAs.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(key_usage(signs_certificates=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            # X509-SVID.md §4.1: a signing certificate MAY carry the trust domain's ID (no path).
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(trust_domain.id_string())]
                ),
                critical=False,
            )
        )
        cert = builder.sign(key, signature_hash(key))
        return cls(trust_domain, cert, key, (), (cert,))

    @classmethod
    def load_intermediate(
        cls,
        cert_pem: bytes,
        key_pem: bytes,
        chain_pem: bytes,
        *,
        trust_domain: TrustDomain,
        now: dt.datetime | None = None,
    ) -> SigningCA:
        """Use an organisation-issued intermediate CA.

        `chain_pem` holds the certificates above the intermediate, in order, ending with the
        organisation's self-signed root (which becomes the bundle's trust anchor).
        """
        now = now or _utcnow()
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as e:
            raise CAError(f"intermediate certificate is not a PEM certificate: {e}") from None
        try:
            above = x509.load_pem_x509_certificates(chain_pem) if chain_pem.strip() else []
        except ValueError as e:
            raise CAError(f"CA chain is not a list of PEM certificates: {e}") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            raise CAError(
                "the intermediate CA key is encrypted; provide it unencrypted and "
                "protect the file with permissions (chmod 600)"
            ) from None
        except ValueError:
            # Never echo key material: say only what kind of input was expected.
            raise CAError(
                "the intermediate CA key is not a PEM private key (PKCS#8 or traditional EC/RSA)"
            ) from None
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise CAError(f"unsupported CA key type {type(key).__name__}; use EC or RSA")
        ca = cls._assemble(trust_domain, cert, key, above)
        ca.check_usable(now)
        return ca

    @classmethod
    def _assemble(
        cls,
        trust_domain: TrustDomain,
        cert: x509.Certificate,
        key: PrivateKey,
        above: list[x509.Certificate],
    ) -> SigningCA:
        fp = cert.fingerprint(hashes.SHA256()).hex()[:16]
        if not _is_ca(cert):
            raise CAError(
                f"certificate {fp} is not a CA (needs basicConstraints cA=true and "
                "keyUsage keyCertSign); ask your PKI for an intermediate CA certificate"
            )
        if _spki(cert.public_key()) != _spki(key.public_key()):
            raise CAError(
                f"the CA private key does not match certificate {fp}; "
                "check that the key and certificate files belong together"
            )
        for uri in uri_sans(cert):
            try:
                sid = SpiffeId.parse(uri)
            except InvalidSpiffeId as e:
                raise CAError(
                    f"CA certificate {fp} has a URI SAN that is not a SPIFFE ID: {e}"
                ) from None
            if sid.trust_domain != trust_domain or not sid.is_root:
                raise CAError(
                    f"CA certificate {fp} names {uri!r}, but this agent's trust "
                    f"domain is {trust_domain} (a signing CA must name "
                    f"{trust_domain.id_string()!r}, with no path)"
                )
        if _is_self_signed(cert):
            if above:
                raise CAError("a self-signed CA must not come with a chain")
            return cls(trust_domain, cert, key, (), (cert,))
        if not above or not _is_self_signed(above[-1]):
            raise CAError(
                "the CA chain must end with the organisation's self-signed root CA, so "
                "that it can be published as the trust anchor in the bundle"
            )
        child = cert
        for parent in above:
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature):
                raise CAError(
                    f"CA chain is broken: {child.subject.rfc4514_string()!r} is not "
                    f"issued by {parent.subject.rfc4514_string()!r}; list the chain "
                    "from the intermediate's issuer up to the root, in order"
                ) from None
            child = parent
        return cls(trust_domain, cert, key, tuple(above[:-1]), (above[-1],))

    # ------------------------------------------------------------------ use
    @property
    def is_self_signed(self) -> bool:
        return self.roots == (self.certificate,)

    @property
    def issuing_chain(self) -> tuple[x509.Certificate, ...]:
        """Certificates to send after a leaf SVID: the path up to, but excluding, the root."""
        return () if self.is_self_signed else (self.certificate, *self.chain)

    @property
    def not_after(self) -> dt.datetime:
        """The earliest expiry on the path to the root: no leaf may outlive it."""
        return min(c.not_valid_after_utc for c in (self.certificate, *self.chain, *self.roots))

    def check_usable(self, now: dt.datetime | None = None) -> None:
        now = now or _utcnow()
        for c in (self.certificate, *self.chain, *self.roots):
            fp = c.fingerprint(hashes.SHA256()).hex()[:16]
            if c.not_valid_after_utc <= now:
                raise CAError(
                    f"CA certificate {fp} ({c.subject.rfc4514_string()}) expired at "
                    f"{c.not_valid_after_utc.isoformat()}; issue or generate a new CA"
                )
            if c.not_valid_before_utc > now + CLOCK_SKEW:
                raise CAError(
                    f"CA certificate {fp} is not valid until "
                    f"{c.not_valid_before_utc.isoformat()}; check the system clock"
                )

    def public_key(self):
        return self._private_key.public_key()

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign a certificate with the CA key (the key itself never leaves this object)."""
        return builder.sign(self._private_key, signature_hash(self._private_key))

    # ------------------------------------------------------------------ persistence
    def save(self, state_dir: str | os.PathLike[str]) -> None:
        d = Path(state_dir)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The directory is dedicated to CA state; tighten it if someone created it loosely.
        if stat.S_IMODE(d.stat().st_mode) & 0o077:
            os.chmod(d, 0o700)
        pem = serialization.Encoding.PEM
        key_pem = self._private_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic_write(d / KEY_FILE, key_pem, 0o600)
        atomic_write(d / CERT_FILE, self.certificate.public_bytes(pem), 0o644)
        chain = (
            b""
            if self.is_self_signed
            else b"".join(c.public_bytes(pem) for c in (*self.chain, *self.roots))
        )
        atomic_write(d / CHAIN_FILE, chain, 0o644)
        meta = {"format": _STATE_FORMAT, "trust_domain": self.trust_domain.name}
        atomic_write(d / META_FILE, json.dumps(meta).encode() + b"\n", 0o644)

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str]) -> SigningCA:
        d = Path(state_dir)
        meta_path = d / META_FILE
        if not meta_path.exists():
            if (d / KEY_FILE).exists():
                raise CAError(
                    f"incomplete CA state in {d} ({META_FILE} missing): a save was "
                    f"interrupted; move {d} aside to create a new CA"
                )
            raise CAError(f"no CA in {d}")
        dmode = stat.S_IMODE(d.stat().st_mode)
        if dmode & 0o022:
            raise CAError(
                f"CA directory {d} is writable by group or others (mode {dmode:o}); "
                f"run: chmod 700 {d}"
            )
        try:
            meta = json.loads(meta_path.read_text())
            td = TrustDomain(meta["trust_domain"])
            if meta.get("format") != _STATE_FORMAT:
                raise ValueError(f"unsupported format {meta.get('format')!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise CAError(f"{meta_path} is not valid CA metadata ({e})") from None
        key_pem = _read_private_file(d / KEY_FILE)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise CAError(f"{d / KEY_FILE} is not an unencrypted PEM private key") from None
        try:
            cert = x509.load_pem_x509_certificate((d / CERT_FILE).read_bytes())
            chain_pem = (d / CHAIN_FILE).read_bytes() if (d / CHAIN_FILE).exists() else b""
            above = x509.load_pem_x509_certificates(chain_pem) if chain_pem.strip() else []
        except (OSError, ValueError) as e:
            raise CAError(f"cannot read the CA certificates in {d}: {e}") from None
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise CAError(f"unsupported CA key type in {d / KEY_FILE}; use EC or RSA")
        return cls._assemble(td, cert, key, above)

    @classmethod
    def load_or_create(
        cls,
        state_dir: str | os.PathLike[str],
        trust_domain: TrustDomain,
        key_type: str = "ec-p256",
        ttl: dt.timedelta = DEFAULT_CA_TTL,
    ) -> SigningCA:
        """Load the CA in `state_dir`, or generate and save a self-signed one if there is none."""
        d = Path(state_dir)
        if not (d / META_FILE).exists() and not (d / KEY_FILE).exists():
            ca = cls.generate(trust_domain, key_type=key_type, ttl=ttl)
            ca.save(d)
            return ca
        ca = cls.load(d)
        if ca.trust_domain != trust_domain:
            raise CAError(
                f"the CA in {d} is for trust domain {ca.trust_domain}, but the configured trust "
                f"domain is {trust_domain}. Either fix trust_domain in the configuration, or move "
                f"{d} aside to create a new CA (every SVID issued so far then stops validating)"
            )
        ca.check_usable()
        return ca


def _read_private_file(path: Path) -> bytes:
    """Read a private key file, refusing one that others can read or that we do not own."""
    try:
        # O_NOFOLLOW + fstat: the checks apply to the very file we read (no symlink, no race).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CAError(
            f"CA key file {path} is missing; restore it or move {path.parent} aside "
            "to create a new CA"
        ) from None
    except OSError as e:
        raise CAError(
            f"cannot open CA key file {path}: {e.strerror} (symlinks are refused)"
        ) from None
    with os.fdopen(fd, "rb") as f:
        problem = private_file_problem(os.fstat(f.fileno()), path)
        if problem:
            raise CAError(f"CA key file {path} {problem}")
        return f.read()


def private_file_problem(st: os.stat_result, path: Path | str) -> str | None:
    """What is wrong with an opened private key file (its fstat): not a regular file, not
    ours, or open to group or others; None when nothing is. Shared by every key file the
    agent keeps (the CA's, the JWT signing keys')."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        return (
            f"is owned by uid {st.st_uid}, not by this agent (uid {os.geteuid()}); "
            f"run: chown {os.geteuid()} {path}"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        return (
            f"is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}); treat the "
            f"key as possibly leaked, and if you are sure it is not, run: chmod 600 {path}"
        )
    return None
