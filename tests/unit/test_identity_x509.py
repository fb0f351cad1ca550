"""X509-SVID minting and the embedded CA, checked rule by rule against X509-SVID.md."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.bundle import TrustBundle
from agent.identity.ca import CLOCK_SKEW, KEY_FILE, CAError, SigningCA
from agent.identity.spiffeid import SpiffeId, TrustDomain
from agent.identity.x509svid import (
    X509Svid,
    X509SvidError,
    mint_x509_svid,
    parse_x509_svid,
    renew_at,
)

TD = TrustDomain("example.org")
WORKLOAD = SpiffeId.parse("spiffe://example.org/ns/prod/sa/web")
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def ca() -> SigningCA:
    # minted at NOW, the instant every check here uses: made at the real time instead, its
    # validity began after NOW whenever the module ran more than the skew after import
    return SigningCA.generate(TD, now=NOW)


def ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls)


def verify_chain(svid: X509Svid, roots, when: dt.datetime | None = None) -> list[x509.Certificate]:
    """RFC 5280 path validation with cryptography's verifier (client-auth profile)."""
    builder = verification.PolicyBuilder().store(verification.Store(list(roots)))
    if when:
        builder = builder.time(when)
    verified = builder.build_client_verifier().verify(svid.leaf, list(svid.cert_chain[1:]))
    return verified.chain


def assert_leaf_profile(svid: X509Svid, issuer: x509.Certificate) -> None:
    leaf = svid.leaf
    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(svid.spiffe_id)]
    assert leaf.subject == x509.Name([]) and san.critical  # empty subject => critical SAN
    ku = ext(leaf, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    eku = ext(leaf, x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    ski = ext(leaf, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    assert leaf.issuer == issuer.subject
    issuer_ski = ext(issuer, x509.SubjectKeyIdentifier).value
    assert ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == issuer_ski.digest
    assert leaf.serial_number.bit_length() > 64


def test_leaf_follows_every_svid_rule(ca: SigningCA) -> None:
    svid = mint_x509_svid(ca, WORKLOAD, ttl=600, now=NOW)
    assert_leaf_profile(svid, ca.certificate)
    assert len(svid.cert_chain) == 1  # the root is never sent
    ku = ext(svid.leaf, x509.KeyUsage).value
    assert not ku.key_encipherment and not ku.key_agreement  # EC: digitalSignature only
    assert svid.not_after == NOW + dt.timedelta(seconds=600)
    assert svid.not_before == NOW - CLOCK_SKEW
    assert renew_at(svid) == svid.not_before + (svid.not_after - svid.not_before) / 2
    assert len(verify_chain(svid, ca.roots, when=NOW)) == 2  # minted at NOW


def test_serials_and_keys_are_fresh_per_svid(ca: SigningCA) -> None:
    a, b = mint_x509_svid(ca, WORKLOAD), mint_x509_svid(ca, WORKLOAD)
    assert a.leaf.serial_number != b.leaf.serial_number
    assert a.key_pkcs8_der() != b.key_pkcs8_der()


def test_rsa_leaf_may_have_key_encipherment(ca: SigningCA) -> None:
    svid = mint_x509_svid(ca, WORKLOAD, key_type="rsa-2048")
    assert ext(svid.leaf, x509.KeyUsage).value.key_encipherment
    verify_chain(svid, ca.roots)


def test_dns_names_and_server_verification(ca: SigningCA) -> None:
    svid = mint_x509_svid(ca, WORKLOAD, dns_names=["web.prod.svc"])
    san = ext(svid.leaf, x509.SubjectAlternativeName).value
    assert len(san.get_values_for_type(x509.UniformResourceIdentifier)) == 1
    assert san.get_values_for_type(x509.DNSName) == ["web.prod.svc"]
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(ca.roots)))
        .build_server_verifier(x509.DNSName("web.prod.svc"))
    )
    verifier.verify(svid.leaf, [])
    with pytest.raises(X509SvidError):
        mint_x509_svid(ca, WORKLOAD, dns_names=["bad name"])


def test_not_after_capped_at_ca() -> None:
    short = SigningCA.generate(TD, ttl=dt.timedelta(minutes=30), now=NOW)
    svid = mint_x509_svid(short, WORKLOAD, ttl=7200, now=NOW)
    assert svid.not_after == short.certificate.not_valid_after_utc
    with pytest.raises(X509SvidError, match="expired"):
        mint_x509_svid(short, WORKLOAD, now=NOW + dt.timedelta(hours=1))


def test_refuses_root_id_foreign_domain_and_bad_ttl(ca: SigningCA) -> None:
    with pytest.raises(X509SvidError, match="path"):
        mint_x509_svid(ca, TD.spiffe_id())
    with pytest.raises(X509SvidError, match="trust domain"):
        mint_x509_svid(ca, SpiffeId.parse("spiffe://other.org/w"))
    with pytest.raises(X509SvidError):
        mint_x509_svid(ca, WORKLOAD, ttl=0)


def test_workload_api_encodings_parse_with_py_spiffe(ca: SigningCA) -> None:
    svid = mint_x509_svid(ca, WORKLOAD)
    parsed = spiffe.X509Svid.parse_raw(svid.chain_der(), svid.key_pkcs8_der())
    assert str(parsed.spiffe_id) == str(WORKLOAD)
    assert parsed.leaf == svid.leaf
    bundle = TrustBundle(TD, ca.roots)
    py_bundle = spiffe.X509Bundle.parse_raw(spiffe.TrustDomain("example.org"), bundle.x509_der())
    assert py_bundle.x509_authorities == {ca.certificate}


def test_ca_profile(ca: SigningCA) -> None:
    cert = ca.certificate
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    san = ext(cert, x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == ["spiffe://example.org"]
    assert (
        ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier
        == ext(cert, x509.SubjectKeyIdentifier).value.digest
    )
    assert "_private_key" not in repr(ca)
    assert "PRIVATE KEY" not in repr(ca) and "PRIVATE KEY" not in repr(mint_x509_svid(ca, WORKLOAD))


# ---------------------------------------------------------------- organisation intermediate
def _org_pki(
    uri: str | None = "spiffe://example.org",
    *,
    not_after: dt.datetime | None = None,
    ca_flag: bool = True,
):
    """An org root and an intermediate it issues, built with plain `cryptography`."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Org Root")])
    root_ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(root_ski, critical=False)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "credless node CA")]))
        .issuer_name(root_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(not_after or NOW + dt.timedelta(days=7))
        .add_extension(
            x509.BasicConstraints(ca=ca_flag, path_length=0 if ca_flag else None), critical=True
        )
        .add_extension(
            x509.KeyUsage(not ca_flag, False, False, False, False, ca_flag, ca_flag, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False
        )
    )
    if uri:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    inter = b.sign(root_key, hashes.SHA256())
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return root, inter, key_pem, inter.public_bytes(pem), root.public_bytes(pem)


def test_intermediate_ca_path() -> None:
    root, inter, key_pem, inter_pem, root_pem = _org_pki()
    ca = SigningCA.load_intermediate(inter_pem, key_pem, root_pem, trust_domain=TD)
    assert ca.roots == (root,) and ca.issuing_chain == (inter,)
    svid = mint_x509_svid(ca, WORKLOAD)
    assert svid.cert_chain == (svid.leaf, inter)  # leaf, intermediate; never the root
    assert_leaf_profile(svid, inter)
    assert svid.not_after <= inter.not_valid_after_utc
    assert verify_chain(svid, [root])[-1] == root
    parsed = spiffe.X509Svid.parse_raw(svid.chain_der(), svid.key_pkcs8_der())
    assert len(parsed.cert_chain) == 2
    assert TrustBundle(TD, ca.roots).x509_authorities == (root,)


def test_intermediate_without_uri_san_is_accepted() -> None:
    _, _, key_pem, inter_pem, root_pem = _org_pki(uri=None)
    SigningCA.load_intermediate(inter_pem, key_pem, root_pem, trust_domain=TD)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"uri": "spiffe://other.org"}, "trust domain is example.org"),
        ({"uri": "spiffe://example.org/ca"}, "no path"),
        ({"ca_flag": False}, "not a CA"),
        ({"not_after": NOW - dt.timedelta(hours=1)}, "expired"),
    ],
)
def test_intermediate_rejections(kwargs, match) -> None:
    _, _, key_pem, inter_pem, root_pem = _org_pki(**kwargs)
    with pytest.raises(CAError, match=match):
        SigningCA.load_intermediate(inter_pem, key_pem, root_pem, trust_domain=TD)


def test_intermediate_key_mismatch_and_chain_errors() -> None:
    _, _, key_pem, inter_pem, root_pem = _org_pki()
    _, _, other_key_pem, _, other_root_pem = _org_pki()
    with pytest.raises(CAError, match="does not match") as exc:
        SigningCA.load_intermediate(inter_pem, other_key_pem, root_pem, trust_domain=TD)
    assert "PRIVATE" not in str(exc.value)
    with pytest.raises(CAError, match="chain is broken"):
        SigningCA.load_intermediate(inter_pem, key_pem, other_root_pem, trust_domain=TD)
    with pytest.raises(CAError, match="must end with"):
        SigningCA.load_intermediate(inter_pem, key_pem, b"", trust_domain=TD)
    with pytest.raises(CAError, match="not a PEM private key"):
        SigningCA.load_intermediate(inter_pem, b"garbage", root_pem, trust_domain=TD)


# ---------------------------------------------------------------- persistence
def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_save_load_roundtrip_and_permissions(tmp_path: Path, ca: SigningCA) -> None:
    d = tmp_path / "ca"
    ca.save(d)
    assert _mode(d) == 0o700 and _mode(d / KEY_FILE) == 0o600
    assert not [p for p in d.iterdir() if ".tmp." in p.name]
    loaded = SigningCA.load(d)
    assert loaded.certificate == ca.certificate and loaded.trust_domain == TD
    verify_chain(mint_x509_svid(loaded, WORKLOAD), ca.roots)  # the loaded key really signs


def test_intermediate_save_load_roundtrip(tmp_path: Path) -> None:
    root, inter, key_pem, inter_pem, root_pem = _org_pki(uri=None)
    SigningCA.load_intermediate(inter_pem, key_pem, root_pem, trust_domain=TD).save(tmp_path)
    loaded = SigningCA.load(tmp_path)
    assert loaded.roots == (root,) and loaded.issuing_chain == (inter,)
    assert loaded.trust_domain == TD


def test_refuses_group_readable_key(tmp_path: Path, ca: SigningCA) -> None:
    ca.save(tmp_path)
    key = tmp_path / KEY_FILE
    os.chmod(key, 0o640)
    with pytest.raises(CAError, match=f"chmod 600 {key}"):
        SigningCA.load(tmp_path)
    os.chmod(key, 0o600)
    os.chmod(tmp_path, 0o770)
    with pytest.raises(CAError, match=f"chmod 700 {tmp_path}"):
        SigningCA.load(tmp_path)


def test_refuses_symlinked_key(tmp_path: Path, ca: SigningCA) -> None:
    d = tmp_path / "ca"
    ca.save(d)
    (d / KEY_FILE).rename(tmp_path / "elsewhere.key")
    (d / KEY_FILE).symlink_to(tmp_path / "elsewhere.key")
    with pytest.raises(CAError, match="symlink"):
        SigningCA.load(d)


def test_load_or_create(tmp_path: Path) -> None:
    d = tmp_path / "state" / "ca"
    first = SigningCA.load_or_create(d, TD)
    again = SigningCA.load_or_create(d, TD)
    assert again.certificate == first.certificate
    with pytest.raises(CAError) as exc:
        SigningCA.load_or_create(d, TrustDomain("other.org"))
    msg = str(exc.value)
    assert "example.org" in msg and "other.org" in msg and "move" in msg


def test_interrupted_save_is_reported(tmp_path: Path, ca: SigningCA) -> None:
    ca.save(tmp_path)
    (tmp_path / "ca.json").unlink()
    with pytest.raises(CAError, match="interrupted"):
        SigningCA.load_or_create(tmp_path, TD)


# ---------------------------------------------------------------- reading an SVID received
def test_parse_reads_back_what_was_minted(ca: SigningCA) -> None:
    for key_type in ("ec-p256", "rsa-2048"):
        svid = mint_x509_svid(ca, WORKLOAD, key_type=key_type, dns_names=["web.prod.svc"])
        parsed = parse_x509_svid(svid.chain_der(), svid.key_pkcs8_der())
        assert parsed.spiffe_id == WORKLOAD and parsed.cert_chain == svid.cert_chain
        assert parsed.key_pkcs8_der() == svid.key_pkcs8_der()
        assert (parsed.not_before, parsed.not_after) == (svid.not_before, svid.not_after)


def test_parse_reads_a_chain_through_an_intermediate() -> None:
    _, inter, key_pem, inter_pem, root_pem = _org_pki()
    ca = SigningCA.load_intermediate(inter_pem, key_pem, root_pem, trust_domain=TD)
    svid = mint_x509_svid(ca, WORKLOAD)
    parsed = parse_x509_svid(svid.chain_der(), svid.key_pkcs8_der())
    assert parsed.cert_chain == (svid.leaf, inter) and parsed.spiffe_id == WORKLOAD


def _leaf_signed_by(
    ca: SigningCA, *, uris: list[str], ca_flag: bool = False
) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=1))
        .not_valid_after(NOW + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
    )
    return ca.sign(builder).public_bytes(serialization.Encoding.DER), key


@pytest.mark.parametrize(
    "leaf,match",
    [
        ({"uris": [str(WORKLOAD), "spiffe://example.org/other"]}, "multiple URI SAN"),
        ({"uris": ["spiffe://example.org"]}, "trust domain root"),
        ({"uris": [str(WORKLOAD)], "ca_flag": True}, "CA flag"),
        ({"uris": ["https://web.example"]}, "not a SPIFFE ID"),
    ],
)
def test_parse_refuses_what_the_spec_forbids(ca: SigningCA, leaf: dict, match: str) -> None:
    der, key = _leaf_signed_by(ca, **leaf)
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(X509SvidError, match=match):
        parse_x509_svid(der, pkcs8)


def test_parse_refuses_garbage_without_echoing_the_key(ca: SigningCA) -> None:
    svid = mint_x509_svid(ca, WORKLOAD)
    with pytest.raises(X509SvidError, match="not a valid X509-SVID"):
        parse_x509_svid(b"\x30\x03\x02\x01\x00", svid.key_pkcs8_der())
    with pytest.raises(X509SvidError, match="not a valid X509-SVID"):
        parse_x509_svid(svid.chain_der() + b"\x00", svid.key_pkcs8_der())
    secretish = b"\x30\x82\x01\x00" + b"SECRETKEYBYTES" * 8
    with pytest.raises(X509SvidError, match="not unencrypted PKCS#8 DER") as exc:
        parse_x509_svid(svid.chain_der(), secretish)
    assert "SECRET" not in str(exc.value) and "\\x" not in str(exc.value)
