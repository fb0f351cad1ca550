"""X509-SVIDs (X509-SVID.md): minting them from the embedded CA, and reading one received.

Leaf profile, and why:
- Subject: **empty**. The SPIFFE ID is the identity; a subject DN would be a second,
  unchecked name that software might match on instead. RFC 5280 §4.2.1.6 then requires the
  SAN extension to be critical, and it is.
- SAN: exactly one URI (the SPIFFE ID), plus optional DNS names for workloads that serve TLS
  to non-SPIFFE clients.
- keyUsage (critical): digitalSignature; RSA keys also get keyEncipherment (TLS 1.2 RSA key
  transport; the spec allows it). Never keyCertSign/cRLSign.
- basicConstraints cA=false (critical), EKU serverAuth + clientAuth, SKI and AKI.
- Serial: 159 random bits. notBefore is backdated by CLOCK_SKEW; notAfter is capped at the
  earliest expiry on the CA's path, since a leaf cannot be valid longer than its issuers.

The private key is generated per SVID, lives only in memory, and is never written to disk
by this module; it leaves the process only in a Workload API response to the workload
that owns it.

Reading (`parse_x509_svid`) is py-spiffe's `X509Svid.parse_raw`: it splits the DER chain,
parses the PKCS#8 key and checks the leaf and signing-certificate profile. Added here, each
because py-spiffe 0.3 skips it (tests/unit/test_identity_py_spiffe.py shows each): the key
must belong to the leaf; with no subject the SAN must be critical (§3.1); keyUsage must be
critical (§4.3); an EKU, when present, must hold serverAuth and clientAuth (§4.4); a signing
certificate's SPIFFE ID has no path (§3.2); and the leaf's ID must pass credless's own parser
(py-spiffe's lowercases it, accepts a trailing newline). It costs about 4 ms per SVID
(py-spiffe decodes each certificate with pyasn1): fine once per SVID rotation, not per
request. Minting is hand-written: py-spiffe does none.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from spiffe.errors import PySpiffeError
from spiffe.utils.errors import ParsePrivateKeyError

from agent.identity.ca import (
    CLOCK_SKEW,
    PrivateKey,
    SigningCA,
    generate_private_key,
    key_usage,
    uri_sans,
)
from agent.identity.spiffeid import InvalidSpiffeId, SpiffeId

DEFAULT_X509_SVID_TTL = 3600  # seconds


class X509SvidError(ValueError):
    """An X509-SVID cannot be minted as requested, or one received is invalid; the message
    says why (never with key material)."""


@dataclass(frozen=True)
class X509Svid:
    """An X509-SVID: the chain is leaf first, then intermediates, never the root."""

    spiffe_id: SpiffeId
    cert_chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey = field(repr=False)
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def leaf(self) -> x509.Certificate:
        return self.cert_chain[0]

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf certificate (hex): safe to log and audit."""
        return self.leaf.fingerprint(hashes.SHA256()).hex()

    def chain_der(self) -> bytes:
        """Concatenated DER, leaf first: the Workload API's X509SVID.x509_svid field."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.cert_chain)

    def key_pkcs8_der(self) -> bytes:
        """The private key as unencrypted PKCS#8 DER: the Workload API's x509_svid_key field."""
        return self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        return (
            f"X509Svid(spiffe_id={str(self.spiffe_id)!r}, leaf_sha256={self.fingerprint[:16]}, "
            f"not_after={self.not_after.isoformat()})"
        )


def mint_x509_svid(
    ca: SigningCA,
    spiffe_id: SpiffeId,
    ttl: int | dt.timedelta = DEFAULT_X509_SVID_TTL,
    key_type: str = "ec-p256",
    dns_names: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> X509Svid:
    """Generate a key pair and issue a leaf X509-SVID for `spiffe_id`, signed by `ca`."""
    if isinstance(spiffe_id, str):
        spiffe_id = SpiffeId.parse(spiffe_id)
    if spiffe_id.is_root:
        raise X509SvidError(
            f"{spiffe_id} names a trust domain, not a workload; an X509-SVID needs "
            "an ID with a path (X509-SVID.md §3.1)"
        )
    if spiffe_id.trust_domain != ca.trust_domain:
        raise X509SvidError(
            f"the CA signs for trust domain {ca.trust_domain}, not for "
            f"{spiffe_id.trust_domain} ({spiffe_id})"
        )
    lifetime = ttl if isinstance(ttl, dt.timedelta) else dt.timedelta(seconds=ttl)
    if lifetime <= dt.timedelta(0):
        raise X509SvidError(f"X509-SVID ttl must be positive, got {lifetime}")
    now = now or dt.datetime.now(dt.UTC)
    not_after = min(now + lifetime, ca.not_after)
    if not_after <= now:
        raise X509SvidError(
            f"the CA expired at {ca.not_after.isoformat()}; nothing can be issued "
            "until it is replaced"
        )
    not_before = now - CLOCK_SKEW

    key = generate_private_key(key_type)
    pub = key.public_key()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    for name in dns_names:
        if not name or not name.isascii() or any(c.isspace() for c in name):
            raise X509SvidError(
                f"invalid DNS name {name!r}; use an ASCII (IDNA/punycode) host name"
            )
        sans.append(x509.DNSName(name))
    is_rsa = isinstance(pub, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.certificate.subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # Empty subject ⇒ SAN MUST be critical (RFC 5280 §4.2.1.6, X509-SVID.md §2).
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(signs_certificates=False, key_encipherment=is_rsa), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(_aki(ca.certificate), critical=False)
    )
    leaf = ca.sign(builder)
    return X509Svid(
        spiffe_id,
        (leaf, *ca.issuing_chain),
        key,
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    # Use the issuer's own SKI when it has one (an org CA may compute SKIs differently from
    # RFC 5280 method 1); otherwise derive it from the issuer's key.
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]


def renew_at(svid: X509Svid) -> dt.datetime:
    """When to replace `svid`: half-way through its validity, as SPIRE does.

    Half-life leaves as much time again to retry if the CA or the agent is briefly unhealthy.
    """
    return svid.not_before + (svid.not_after - svid.not_before) / 2


def parse_x509_svid(chain_der: bytes, key_der: bytes) -> X509Svid:
    """An X509-SVID from its Workload API encoding: DER certificates concatenated leaf first,
    and the leaf's private key as unencrypted PKCS#8 DER.

    Checks the SVID itself (X509-SVID.md §3-§4) and that the key is the leaf's; it does not
    validate the path to a trust anchor, which needs the bundle of the ID's trust domain.
    """
    try:
        parsed = spiffe.X509Svid.parse_raw(chain_der, key_der)
    except ParsePrivateKeyError:
        # Never echo key bytes, not even a prefix (the library's text may quote them).
        raise X509SvidError("the private key is not unencrypted PKCS#8 DER") from None
    except (PySpiffeError, ValueError) as e:
        raise X509SvidError(f"not a valid X509-SVID: {e}") from None
    chain = tuple(parsed.cert_chain)
    leaf, key = chain[0], parsed.private_key
    uri = uri_sans(leaf)[0]  # py-spiffe has checked there is exactly one
    try:
        sid = SpiffeId.parse(uri)
    except InvalidSpiffeId as e:
        raise X509SvidError(f"the leaf's URI SAN is not a valid SPIFFE ID: {e}") from None
    what = f"X509-SVID {sid}"
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise X509SvidError(f"{what}: the private key is {type(key).__name__}; expected EC or RSA")
    if key.public_key() != leaf.public_key():
        raise X509SvidError(f"{what}: the private key does not match the leaf certificate")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    if not leaf.subject and not san.critical:
        raise X509SvidError(f"{what}: the leaf has no subject, so its SAN must be critical (§3.1)")
    for i, cert in enumerate(chain):
        role = "the leaf" if i == 0 else f"signing certificate {i}"
        if not cert.extensions.get_extension_for_class(x509.KeyUsage).critical:
            raise X509SvidError(f"{what}: keyUsage of {role} must be critical (§4.3)")
        if i and any(u.startswith("spiffe://") and not _is_root_id(u) for u in uri_sans(cert)):
            raise X509SvidError(
                f"{what}: {role} names a SPIFFE ID with a path; a signing certificate's ID "
                "must be its trust domain's (§3.2)"
            )
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and not {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }.issubset(eku):
        raise X509SvidError(
            f"{what}: the leaf's extendedKeyUsage must include serverAuth and clientAuth (§4.4)"
        )
    return X509Svid(sid, chain, key, leaf.not_valid_before_utc, leaf.not_valid_after_utc)


def _is_root_id(uri: str) -> bool:
    try:
        return SpiffeId.parse(uri).is_root
    except InvalidSpiffeId:
        return False
