"""The injection CA (agent/inject/tls.py), found by mutation testing: the key stays private
(0600 in a 0700 directory, refused when others can read it, refused when it is not the EC
key credless made), the certificate is exported for workloads, a CA about to expire is made
again, the CA can only sign leaves (no intermediate), and each leaf verifies, in a real TLS
handshake, for the name it was minted for and no other, with http/1.1 offered by ALPN.

The handshakes run in memory (ssl.MemoryBIO): the proxy's real server context against a
client context that trusts only the exported certificate, as a workload's would."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
import tempfile
import time
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.inject.tls import CA_TTL, LEAF_TTL, InjectionCA

SKEW = dt.timedelta(minutes=5)  # both certificates are backdated for clocks behind ours


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def handshake(
    ca: InjectionCA,
    name: str,
    server_hostname: str | None = None,
    alpn=("h2", "http/1.1"),
    trusted: Path | None = None,
) -> ssl.SSLObject:
    """A workload's TLS handshake with the proxy's server context for `name`, in memory:
    the workload trusts only the exported injection CA certificate and checks the name it
    asked for (server_hostname, default `name`); trusted: another CA file to trust instead.
    Returns the workload's side, handshake done; raises ssl.SSLError
    (SSLCertVerificationError) as the workload's handshake would."""
    client_ctx = ssl.create_default_context(cafile=str(trusted or ca.cert_path))
    client_ctx.set_alpn_protocols(list(alpn))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname or name)
    server = ca.server_context(name).wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    for _ in range(20):
        if not c_done:
            try:
                client.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not s_done:
            try:
                server.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                pass  # the client's alert: its own error is raised below
        c_in.write(s_out.read())
        if c_done and s_done:
            return client
    raise AssertionError("the handshake did not end")


def peer_leaf(client: ssl.SSLObject) -> x509.Certificate:
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@pytest.fixture
def ca(tmp_path: Path) -> InjectionCA:
    return InjectionCA(tmp_path / "state", tmp_path / "run" / "inject-ca.crt")


# ------------------------------------------------------------------ the CA's files


def test_the_key_is_private_and_the_certificate_exported_where_workloads_read_it(tmp_path):
    before = now()
    ca = InjectionCA(tmp_path / "state" / "deep", tmp_path / "run" / "nested" / "ca.pem")
    d = tmp_path / "state" / "deep" / "inject-ca"
    assert ca.dir == d and mode(d) == 0o700
    assert mode(d / "ca.key") == 0o600 and mode(d / "ca.crt") == 0o644
    assert ca.cert_path == tmp_path / "run" / "nested" / "ca.pem"
    assert mode(ca.cert_path) == 0o644
    pem = ca.cert.public_bytes(serialization.Encoding.PEM)
    assert ca.cert_path.read_bytes() == pem == (d / "ca.crt").read_bytes()
    key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == ca.cert.public_key()  # the key is the certificate's
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "ca.key"]
    assert ca.cert.not_valid_before_utc >= before - SKEW


def test_without_an_export_path_the_certificate_is_the_ca_directorys(tmp_path):
    (tmp_path / "state" / "inject-ca").mkdir(parents=True, mode=0o700)  # left by an earlier run
    ca = InjectionCA(tmp_path / "state")
    assert ca.cert_path == tmp_path / "state" / "inject-ca" / "ca.crt"
    assert ca.cert_path.read_bytes() == ca.cert.public_bytes(serialization.Encoding.PEM)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_an_existing_export_directory_is_written_into(tmp_path):
    (tmp_path / "run").mkdir(mode=0o755)
    ca = InjectionCA(tmp_path / "state", tmp_path / "run" / "inject-ca.crt")
    assert (tmp_path / "run" / "inject-ca.crt").read_bytes() == ca.cert.public_bytes(
        serialization.Encoding.PEM
    )


def test_a_restart_keeps_the_ca_workloads_already_trust(tmp_path, ca):
    again = InjectionCA(tmp_path / "state", tmp_path / "run" / "inject-ca.crt")
    assert again.cert == ca.cert
    # leaves minted after the restart verify against the certificate exported before it
    assert peer_leaf(handshake(again, "mcp.example")).issuer == ca.cert.subject


@pytest.mark.parametrize("bits", [0o640, 0o604, 0o620, 0o602])
def test_a_key_others_can_read_or_write_is_refused(tmp_path, ca, bits):
    key = ca.dir / "ca.key"
    key.chmod(bits)
    with pytest.raises(PermissionError, match="chmod 600"):
        InjectionCA(tmp_path / "state")


def test_an_owner_only_mode_other_than_0600_is_not_refused(tmp_path, ca):
    (ca.dir / "ca.key").chmod(0o700)
    assert InjectionCA(tmp_path / "state").cert == ca.cert


def test_a_key_that_is_not_the_ec_key_credless_made_is_refused(tmp_path, ca):
    other = ed25519.Ed25519PrivateKey.generate()
    (ca.dir / "ca.key").write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="not the EC key"):
        InjectionCA(tmp_path / "state")


def _rewrite_ca(ca: InjectionCA, expires: dt.datetime) -> None:
    """The CA's certificate, signed again by its key, now expiring at `expires`."""
    key = serialization.load_pem_private_key((ca.dir / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = (
        x509.CertificateBuilder()
        .subject_name(ca.cert.subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - dt.timedelta(days=400))
        .not_valid_after(expires)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    (ca.dir / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_a_ca_expiring_before_a_leaf_would_is_made_again(tmp_path, ca):
    _rewrite_ca(ca, now() + LEAF_TTL / 2)  # a leaf minted now would outlive it
    old_key = (ca.dir / "ca.key").read_bytes()
    again = InjectionCA(tmp_path / "state", tmp_path / "run" / "inject-ca.crt")
    assert again.cert.not_valid_after_utc > now() + LEAF_TTL
    assert (ca.dir / "ca.key").read_bytes() != old_key and mode(ca.dir / "ca.key") == 0o600
    assert (tmp_path / "run" / "inject-ca.crt").read_bytes() == again.cert.public_bytes(
        serialization.Encoding.PEM
    )  # workloads are given the new one
    assert peer_leaf(handshake(again, "mcp.example")).issuer == again.cert.subject


def test_the_ca_is_judged_and_made_by_the_clock_it_is_given(tmp_path, ca):
    later = now() + CA_TTL - LEAF_TTL / 2  # by this clock, a leaf would outlive the CA
    again = InjectionCA(tmp_path / "state", clock=lambda: later)
    assert again.cert != ca.cert
    assert again.cert.not_valid_before_utc == (later - dt.timedelta(minutes=5)).replace(
        microsecond=0
    )
    assert again.cert.not_valid_after_utc == (later + CA_TTL).replace(microsecond=0)


@pytest.mark.parametrize("left", [LEAF_TTL, LEAF_TTL + dt.timedelta(seconds=1)])
def test_a_ca_is_kept_only_while_it_outlives_a_leaf_minted_now(tmp_path, left):
    made = now().replace(microsecond=0)  # a certificate's times are whole seconds
    first = InjectionCA(tmp_path / "state", clock=lambda: made)
    later = made + CA_TTL - left
    again = InjectionCA(tmp_path / "state", clock=lambda: later)
    assert (again.cert == first.cert) == (left > LEAF_TTL)


def test_a_ca_that_outlives_a_leaf_is_kept(tmp_path, ca):
    _rewrite_ca(ca, now() + 2 * LEAF_TTL)
    kept = (ca.dir / "ca.crt").read_bytes()
    again = InjectionCA(tmp_path / "state")
    assert again.cert.public_bytes(serialization.Encoding.PEM) == kept


# ------------------------------------------------------------------ what the CA may sign


def test_the_ca_signs_leaves_only_and_is_valid_for_its_lifetime(tmp_path):
    t0 = now()
    ca = InjectionCA(tmp_path / "state")
    t1 = now() + dt.timedelta(seconds=1)
    cert = ca.cert
    assert cert.subject == cert.issuer
    cert.verify_directly_issued_by(cert)  # self-signed, by the key on disk
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "credless injection CA"
    )
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0  # no intermediate
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    u = usage.value
    assert u.key_cert_sign and u.crl_sign
    assert not (
        u.digital_signature
        or u.content_commitment
        or u.key_encipherment
        or u.data_encipherment
        or u.key_agreement
    )  # it cannot itself serve TLS or sign anything but certificates
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert t0 - SKEW <= cert.not_valid_before_utc <= t1 - SKEW
    assert t0 + CA_TTL - dt.timedelta(seconds=1) <= cert.not_valid_after_utc <= t1 + CA_TTL


def test_each_node_makes_a_ca_of_its_own_name(tmp_path):
    a, b = InjectionCA(tmp_path / "a"), InjectionCA(tmp_path / "b")
    assert a.cert.subject != b.cert.subject  # a random serialNumber in each
    assert a.cert.serial_number != b.cert.serial_number


def test_the_cas_name_carries_eight_random_bytes_in_hex(tmp_path):
    """The subject's serialNumber is 8 random bytes as 16 lower-case hex digits: enough that
    no two nodes' CAs share a name in a workload's trust store."""
    ca = InjectionCA(tmp_path)
    [serial] = ca.cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    assert isinstance(serial.value, str) and len(serial.value) == 16
    assert set(serial.value) <= set("0123456789abcdef")


@pytest.mark.parametrize("name", ["mcp.example", "localhost", "127.0.0.1", "::1"])
def test_a_leaf_verifies_for_the_name_it_was_made_for(ca, name):
    t0 = now()
    client = handshake(ca, name)
    t1 = now() + dt.timedelta(seconds=1)
    assert client.selected_alpn_protocol() == "http/1.1"
    assert client.version() in ("TLSv1.2", "TLSv1.3")
    leaf = peer_leaf(client)
    leaf.verify_directly_issued_by(ca.cert)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    try:
        expected: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        expected = x509.DNSName(name)
    assert list(san.value) == [expected]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca and basic.value.path_length is None
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert not eku.critical and list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert not aki.critical
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.value.key_identifier == ski.digest
    assert t0 - SKEW <= leaf.not_valid_before_utc <= t1 - SKEW
    assert t0 + LEAF_TTL - dt.timedelta(seconds=1) <= leaf.not_valid_after_utc <= t1 + LEAF_TTL
    assert leaf.public_key() != ca.cert.public_key()  # a key of its own


@pytest.mark.parametrize(
    "name,asked",
    [
        ("mcp.example", "other.example"),
        ("mcp.example", "sub.mcp.example"),
        ("127.0.0.1", "127.0.0.2"),
        ("127.0.0.1", "localhost"),
        ("localhost", "127.0.0.1"),
    ],
)
def test_a_leaf_does_not_verify_for_another_name(ca, name, asked):
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca, name, server_hostname=asked)


def test_a_workload_that_trusts_another_ca_fails_its_handshake(tmp_path, ca):
    other = InjectionCA(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca, "mcp.example", trusted=other.cert_path)


def test_a_name_longer_than_a_common_name_may_be_is_still_served(ca):
    name = "a" * 40 + "." + "b" * 40 + ".example"
    leaf = peer_leaf(handshake(ca, name))
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name[:64]
    assert list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [
        x509.DNSName(name)
    ]


def test_the_server_context_refuses_tls_older_than_1_2(ca):
    ctx = ca.server_context("mcp.example")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE  # workloads are not asked for certificates


def test_a_names_context_is_made_once_and_kept(ca):
    first = ca.server_context("mcp.example")
    assert ca.server_context("mcp.example") is first
    other = ca.server_context("other.example")
    assert other is not first
    assert (
        peer_leaf(handshake(ca, "other.example")).subject
        != peer_leaf(handshake(ca, "mcp.example")).subject
    )


def test_a_leafs_key_is_written_nowhere_but_a_private_directory_removed_at_once(
    tmp_path, ca, monkeypatch
):
    """load_cert_chain needs files: the leaf's key goes to a temporary directory of its own,
    never to the working directory, and nothing of it is left."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR read again
    ca.server_context("mcp.example")
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []
    assert handshake(ca, "mcp.example").selected_alpn_protocol() == "http/1.1"


def test_validity_is_in_utc_whatever_the_nodes_time_zone(tmp_path, monkeypatch):
    """A node whose local time is not UTC still mints a CA and leaves valid from a few
    minutes ago (a local time read as UTC would make them valid hours from now, or expired)."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30, no daylight saving
    time.tzset()
    try:
        t0 = now()
        ca = InjectionCA(tmp_path / "state")
        leaf = peer_leaf(handshake(ca, "mcp.example"))
        t1 = now() + dt.timedelta(seconds=1)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    for cert in (ca.cert, leaf):
        assert t0 - SKEW <= cert.not_valid_before_utc <= t1 - SKEW


def test_the_server_context_is_made_without_deprecated_calls(ca):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ctx = ca.server_context("mcp.example")
    assert ctx.protocol == ssl.PROTOCOL_TLS_SERVER


def test_a_names_leaf_is_minted_again_at_half_its_life(tmp_path):
    """A leaf kept for good expired a day after the agent started, and every https
    workload's handshake failed from then on (found by review, stop 33)."""
    t = [now()]
    ca = InjectionCA(tmp_path / "state", clock=lambda: t[0])
    minted: list[x509.Certificate] = []
    leaf = ca._leaf

    def recording(name: str) -> tuple[bytes, bytes]:
        chain, key = leaf(name)
        minted.append(x509.load_pem_x509_certificates(chain)[0])
        return chain, key

    ca._leaf = recording  # type: ignore[method-assign]
    first = ca.server_context("mcp.example")
    t[0] += LEAF_TTL / 2 - dt.timedelta(seconds=1)
    assert ca.server_context("mcp.example") is first  # kept while young
    t[0] += dt.timedelta(seconds=1)
    again = ca.server_context("mcp.example")
    assert again is not first and ca.server_context("mcp.example") is again
    assert len(minted) == 2
    assert minted[1].not_valid_after_utc == t[0] + LEAF_TTL
    assert minted[1].not_valid_before_utc == t[0] - SKEW
