"""Telling a placeholder from any other credential, and remembering the ones verified
(agent/inject/phantom.py), found by mutation testing: an Authorization value with no word or
another scheme, a JWT-shaped token whose payload or audience is not what a placeholder's is,
a placeholder naming several audiences, and the cache (a placeholder verified once costs no
second signature check, still expires at its `exp`, and the oldest is forgotten first).

Placeholders are real JWT-SVIDs signed with real keys; the trust bundle counts how often it
is asked for (once per signature check); the clock is injected."""

from __future__ import annotations

import base64
import json

import pytest

from agent.identity.bundle import TrustBundle
from agent.identity.jwt_rotation import JwtSigningKeys
from agent.identity.jwtsvid import mint_jwt_svid
from agent.identity.spiffeid import TrustDomain
from agent.inject import phantom
from agent.inject.phantom import PhantomInvalid, PhantomVerifier, audience

NOW = 1_900_000_000.0
BOT = "spiffe://example.org/bot"


class Bundles:
    """The identity manager's bundle(), counting the signature checks it is asked for."""

    def __init__(self, keys: JwtSigningKeys):
        self.keys = keys
        self.asked = 0

    def bundle(self) -> TrustBundle:
        self.asked += 1
        return TrustBundle(TrustDomain("example.org"), jwt_authorities=self.keys.published(NOW))


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keys() -> JwtSigningKeys:
    return JwtSigningKeys(clock=lambda: NOW)


def verifier(keys):
    bundles, clock = Bundles(keys), Clock()
    return PhantomVerifier(bundles, clock=clock), bundles, clock


def bearer(keys, server="tools", ttl=300, aud=None) -> bytes:
    token = mint_jwt_svid(keys, BOT, aud or audience(server), ttl=ttl).token
    return b"Bearer " + token.encode()


def b64(doc) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def jwt_shaped(payload) -> bytes:
    return f"Bearer {b64({'alg': 'ES256'})}.{b64(payload)}.c2ln".encode()


# ------------------------------------------------------------ not a placeholder


@pytest.mark.parametrize("value", [b"", b"   ", b"\t"])
def test_an_empty_authorization_value_is_not_a_placeholder(keys, value):
    v, bundles, _ = verifier(keys)
    assert v.binding(value) is None and bundles.asked == 0


def test_a_placeholder_under_another_scheme_is_not_read_as_one(keys):
    v, bundles, _ = verifier(keys)
    token = bearer(keys).split(b" ", 1)[1]
    assert v.binding(b"Basic " + token) is None
    assert v.binding(b"Token " + token) is None
    assert bundles.asked == 0


@pytest.mark.parametrize(
    "payload",
    [
        ["credless-phantom:tools"],  # a JSON array, not an object
        "credless-phantom:tools",
        {"sub": BOT},  # no audience
        {"aud": 7},
        {"aud": None},
        {"aud": {"credless-phantom:tools": True}},  # an object, not a list
    ],
    ids=["array", "string", "no-aud", "aud-number", "aud-null", "aud-object"],
)
def test_a_token_whose_claims_name_no_placeholder_audience_is_another_credential(keys, payload):
    v, bundles, _ = verifier(keys)
    assert v.binding(jwt_shaped(payload)) is None
    assert bundles.asked == 0  # no signature check paid for it


def test_a_placeholder_naming_several_audiences_is_found_by_its_placeholder_one(keys):
    v, _, _ = verifier(keys)
    found = v.binding(bearer(keys, aud=["https://elsewhere", audience("tools")]))
    assert found is not None and (found.spiffe_id, found.server) == (BOT, "tools")


# ------------------------------------------------------------ the cache


def test_a_placeholder_verified_once_is_not_verified_again(keys):
    v, bundles, _ = verifier(keys)
    value = bearer(keys)
    first = v.binding(value)
    assert bundles.asked == 1
    again = v.binding(value)
    assert again == first and bundles.asked == 1


def test_a_remembered_placeholder_is_refused_from_its_exp_on(keys):
    v, _, clock = verifier(keys)
    value = bearer(keys, ttl=60)
    assert v.binding(value) is not None
    clock.now = NOW + 59
    assert v.binding(value) is not None
    clock.now = NOW + 60  # exp: a JWT is expired at its exp (RFC 7519 §4.1.4)
    with pytest.raises(PhantomInvalid, match="expired"):
        v.binding(value)


def test_the_oldest_verified_placeholder_is_forgotten_first(keys, monkeypatch):
    monkeypatch.setattr(phantom, "_CACHE_SIZE", 2)
    v, bundles, _ = verifier(keys)
    first, second, third = (bearer(keys, server=s) for s in ("a", "b", "c"))
    for value in (first, second, third):
        v.binding(value)
    assert bundles.asked == 3
    v.binding(third)
    v.binding(second)
    assert bundles.asked == 3  # the two newest are remembered
    v.binding(first)
    assert bundles.asked == 4  # the oldest was not
