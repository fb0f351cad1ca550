"""The SPIFFE bundle document (SPIFFE_Trust_Domain_and_Bundle.md §4) and its sequence rules."""

from __future__ import annotations

import base64
import json

import pytest
import spiffe
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from agent.identity.bundle import BundleError, TrustBundle, jwk_thumbprint
from agent.identity.ca import SigningCA
from agent.identity.spiffeid import TrustDomain

TD = TrustDomain("example.org")


@pytest.fixture(scope="module")
def parts():
    cas = [
        SigningCA.generate(TD).certificate,
        SigningCA.generate(TD, key_type="rsa-2048").certificate,
    ]
    k1 = ec.generate_private_key(ec.SECP256R1()).public_key()
    k2 = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return cas, {jwk_thumbprint(k1): k1, jwk_thumbprint(k2): k2}


@pytest.fixture
def bundle(parts) -> TrustBundle:
    cas, jwt_keys = parts
    return TrustBundle(TD, cas, jwt_keys, sequence=7, refresh_hint=120)


def test_document_follows_spec(bundle: TrustBundle) -> None:
    doc = json.loads(bundle.to_jwks_json())
    assert doc["spiffe_sequence"] == 7 and doc["spiffe_refresh_hint"] == 120
    x509_keys = [k for k in doc["keys"] if k["use"] == "x509-svid"]
    jwt_keys = [k for k in doc["keys"] if k["use"] == "jwt-svid"]
    assert len(x509_keys) == 2 and len(jwt_keys) == 2 and len(doc["keys"]) == 4
    for k in x509_keys:
        assert "kid" not in k and len(k["x5c"]) == 1
        base64.b64decode(k["x5c"][0], validate=True)  # standard base64 DER (RFC 7517 §4.7)
    assert {k["kty"] for k in x509_keys} == {"EC", "RSA"}
    for k in jwt_keys:
        assert k["kid"] and k["kty"] in ("EC", "RSA")
    for k in doc["keys"]:
        assert "d" not in k  # public only


def test_round_trip(bundle: TrustBundle) -> None:
    back = TrustBundle.from_jwks_json(TD, bundle.to_jwks_json())
    assert back.same_content(bundle) and back.sequence == 7 and back.refresh_hint == 120
    assert list(back.x509_authorities) == list(bundle.x509_authorities)
    assert set(back.jwt_authorities) == set(bundle.jwt_authorities)
    assert TrustBundle.from_jwks_json(TD, bundle.to_jwks_json().encode()).same_content(bundle)


def test_x509_der_and_jwt_jwks_work_with_py_spiffe(bundle: TrustBundle) -> None:
    td = spiffe.TrustDomain("example.org")
    py_x509 = spiffe.X509Bundle.parse_raw(td, bundle.x509_der())
    assert py_x509.x509_authorities == set(bundle.x509_authorities)
    py_jwt = spiffe.JwtBundle.parse(td, bundle.jwt_jwks_json().encode())
    assert set(py_jwt.jwt_authorities) == set(bundle.jwt_authorities)
    assert all("kid" in k for k in json.loads(bundle.jwt_jwks_json())["keys"])


def test_sequence_changes_exactly_when_content_changes(bundle: TrustBundle, parts) -> None:
    cas, jwt_keys = parts
    same = bundle.updated(x509_authorities=list(cas), jwt_authorities=dict(jwt_keys))
    assert same is bundle and same.sequence == 7
    fewer = bundle.updated(jwt_authorities={})
    assert fewer.sequence == 8 and not fewer.jwt_authorities
    again = fewer.updated(x509_authorities=cas[:1])
    assert again.sequence == 9 and len(again.x509_authorities) == 1
    assert again.updated(refresh_hint=60).sequence == 10
    assert bundle.sequence == 7  # the original is immutable
    with pytest.raises((AttributeError, TypeError)):
        bundle.jwt_authorities["x"] = None  # type: ignore[index]


def test_new_seeds_sequence_from_clock() -> None:
    assert TrustBundle.new(TD, now=1_900_000_000.5).sequence == 1_900_000_000


def _doc(*keys, **top) -> str:
    return json.dumps({"spiffe_sequence": 1, "keys": list(keys), **top})


def _jwt_jwk(bundle: TrustBundle) -> dict:
    return next(k for k in json.loads(bundle.to_jwks_json())["keys"] if k["use"] == "jwt-svid")


def _x509_jwk(bundle: TrustBundle) -> dict:
    return next(k for k in json.loads(bundle.to_jwks_json())["keys"] if k["use"] == "x509-svid")


def test_unknown_use_and_kty_are_ignored(bundle: TrustBundle) -> None:
    jwk = _jwt_jwk(bundle)
    doc = _doc(
        {**jwk, "use": "wit-svid"},
        {k: v for k, v in jwk.items() if k != "use"},
        {"kty": "OKP", "use": "jwt-svid", "kid": "ed", "crv": "Ed25519", "x": "AAAA"},
        {**jwk, "use": "sig"},
        jwk,
    )
    parsed = TrustBundle.from_jwks_json(TD, doc)
    assert list(parsed.jwt_authorities) == [jwk["kid"]] and parsed.x509_authorities == ()
    assert parsed.refresh_hint == 300  # absent hint => default


def test_empty_keys_means_everything_revoked() -> None:
    parsed = TrustBundle.from_jwks_json(TD, '{"keys": []}')
    assert parsed.x509_authorities == () and dict(parsed.jwt_authorities) == {}


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda x, j: _doc({**x, "kid": "k"}), "must not have a 'kid'"),
        (
            lambda x, j: _doc({k: v for k, v in j.items() if k != "kid"}),
            "must have a non-empty 'kid'",
        ),
        (lambda x, j: _doc({**x, "x5c": x["x5c"] * 2}), "exactly one"),
        (lambda x, j: _doc({k: v for k, v in x.items() if k != "x5c"}), "exactly one"),
        (lambda x, j: _doc({**x, "x5c": ["bm90IGEgY2VydA=="]}), "not a base64 DER certificate"),
        (
            lambda x, j: _doc({**j, "use": "x509-svid", "kid": None, "x5c": x["x5c"]}),
            "must not have a 'kid'",
        ),
        (lambda x, j: _doc(j, j), "duplicate kid"),
        (lambda x, j: _doc({**j, "d": "AAAA"}), "private key members"),
        (lambda x, j: _doc({"use": "jwt-svid", "kid": "a"}), "'kty' is required"),
        (lambda x, j: _doc({**j, "x": "AAAA"}), "invalid EC key parameters"),
        (lambda x, j: json.dumps({"spiffe_sequence": 1}), "'keys' array"),
        (lambda x, j: _doc(spiffe_sequence=-1), "spiffe_sequence"),
        (lambda x, j: _doc(spiffe_refresh_hint="300"), "spiffe_refresh_hint"),
        (lambda x, j: '{"keys": [], "keys": []}', "duplicate JSON member"),
        (lambda x, j: "{not json", "not valid JSON"),
    ],
)
def test_rejections(bundle: TrustBundle, mutate, match) -> None:
    x, j = _x509_jwk(bundle), _jwt_jwk(bundle)
    if j["kty"] != "EC":
        j = next(
            k
            for k in json.loads(bundle.to_jwks_json())["keys"]
            if k["use"] == "jwt-svid" and k["kty"] == "EC"
        )
    with pytest.raises(BundleError, match=match):
        TrustBundle.from_jwks_json(TD, mutate(x, j))


def test_x5c_must_match_key_parameters(bundle: TrustBundle) -> None:
    x509_keys = [k for k in json.loads(bundle.to_jwks_json())["keys"] if k["use"] == "x509-svid"]
    ec_key = next(k for k in x509_keys if k["kty"] == "EC")
    other = SigningCA.generate(TD).certificate
    ec_key["x5c"] = [base64.b64encode(other.public_bytes(serialization.Encoding.DER)).decode()]
    with pytest.raises(BundleError, match="do not match"):
        TrustBundle.from_jwks_json(TD, _doc(ec_key))


def test_rfc7638_thumbprint_vector() -> None:
    # RFC 7638 §3.1 example key and its thumbprint.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
        "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY"
        "368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0f"
        "M4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    key = RSAAlgorithm.from_jwk({"kty": "RSA", "n": n, "e": "AQAB"})
    assert jwk_thumbprint(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_constructor_checks() -> None:
    with pytest.raises(BundleError):
        TrustBundle(TD, sequence=-1)
    with pytest.raises(BundleError):
        TrustBundle(TD, refresh_hint=0)
    with pytest.raises(BundleError):
        TrustBundle(TD, jwt_authorities={"": ec.generate_private_key(ec.SECP256R1()).public_key()})
