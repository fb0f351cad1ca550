"""JWT-SVID validation checks the rest of the suite left unpinned (found by `make mutate`):
the key's strength and curve must fit the alg, an empty kid is none, the leeway applies
to nbf as to exp, the time checks use the given clock and never the library's, and the
result carries what the token said."""

from __future__ import annotations

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.identity.jwtsvid import JwtSigningKeys, JwtSvidError, mint_jwt_svid, validate_jwt_svid
from tests.unit.test_identity_jwt import (
    AS,
    SID,
    T0,
    _expect_invalid,
    _signed,
    b64,
    bundles,
    claims_for,
    clock,
    keys,
)

__all__ = ["clock", "keys"]  # fixtures, used by name


def _one_key_bundle(private_key) -> tuple[dict, str]:
    kid = "the-only-key"
    return {"example.org": {kid: private_key.public_key()}}, kid


@pytest.mark.filterwarnings("ignore:The RSA key is 1024 bits")  # PyJWT's, at signing
def test_an_rsa_key_under_2048_bits_is_refused_whatever_it_signed() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    bundle, kid = _one_key_bundle(weak)
    token = jwt.encode(claims_for(), weak, algorithm="RS256", headers={"kid": kid})
    with pytest.raises(JwtSvidError, match="RS256 does not match the .*RSAPublicKey"):
        validate_jwt_svid(token, AS, bundle, now=T0 + 1)


def test_an_ec_key_on_another_curve_than_the_alg_names_is_refused() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    bundle, kid = _one_key_bundle(p384)
    token = jwt.encode(claims_for(), p384, algorithm="ES384", headers={"kid": kid})
    validate_jwt_svid(token, AS, bundle, now=T0 + 1)  # the curve ES384 names: accepted
    _, payload, signature = token.split(".")
    relabelled = f"{b64({'alg': 'ES256', 'kid': kid, 'typ': 'JWT'})}.{payload}.{signature}"
    with pytest.raises(JwtSvidError, match="ES256 does not match"):
        validate_jwt_svid(relabelled, AS, bundle, now=T0 + 1)


def test_an_empty_kid_is_no_kid(keys: JwtSigningKeys) -> None:
    # (PyJWT itself refuses a kid that is not a string)
    token = f"{b64({'alg': 'ES256', 'kid': '', 'typ': 'JWT'})}.{b64(claims_for())}.AAAA"
    _expect_invalid(token, keys, "no kid")


def test_the_leeway_applies_to_nbf_too(keys: JwtSigningKeys) -> None:
    token = _signed(keys, claims_for(nbf=int(T0) + 30))
    validate_jwt_svid(token, AS, bundles(keys), now=T0 + 25, leeway=5)
    with pytest.raises(JwtSvidError, match="not valid before"):
        validate_jwt_svid(token, AS, bundles(keys), now=T0 + 25, leeway=4)


def test_expiry_is_judged_by_the_given_clock_not_the_librarys(keys: JwtSigningKeys) -> None:
    # expired long ago by the wall clock, valid at `now`: PyJWT's own exp check must be off
    past = 1_000_000_000
    token = _signed(keys, claims_for(now=past))
    assert validate_jwt_svid(token, AS, bundles(keys), now=past + 1).expires_at == past + 60


def test_the_result_carries_the_tokens_claims(keys: JwtSigningKeys) -> None:
    claims = claims_for(jti="j-1", extra="kept")
    token = _signed(keys, claims)
    got = validate_jwt_svid(token, AS, bundles(keys), now=T0 + 1)
    assert (got.token, got.spiffe_id, got.jti, got.issued_at) == (token, SID, "j-1", int(T0))
    assert dict(got.claims) == claims
    bare = validate_jwt_svid(_signed(keys, claims_for(iat=None)), AS, bundles(keys), now=T0 + 1)
    assert (bare.issued_at, bare.jti) == (0, None)


def test_without_a_clock_the_time_now_is_used(clock) -> None:
    import time

    clock.t = time.time()
    live = JwtSigningKeys(rotate_every=1000, max_jwt_ttl=300, prepublish=200, clock=clock)
    svid = mint_jwt_svid(live, SID, [AS], ttl=120)
    assert validate_jwt_svid(svid.token, AS, bundles(live)).jti == svid.jti
