"""JWT-SVID minting, validation (JWT-SVID.md) and signing-key rotation with overlap."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
import spiffe
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.bundle import TrustBundle, jwk_thumbprint
from agent.identity.jwt_rotation import JwtSigningKeys
from agent.identity.jwtsvid import JwtSvidError, mint_jwt_svid, validate_jwt_svid
from agent.identity.spiffeid import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
SID = SpiffeId.parse("spiffe://example.org/ns/prod/sa/web")
AS = "https://as.example"
T0 = 1_900_000_000.0


class FakeClock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keys(clock: FakeClock) -> JwtSigningKeys:
    return JwtSigningKeys(rotate_every=1000, max_jwt_ttl=300, prepublish=200, clock=clock)


def bundles(keys: JwtSigningKeys) -> dict:
    return {TD: TrustBundle(TD, (), keys.published())}


def b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def claims_for(now: float = T0, **over) -> dict:
    c = {"sub": str(SID), "aud": AS, "iat": int(now), "exp": int(now) + 60}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


# ---------------------------------------------------------------- minting
def test_header_has_exactly_alg_kid_typ(keys: JwtSigningKeys) -> None:
    svid = mint_jwt_svid(keys, SID, [AS])
    header = jwt.get_unverified_header(svid.token)
    assert header == {"alg": "ES256", "kid": keys.current().kid, "typ": "JWT"}
    assert header["kid"] == jwk_thumbprint(keys.current().public_key) == svid.kid


def test_claims(keys: JwtSigningKeys) -> None:
    svid = mint_jwt_svid(keys, SID, [AS], ttl=30)
    c = jwt.decode(svid.token, options={"verify_signature": False})
    assert c["sub"] == str(SID) and c["iss"] == str(SID)
    assert c["aud"] == AS  # one audience => a plain string
    assert c["iat"] == int(T0) == svid.issued_at and c["exp"] == int(T0) + 30 == svid.expires_at
    assert c["jti"] == svid.jti and len(svid.jti) >= 20
    assert set(c) == {"sub", "aud", "exp", "iat", "jti", "iss"}

    two = mint_jwt_svid(
        keys, SID, [AS, "https://other"], iss="client-1", jti=False, extra_claims={"scope": "mcp"}
    )
    c2 = jwt.decode(two.token, options={"verify_signature": False})
    assert c2["aud"] == [AS, "https://other"] and c2["iss"] == "client-1" and c2["scope"] == "mcp"
    assert "jti" not in c2 and two.jti is None
    assert mint_jwt_svid(keys, SID, AS).jti != mint_jwt_svid(keys, SID, AS).jti


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"audience": []}, "audience"),
        ({"audience": [""]}, "audience"),
        ({"ttl": 301}, "max_jwt_ttl"),
        ({"ttl": 0}, "ttl"),
        ({"extra_claims": {"sub": "spiffe://example.org/evil"}}, "extra_claims"),
        ({"spiffe_id": TD.spiffe_id()}, "trust domain"),
    ],
)
def test_mint_refusals(keys: JwtSigningKeys, kwargs, match) -> None:
    args = {"spiffe_id": SID, "audience": [AS], **kwargs}
    with pytest.raises(JwtSvidError, match=match):
        mint_jwt_svid(keys, **args)


def test_repr_never_shows_token(keys: JwtSigningKeys) -> None:
    svid = mint_jwt_svid(keys, SID, [AS])
    for text in (repr(svid), str(svid), f"{svid}", repr(keys.current())):
        assert svid.token not in text and svid.token.split(".")[2] not in text
    assert svid.jti in repr(svid)


# ---------------------------------------------------------------- validation
def test_validate_ok(keys: JwtSigningKeys) -> None:
    svid = mint_jwt_svid(keys, SID, [AS, "https://x"])
    got = validate_jwt_svid(svid.token, AS, bundles(keys), now=T0 + 1)
    assert got.spiffe_id == SID and got.audience == (AS, "https://x") and got.jti == svid.jti
    assert got.kid == svid.kid and got.expires_at == svid.expires_at
    # bundle values may also be plain kid -> key maps, keyed by trust domain name
    validate_jwt_svid(svid.token, AS, {"example.org": keys.published()}, now=T0 + 1)


def _signed(
    keys: JwtSigningKeys, claims: dict, headers: dict | None = None, key=None, alg: str = "ES256"
) -> str:
    k = keys.current()
    return jwt.encode(
        claims, key or k.private_key, algorithm=alg, headers={"kid": k.kid, **(headers or {})}
    )


def _expect_invalid(
    token: str, keys: JwtSigningKeys, match: str, aud: str = AS, now: float = T0 + 1
) -> JwtSvidError:
    with pytest.raises(JwtSvidError, match=match) as exc:
        validate_jwt_svid(token, aud, bundles(keys), now=now)
    assert token not in str(exc.value)
    return exc.value


def test_wrong_audience(keys: JwtSigningKeys) -> None:
    _expect_invalid(mint_jwt_svid(keys, SID, ["https://elsewhere"]).token, keys, "audience")


def test_expired(keys: JwtSigningKeys) -> None:
    svid = mint_jwt_svid(keys, SID, [AS], ttl=30)
    validate_jwt_svid(svid.token, AS, bundles(keys), now=T0 + 29)
    _expect_invalid(svid.token, keys, "expired", now=T0 + 30)
    validate_jwt_svid(svid.token, AS, bundles(keys), now=T0 + 30, leeway=5)


def test_alg_none_refused(keys: JwtSigningKeys) -> None:
    token = f"{b64({'alg': 'none', 'kid': keys.current().kid, 'typ': 'JWT'})}.{b64(claims_for())}."
    _expect_invalid(token, keys, "alg 'none' is not allowed")


def test_hs256_refused(keys: JwtSigningKeys) -> None:
    token = jwt.encode(
        claims_for(), "s" * 64, algorithm="HS256", headers={"kid": keys.current().kid}
    )
    _expect_invalid(token, keys, "alg 'HS256' is not allowed")


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"cty": "JWT"}, "not allowed in a JWT-SVID"),
        ({"x5u": "https://evil/"}, "not allowed in a JWT-SVID"),
        ({"jku": "https://evil/jwks"}, "not allowed in a JWT-SVID"),
        ({"crit": ["exp"]}, "critical"),  # PyJWT already refuses unknown crit while parsing
    ],
)
def test_extra_header_parameter_refused(keys: JwtSigningKeys, extra: dict, match: str) -> None:
    _expect_invalid(_signed(keys, claims_for(), extra), keys, match)


def test_typ_rules(keys: JwtSigningKeys) -> None:
    _expect_invalid(_signed(keys, claims_for(), {"typ": "at+jwt"}), keys, "typ 'at\\+jwt'")
    validate_jwt_svid(_signed(keys, claims_for(), {"typ": "JOSE"}), AS, bundles(keys), now=T0 + 1)
    k = keys.current()
    no_typ = jwt.encode(
        claims_for(), k.private_key, algorithm="ES256", headers={"kid": k.kid, "typ": None}
    )
    assert "typ" not in jwt.get_unverified_header(no_typ)
    validate_jwt_svid(no_typ, AS, bundles(keys), now=T0 + 1)


def test_unknown_kid_and_forged_signature(keys: JwtSigningKeys) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(
        claims_for(), other, algorithm="ES256", headers={"kid": jwk_thumbprint(other.public_key())}
    )
    _expect_invalid(token, keys, "is not in the jwt-svid keys")
    _expect_invalid(_signed(keys, claims_for(), key=other), keys, "signature does not verify")
    good = mint_jwt_svid(keys, SID, [AS]).token
    h, _p, s = good.split(".")
    forged_payload = b64(claims_for(sub="spiffe://example.org/admin"))
    _expect_invalid(f"{h}.{forged_payload}.{s}", keys, "signature does not verify")
    k = keys.current()
    no_kid = jwt.encode(claims_for(), k.private_key, algorithm="ES256")
    _expect_invalid(no_kid, keys, "no kid")


def test_bad_sub_and_claims(keys: JwtSigningKeys) -> None:
    _expect_invalid(_signed(keys, claims_for(sub="web")), keys, "not a SPIFFE ID")
    _expect_invalid(
        _signed(keys, claims_for(sub="spiffe://Example.org/x")), keys, "not a SPIFFE ID"
    )
    _expect_invalid(_signed(keys, claims_for(sub=None)), keys, "sub claim is missing")
    _expect_invalid(
        _signed(keys, claims_for(sub="spiffe://other.org/w")),
        keys,
        "no bundle for trust domain other.org",
    )
    _expect_invalid(_signed(keys, claims_for(exp=None)), keys, "exp claim")
    _expect_invalid(_signed(keys, claims_for(aud=None)), keys, "aud claim")
    _expect_invalid(_signed(keys, claims_for(nbf=int(T0) + 30)), keys, "not valid before")


def test_alg_must_fit_key(keys: JwtSigningKeys) -> None:
    # An ES384 header over our P-256 key must not be accepted even if a library would try.
    k = keys.current()
    token = f"{b64({'alg': 'ES384', 'kid': k.kid, 'typ': 'JWT'})}.{b64(claims_for())}.AAAA"
    _expect_invalid(token, keys, "does not match")
    _expect_invalid("a.b", keys, "compact")
    _expect_invalid("!!.!!.!!", keys, "malformed")


def test_rs256_and_ps256_keys(clock: FakeClock) -> None:
    for alg in ("RS256", "PS256"):
        keys = JwtSigningKeys(alg=alg, clock=clock)
        svid = mint_jwt_svid(keys, SID, [AS])
        assert jwt.get_unverified_header(svid.token)["alg"] == alg
        validate_jwt_svid(svid.token, AS, bundles(keys), now=T0 + 1)
    with pytest.raises(JwtSvidError):
        JwtSigningKeys(alg="HS256")


# ---------------------------------------------------------------- rotation
def test_rotation_overlap(keys: JwtSigningKeys, clock: FakeClock) -> None:
    k1 = keys.current()
    assert list(keys.published()) == [k1.kid]
    assert keys.next_change_at() == T0 + 800  # prepare the next key 200 s before rotation

    clock.t = T0 + 800  # the next key is published before it signs anything
    pub = keys.published()
    assert keys.current().kid == k1.kid and len(pub) == 2
    k2_kid = next(k for k in pub if k != k1.kid)
    last_old = mint_jwt_svid(keys, SID, [AS], ttl=300)  # the last, longest token k1 signs
    assert last_old.kid == k1.kid

    clock.t = T0 + 1000
    assert keys.current().kid == k2_kid  # rotated to the pre-published key
    assert mint_jwt_svid(keys, SID, [AS]).kid == k2_kid
    assert set(keys.published()) == {k1.kid, k2_kid}
    assert keys.next_change_at() == T0 + 1300  # k1 retired at T0+1000, kept max_jwt_ttl

    clock.t = T0 + 1099  # last k1 token still validates against the current bundle
    validate_jwt_svid(last_old.token, AS, bundles(keys), now=clock.t)

    clock.t = T0 + 1300
    assert k1.kid in keys.published()
    clock.t = T0 + 1300.5  # every token k1 signed has expired: k1 leaves the bundle
    assert set(keys.published()) == {k2_kid}
    with pytest.raises(JwtSvidError, match="not in the jwt-svid keys"):
        validate_jwt_svid(last_old.token, AS, bundles(keys), now=T0 + 1099)


def test_version_and_forced_rotation(keys: JwtSigningKeys, clock: FakeClock) -> None:
    v0, k1 = keys.version, keys.current()
    keys.published()
    assert keys.version == v0  # nothing changed
    k2 = keys.rotate()
    assert k2.kid != k1.kid and keys.version > v0 and set(keys.published()) == {k1.kid, k2.kid}
    k3 = keys.rotate(drop_old=True)  # suspected compromise: k2 is unpublished at once
    assert set(keys.published()) == {k1.kid, k3.kid}


def test_clock_jump_past_rotation(keys: JwtSigningKeys, clock: FakeClock) -> None:
    k1 = keys.current()
    clock.t = T0 + 10_000  # e.g. resumed from suspend
    k = keys.current()
    assert k.kid != k1.kid
    # k1 retired only now: its tokens may still be live, so it stays for max_jwt_ttl.
    assert set(keys.published()) == {k1.kid, k.kid}
    clock.t += 301
    assert set(keys.published()) == {k.kid}


def test_invalid_rotation_settings() -> None:
    with pytest.raises(JwtSvidError, match="prepublish"):
        JwtSigningKeys(rotate_every=10, prepublish=10)


# ---------------------------------------------------------------- interop with py-spiffe
def test_py_spiffe_validates_our_jwt_svid() -> None:
    keys = JwtSigningKeys()  # real clock: py-spiffe checks exp against the wall clock
    svid = mint_jwt_svid(keys, SID, [AS])
    bundle = TrustBundle.new(TD, (), keys.published())
    py_bundle = spiffe.JwtBundle.parse(
        spiffe.TrustDomain("example.org"), bundle.jwt_jwks_json().encode()
    )
    parsed = spiffe.JwtSvid.parse_and_validate(svid.token, py_bundle, {AS})
    assert str(parsed.spiffe_id) == str(SID) and parsed.audience == {AS}
    assert parsed.expiry == svid.expires_at
    multi = mint_jwt_svid(keys, SID, [AS, "https://b"])
    parsed_multi = spiffe.JwtSvid.parse_and_validate(multi.token, py_bundle, {AS})
    assert parsed_multi.audience == {AS, "https://b"}
    assert time.time() < svid.expires_at
