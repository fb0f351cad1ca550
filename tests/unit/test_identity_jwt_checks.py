"""JWT-SVID checks the rest of the suite left unpinned (found by `make mutate`): the key's
strength and curve must fit the alg, an empty kid is none, the leeway applies to nbf as to
exp, the time checks use the given clock and never the library's, and the result carries
what the token said; an ID and an audience given as strings, the ttl's lower bound, the key
a token is signed with, the rotation settings at their bounds, when each key starts to
sign, a prepared key at every rotation, and each refusal's words (what a Workload API
caller and the operator read)."""

from __future__ import annotations

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.identity.jwt_rotation import JwtSigningKeys
from agent.identity.jwtsvid import JwtSvidError, mint_jwt_svid, validate_jwt_svid
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


# ---------------------------------------------------------------- minting
def test_an_id_and_a_single_audience_may_be_given_as_strings(keys: JwtSigningKeys) -> None:
    svid = mint_jwt_svid(keys, str(SID), AS)
    claims = jwt.decode(svid.token, options={"verify_signature": False})
    assert (svid.spiffe_id, svid.audience, claims["aud"], claims["sub"]) == (
        SID,
        (AS,),
        AS,
        str(SID),
    )
    assert dict(svid.claims) == claims  # what was signed, for the caller to log
    assert str(SID) in repr(svid) and svid.token not in repr(svid)


@pytest.mark.parametrize("ttl", [1, 300])  # max_jwt_ttl of the keys fixture: 300
def test_any_ttl_from_one_second_to_max_jwt_ttl_is_minted(keys: JwtSigningKeys, ttl) -> None:
    svid = mint_jwt_svid(keys, SID, [AS], ttl=ttl)
    assert svid.expires_at - svid.issued_at == ttl


def test_a_token_is_signed_by_the_key_current_at_its_iat() -> None:
    """The clock is read once per token: its iat and its key are from the same moment, even
    when that moment is the last before a rotation."""
    readings = iter([T0, T0 + 999, T0 + 1000, T0 + 1000])

    def clock() -> float:
        return next(readings)

    keys = JwtSigningKeys(rotate_every=1000, max_jwt_ttl=300, prepublish=200, clock=clock)
    first = keys.current(T0)
    svid = mint_jwt_svid(keys, SID, [AS])  # reads T0 + 999
    assert (svid.issued_at, svid.kid) == (int(T0) + 999, first.kid)


def test_a_jti_that_is_not_a_string_is_refused(keys: JwtSigningKeys) -> None:
    token = _signed(keys, claims_for(jti=5))
    with pytest.raises(JwtSvidError) as err:
        validate_jwt_svid(token, AS, bundles(keys), now=T0 + 1)
    assert str(err.value) == "invalid JWT: JWT ID must be a string"


# ---------------------------------------------------------------- rotation
POSITIVE = "rotate_every and max_jwt_ttl must be positive, prepublish >= 0"


@pytest.mark.parametrize(
    "rotate_every,max_jwt_ttl,prepublish,refusal",
    [
        (1, 300, 0, None),
        (1000, 1, 0, None),
        (1000, 300, 0, None),  # a key published only when it starts signing
        (0, 300, 0, POSITIVE),
        (-1, 300, 0, POSITIVE),
        (1000, 0, 0, POSITIVE),
        (1000, -1, 0, POSITIVE),
        (1000, 300, -1, POSITIVE),
        (10, 300, 10, "prepublish (10s) must be shorter than rotate_every (10s)"),
    ],
)
def test_rotation_settings_at_their_bounds(rotate_every, max_jwt_ttl, prepublish, refusal):
    settings = {"rotate_every": rotate_every, "max_jwt_ttl": max_jwt_ttl, "prepublish": prepublish}
    if refusal is None:
        keys = JwtSigningKeys(**settings, clock=lambda: T0)
        assert keys.current().activates_at == T0
        return
    with pytest.raises(JwtSvidError) as err:
        JwtSigningKeys(**settings, clock=lambda: T0)
    assert str(err.value) == refusal


def test_an_algorithm_it_cannot_sign_with_is_refused_by_name() -> None:
    with pytest.raises(JwtSvidError) as err:
        JwtSigningKeys(alg="HS256")
    assert str(err.value) == (
        "cannot sign JWT-SVIDs with 'HS256'; use one of ['ES256', 'ES384', 'PS256', 'RS256']"
    )


def test_each_key_starts_signing_when_it_becomes_current(keys, clock) -> None:
    assert keys.current().activates_at == T0
    clock.t = T0 + 1000  # the scheduled rotation
    assert keys.current().activates_at == T0 + 1000
    clock.t = T0 + 1900  # the next key is prepared (from T0 + 1800)...
    assert len(keys.published()) == 2
    rotated = keys.rotate()  # ...and a forced rotation makes it current now, not at T0 + 2000
    assert rotated.activates_at == T0 + 1900 == keys.current().activates_at


def test_the_next_key_is_published_ahead_of_every_rotation(keys, clock) -> None:
    for n in range(1, 4):
        clock.t = T0 + 1000 * n - 200  # prepublish (200 s) before the n-th rotation
        current = keys.current()
        published = keys.published()
        assert len(published) == 2 and current.kid in published  # the retired one has gone
        (prepared,) = set(published) - {current.kid}
        clock.t = T0 + 1000 * n
        assert keys.current().kid == prepared
        assert keys.next_change_at() == T0 + 1000 * n + 300  # the old key leaves then


def test_every_change_of_the_published_keys_gives_a_new_version(keys, clock) -> None:
    """The bundle is re-published when the version moves: each change must give a value
    not seen before, whatever made it (a prepared key, a rotation, a key dropped)."""
    versions = [keys.version]
    for t in (800, 1000, 1301):  # prepared, rotated, the retired key dropped
        clock.t = T0 + t
        keys.published()
        versions.append(keys.version)
    for drop_old in (False, False, True):
        keys.rotate(drop_old=drop_old)
        versions.append(keys.version)
    keys.published()
    assert keys.version == versions[-1]  # nothing changed
    assert len(set(versions)) == len(versions), versions


def test_the_published_keys_are_those_of_the_time_asked_for(keys, clock) -> None:
    assert len(keys.published(now=T0 + 800)) == 2  # the clock still says T0


# ---------------------------------------------------------------- the words of each refusal
def _expired_with_jti(keys: JwtSigningKeys) -> str:
    return _signed(keys, claims_for(jti="j-1", exp=int(T0) + 1))


REFUSALS = {
    "not three parts": (lambda keys: "a.b", "not a JWS compact serialization (JWT-SVID.md §2.1)"),
    "an empty kid": (
        lambda keys: f"{b64({'alg': 'ES256', 'kid': '', 'typ': 'JWT'})}.{b64(claims_for())}.AA",
        "the header has no kid, so no bundle key can be chosen",
    ),
    "no sub": (
        lambda keys: _signed(keys, claims_for(sub=None)),
        "the sub claim is missing; a JWT-SVID's sub is its SPIFFE ID (§3.1)",
    ),
    "an unknown kid": (
        lambda keys: _signed(keys, claims_for(), {"kid": "nope"}),
        "kid 'nope' is not in the jwt-svid keys of example.org; "
        "the bundle may be stale (refresh it) or the token forged",
    ),
    "no aud": (
        lambda keys: _signed(keys, claims_for(aud=None)),
        "the aud claim is missing or malformed (§3.2)",
    ),
    "no exp": (
        lambda keys: _signed(keys, claims_for(exp=None)),
        "the exp claim is missing or not a number (§3.3)",
    ),
    "expired": (_expired_with_jti, f"the token expired at {int(T0) + 1} (jti 'j-1')"),
}


@pytest.mark.parametrize("make,refusal", REFUSALS.values(), ids=REFUSALS.keys())
def test_each_refusal_says_exactly_what_is_wrong(keys: JwtSigningKeys, make, refusal) -> None:
    token = make(keys)
    with pytest.raises(JwtSvidError) as err:
        validate_jwt_svid(token, AS, bundles(keys), now=T0 + 1)
    assert str(err.value) == refusal


@pytest.mark.parametrize("audience", [[], [""], ["ok", ""]])
def test_an_empty_audience_is_refused_by_name(keys: JwtSigningKeys, audience) -> None:
    with pytest.raises(JwtSvidError) as err:
        mint_jwt_svid(keys, SID, audience)
    assert str(err.value) == "audience must be one or more non-empty strings (JWT-SVID.md §3.2)"
