"""Where credless uses py-spiffe, and why each hand-written piece left is still needed.

Each "py-spiffe ..." test below shows an input py-spiffe (0.3) accepts or mishandles that the
SPIFFE specs (SPIFFE-ID.md, X509-SVID.md, JWT-SVID.md, the bundle format) forbid, next to
credless refusing it: the reasons given in the docstrings of agent/identity/spiffeid.py,
bundle.py, x509svid.py and jwtsvid.py. The timings are printed (`pytest -s`), never asserted.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import time
import timeit
from dataclasses import FrozenInstanceError

import jwt
import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from spiffe.spiffe_id.spiffe_id import SpiffeIdError, TrustDomainError

from agent.identity.bundle import BundleError, TrustBundle
from agent.identity.ca import SigningCA
from agent.identity.jwt_rotation import JwtSigningKeys
from agent.identity.jwtsvid import JwtSvidError, mint_jwt_svid, validate_jwt_svid
from agent.identity.spiffeid import InvalidSpiffeId, InvalidTrustDomain, SpiffeId, TrustDomain
from agent.identity.x509svid import X509SvidError, mint_x509_svid, parse_x509_svid

TD = TrustDomain("example.org")
PY_TD = spiffe.TrustDomain("example.org")
ID = "spiffe://example.org/ns/prod/sa/web"
AS = "https://as.example"


def per_call_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


# ------------------------------------------------------------------ SPIFFE IDs (spiffeid.py)
def test_our_ids_are_py_spiffe_ids_and_its_methods_read_them() -> None:
    # Guards the py-spiffe field names spiffeid.py fills in directly.
    sid = SpiffeId.parse(ID)
    assert isinstance(sid, spiffe.SpiffeId) and isinstance(sid.trust_domain, spiffe.TrustDomain)
    assert spiffe.SpiffeId.__str__(sid) == ID == str(sid)
    assert spiffe.SpiffeId(ID) == sid and sid == spiffe.SpiffeId(ID)
    assert hash(spiffe.SpiffeId(ID)) == hash(sid)
    assert sid.trust_domain == PY_TD and PY_TD.__eq__(sid.trust_domain) and hash(PY_TD) == hash(TD)
    assert sid.trust_domain.as_spiffe_id() == "spiffe://example.org" == TD.id_string()
    assert sid.trust_domain.name == "example.org" and sid.path == "/ns/prod/sa/web"
    assert SpiffeId(TD, "/a").path == "/a" and str(SpiffeId(TD, "/a")) == "spiffe://example.org/a"
    # py-spiffe's containers take them as they are.
    bundles = spiffe.X509BundleSet.of([spiffe.X509Bundle(TD, None)])
    assert bundles.get_bundle_for_trust_domain(PY_TD) is not None
    assert spiffe.X509BundleSet.of([spiffe.X509Bundle(PY_TD, None)]).get_bundle_for_trust_domain(
        sid.trust_domain
    )
    with pytest.raises(SpiffeIdError):  # py-spiffe's except clauses catch our errors
        SpiffeId.parse("spiffe://example.org/a//b")
    with pytest.raises(TrustDomainError):
        TrustDomain("example.org:443")
    assert issubclass(InvalidTrustDomain, InvalidSpiffeId)


LONG_PATH = "spiffe://example.org/" + "a" * 2048
LONG_TD = "spiffe://" + "a" * 256 + "/web"


@pytest.mark.parametrize(
    "value,py_spiffe_reads,rule",
    [
        ("spiffe://example.org/web\n", "spiffe://example.org/web\n", "path-char"),
        ("spiffe://example.org\n", "spiffe://example.org\n", "td-char"),
        (LONG_PATH, LONG_PATH, "too-long"),
        (LONG_TD, LONG_TD, "td-too-long"),
        ("spiffe://Example.org/web", "spiffe://example.org/web", "td-uppercase"),
        ("SPIFFE://example.org/web", "spiffe://example.org/web", "scheme-uppercase"),
    ],
    ids=["path-newline", "td-newline", "id-over-2048", "td-over-255", "td-upper", "scheme-upper"],
)
def test_py_spiffe_accepts_ids_the_spec_forbids(
    value: str, py_spiffe_reads: str, rule: str
) -> None:
    assert str(spiffe.SpiffeId(value)) == py_spiffe_reads
    with pytest.raises(InvalidSpiffeId) as exc:
        SpiffeId.parse(value)
    assert exc.value.rule == rule


def test_py_spiffe_trust_domain_drops_a_path_unseen() -> None:
    assert spiffe.TrustDomain("spiffe://example.org/ns/prod").name == "example.org"
    with pytest.raises(InvalidTrustDomain) as exc:
        TrustDomain.parse("spiffe://example.org/ns/prod")
    assert exc.value.rule == "td-has-path"


def test_py_spiffe_error_does_not_name_the_rule() -> None:
    with pytest.raises(SpiffeIdError) as theirs:
        spiffe.SpiffeId("spiffe://example.org:8443/web")
    with pytest.raises(InvalidSpiffeId) as ours:
        SpiffeId.parse("spiffe://example.org:8443/web")
    assert "disallowed characters" in str(theirs.value) and ours.value.rule == "port"


def test_equality_with_a_string_and_mutation() -> None:
    theirs, ours = spiffe.SpiffeId(ID), SpiffeId.parse(ID)
    assert theirs == ID and spiffe.TrustDomain("example.org") == "example.org"
    assert ours != ID and TD != "example.org"  # only a parsed ID equals an ID
    theirs._path = "/admin"  # py-spiffe's objects can be changed under their holders
    assert str(theirs) == "spiffe://example.org/admin"
    with pytest.raises(FrozenInstanceError):
        ours._path = "/admin"  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        TD._name = "evil.org"  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        del ours._path


def test_id_parse_timing() -> None:
    ours = per_call_us(lambda: SpiffeId.parse(ID), 5000)
    theirs = per_call_us(lambda: spiffe.SpiffeId(ID), 5000)
    sid = SpiffeId.parse(ID)
    print(
        f"\nSpiffeId.parse {ours:.2f} us, spiffe.SpiffeId() {theirs:.2f} us; "
        f"str(): ours {per_call_us(lambda: str(sid), 20000):.3f} us, "
        f"py-spiffe's {per_call_us(lambda: spiffe.SpiffeId.__str__(sid), 20000):.3f} us"
    )


# ------------------------------------------------------------------ bundles (bundle.py)
@pytest.fixture(scope="module")
def bundle() -> TrustBundle:
    keys = JwtSigningKeys()
    return TrustBundle(TD, [SigningCA.generate(TD).certificate], keys.published(), 3, 60)


def _jwt_key(bundle: TrustBundle) -> dict:
    return next(k for k in json.loads(bundle.to_jwks_json())["keys"] if k["use"] == "jwt-svid")


def _py_parse(doc: object) -> spiffe.JwtBundle:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    return spiffe.JwtBundle.parse(PY_TD, text.encode())


def test_py_spiffe_cannot_read_a_spiffe_bundle_with_a_ca(bundle: TrustBundle) -> None:
    with pytest.raises(spiffe.bundle.jwt_bundle.errors.ParseJWTBundleError):
        _py_parse(bundle.to_jwks_json())  # the x509-svid key has no kid
    ours = TrustBundle.from_jwks_json(TD, bundle.to_jwks_json())
    assert ours.same_content(bundle) and ours.sequence == 3 and ours.refresh_hint == 60


def test_py_spiffe_ignores_use(bundle: TrustBundle) -> None:
    wit = {**_jwt_key(bundle), "use": "wit-svid"}  # not a JWT-SVID authority
    assert list(_py_parse({"keys": [wit]}).jwt_authorities) == [wit["kid"]]
    assert dict(TrustBundle.from_jwks_json(TD, json.dumps({"keys": [wit]})).jwt_authorities) == {}


@pytest.mark.parametrize(
    "doc,match",
    [
        (lambda j: {"keys": [{**j, "kid": "bad", "x": "AAAA"}, j]}, "invalid EC key parameters"),
        (lambda j: {"keys": [j, {**j}]}, "duplicate kid"),
        (lambda j: f'{{"keys": [{json.dumps(j)}], "keys": []}}', "duplicate JSON member"),
    ],
    ids=["malformed-key-dropped", "duplicate-kid-overwrites", "duplicate-member-overwrites"],
)
def test_py_spiffe_reads_an_ambiguous_jwks_silently(bundle: TrustBundle, doc, match) -> None:
    document = doc(_jwt_key(bundle))
    _py_parse(document)  # no error: one reading is picked without a word
    text = document if isinstance(document, str) else json.dumps(document)
    with pytest.raises(BundleError, match=match):
        TrustBundle.from_jwks_json(TD, text)


# ------------------------------------------------------------------ JWT-SVIDs (jwtsvid.py)
@pytest.fixture(scope="module")
def keys() -> JwtSigningKeys:
    return JwtSigningKeys()  # real clock: py-spiffe can only check against the wall clock


def _py_bundle(keys: JwtSigningKeys) -> spiffe.JwtBundle:
    return _py_parse(TrustBundle(TD, (), keys.published()).jwt_jwks_json())


def _signed(keys: JwtSigningKeys, claims: dict | None = None, **headers) -> str:
    now = int(time.time())
    k = keys.current()
    payload = {"sub": ID, "aud": AS, "iat": now, "exp": now + 60, **(claims or {})}
    return jwt.encode(payload, k.private_key, algorithm=k.alg, headers={"kid": k.kid, **headers})


@pytest.mark.parametrize(
    "header", [{"jku": "https://evil/jwks"}, {"x5u": "https://evil/"}, {"cty": "JWT"}]
)
def test_py_spiffe_accepts_forbidden_header_parameters(keys: JwtSigningKeys, header) -> None:
    token = _signed(keys, **header)
    spiffe.JwtSvid.parse_and_validate(token, _py_bundle(keys), {AS})
    with pytest.raises(JwtSvidError, match="not allowed in a JWT-SVID"):
        validate_jwt_svid(token, AS, {TD: keys.published()})


@pytest.mark.parametrize("sub", [ID + "\n", "spiffe://Example.org/ns/prod/sa/web"])
def test_py_spiffe_accepts_a_sub_the_spec_forbids(keys: JwtSigningKeys, sub: str) -> None:
    token = _signed(keys, {"sub": sub})
    parsed = spiffe.JwtSvid.parse_and_validate(token, _py_bundle(keys), {AS})
    assert str(parsed.spiffe_id) == sub.replace("Example", "example")
    with pytest.raises(JwtSvidError, match="not a SPIFFE ID"):
        validate_jwt_svid(token, AS, {TD: keys.published()})


def test_py_spiffe_cannot_be_given_the_time(keys: JwtSigningKeys) -> None:
    params = inspect.signature(spiffe.JwtSvid.parse_and_validate).parameters
    assert "now" not in params and "leeway" not in params
    token = mint_jwt_svid(keys, SpiffeId.parse(ID), [AS], ttl=60).token
    later = time.time() + 3600  # e.g. a test, or a replay checked against a recorded time
    spiffe.JwtSvid.parse_and_validate(token, _py_bundle(keys), {AS})
    with pytest.raises(JwtSvidError, match="expired"):
        validate_jwt_svid(token, AS, {TD: keys.published()}, now=later)
    validate_jwt_svid(token, AS, {TD: keys.published()}, now=later - 3545, leeway=10)


def test_jwt_validation_timing(keys: JwtSigningKeys) -> None:
    token = mint_jwt_svid(keys, SpiffeId.parse(ID), [AS]).token
    bundles, py_bundle = {TD: TrustBundle(TD, (), keys.published())}, _py_bundle(keys)
    ours = per_call_us(lambda: validate_jwt_svid(token, AS, bundles), 50)
    theirs = per_call_us(lambda: spiffe.JwtSvid.parse_and_validate(token, py_bundle, {AS}), 50)
    print(f"\nvalidate_jwt_svid {ours:.0f} us, spiffe.JwtSvid.parse_and_validate {theirs:.0f} us")


# ------------------------------------------------------------------ X509-SVIDs (x509svid.py)
NOW = dt.datetime.now(dt.UTC)
_ROOT_KEY = ec.generate_private_key(ec.SECP256R1())
_ROOT_NAME = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "root")])
_BOTH = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def _cert(
    key, issuer_key, issuer_name, *, ca: bool, uri: str | None, ku_critical=True, eku=_BOTH, **more
):
    """A certificate shaped like an SVID (leaf or signing), with one knob per rule tested."""
    pub = key.public_key()
    b = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "i")]) if ca else x509.Name([])
        )
        .issuer_name(issuer_name)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=1))
        .not_valid_after(NOW + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(not ca, False, False, False, False, ca, ca, False, False),
            critical=ku_critical,
        )
    )
    if uri:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
            critical=more.get("san_critical", not ca),
        )
    if eku and not ca:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _encode(chain, key) -> tuple[bytes, bytes]:
    der = b"".join(c.public_bytes(serialization.Encoding.DER) for c in chain)
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return der, pkcs8


def _leaf_svid(uri: str = ID, signing_uri: str | None = None, wrong_key=False, **knobs):
    key = ec.generate_private_key(ec.SECP256R1())
    if signing_uri is None:
        chain = [_cert(key, _ROOT_KEY, _ROOT_NAME, ca=False, uri=uri, **knobs)]
    else:
        inter_key = ec.generate_private_key(ec.SECP256R1())
        inter = _cert(inter_key, _ROOT_KEY, _ROOT_NAME, ca=True, uri=signing_uri)
        chain = [_cert(key, inter_key, inter.subject, ca=False, uri=uri, **knobs), inter]
    return _encode(chain, ec.generate_private_key(ec.SECP256R1()) if wrong_key else key)


def test_a_well_formed_svid_passes_both() -> None:
    chain, key = _leaf_svid(signing_uri="spiffe://example.org")
    assert str(spiffe.X509Svid.parse_raw(chain, key).spiffe_id) == ID
    svid = parse_x509_svid(chain, key)
    assert str(svid.spiffe_id) == ID and len(svid.cert_chain) == 2
    assert svid.chain_der() == chain and svid.key_pkcs8_der() == key


@pytest.mark.parametrize(
    "knobs,match",
    [
        ({"wrong_key": True}, "does not match the leaf"),
        ({"ku_critical": False}, "keyUsage of the leaf must be critical"),
        ({"san_critical": False}, "no subject, so its SAN must be critical"),
        ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, "serverAuth and clientAuth"),
        ({"signing_uri": "spiffe://example.org/ca"}, "signing certificate's ID"),
        ({"uri": "spiffe://Example.org/ns/prod/sa/web"}, "td-uppercase"),
        ({"uri": ID + "\n"}, "path-char"),
    ],
    ids=[
        "key-of-another",
        "ku-not-critical",
        "san-not-critical",
        "eku-server-only",
        "ca-id-with-path",
        "upper",
        "newline",
    ],
)
def test_py_spiffe_accepts_x509_svids_the_spec_forbids(knobs: dict, match: str) -> None:
    chain, key = _leaf_svid(**knobs)
    spiffe.X509Svid.parse_raw(chain, key)
    with pytest.raises(X509SvidError, match=match) as exc:
        parse_x509_svid(chain, key)
    assert "PRIVATE" not in str(exc.value)


def test_x509_parse_timing() -> None:
    ca = SigningCA.generate(TD)
    svid = mint_x509_svid(ca, SpiffeId.parse(ID))
    chain, key = svid.chain_der(), svid.key_pkcs8_der()
    ours = per_call_us(lambda: parse_x509_svid(chain, key), 5)
    theirs = per_call_us(lambda: spiffe.X509Svid.parse_raw(chain, key), 5)
    print(f"\nparse_x509_svid {ours:.0f} us (of which spiffe.X509Svid.parse_raw {theirs:.0f} us)")
