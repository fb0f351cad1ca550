"""OAuth pieces without a network: challenges, resources, DPoP proofs, responses, cache."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import jwt
import pytest

from agent.oauth import discovery as disc
from agent.oauth.cache import TokenCache
from agent.oauth.dpop import DPoPKey, htu
from agent.oauth.errors import InvalidClient, MalformedResponse, ServerUnavailable, \
    from_error_response
from agent.oauth.tokens import Token, fingerprint, parse_token_response


@pytest.mark.parametrize("header,expected", [
    ('Bearer resource_metadata="https://mcp.example/.well-known/oauth-protected-resource/mcp", '
     'scope="tools:read tools:call"',
     {"bearer": {"resource_metadata": "https://mcp.example/.well-known/oauth-protected-resource"
                                      "/mcp", "scope": "tools:read tools:call"}}),
    ('DPoP algs="ES256 PS256", error="use_dpop_nonce", Bearer realm="x"',
     {"dpop": {"algs": "ES256 PS256", "error": "use_dpop_nonce"}, "bearer": {"realm": "x"}}),
    ('Bearer error="insufficient_scope", scope="a\\"b"', {"bearer": {"error":
                                                                     "insufficient_scope",
                                                                     "scope": 'a"b'}}),
    ("Bearer", {"bearer": {}}),
    ("", {}),
])
def test_www_authenticate(header, expected):
    assert disc.parse_www_authenticate(header) == expected


@pytest.mark.parametrize("url,canonical", [
    ("HTTPS://MCP.Example.com/mcp/", "https://mcp.example.com/mcp"),
    ("http://127.0.0.1:9000/mcp#frag", "http://127.0.0.1:9000/mcp"),
    ("https://mcp.example.com", "https://mcp.example.com"),
])
def test_canonical_resource(url, canonical):
    assert disc.canonical_resource(url) == canonical


def test_canonical_resource_rejects_non_http():
    with pytest.raises(disc.DiscoveryError, match="not an absolute http"):
        disc.canonical_resource("ftp://x/y")


def test_dpop_proof_claims_and_header():
    key = DPoPKey()
    proof = key.proof("post", "https://AS.example/token?x=1#f", access_token="tok", nonce="n1",
                      now=1000)
    header = jwt.get_unverified_header(proof)
    assert header["typ"] == "dpop+jwt" and header["alg"] == "ES256"
    assert set(header["jwk"]) == {"kty", "crv", "x", "y"}
    claims = jwt.decode(proof, jwt.PyJWK(header["jwk"]).key, algorithms=["ES256"])
    assert claims["htm"] == "POST" and claims["htu"] == "https://as.example/token"
    assert claims["iat"] == 1000 and claims["nonce"] == "n1" and len(claims["jti"]) >= 16
    expected_ath = base64.urlsafe_b64encode(hashlib.sha256(b"tok").digest()).rstrip(b"=")
    assert claims["ath"] == expected_ath.decode()
    assert key.proof("GET", "https://x/y") != key.proof("GET", "https://x/y")  # fresh jti
    assert htu("http://h:1/") == "http://h:1/" and "DPoPKey(jkt=" in repr(key)


def _jwt_like(claims: dict) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa
    return f"{enc({'alg': 'ES256'})}.{enc(claims)}.sig"


def test_token_response_parsing_and_no_secret_in_repr():
    key = DPoPKey()
    access = _jwt_like({"jti": "j1", "aud": "http://r/mcp", "cnf": {"jkt": key.jkt}})
    tok = parse_token_response({"access_token": access, "token_type": "DPoP",
                                "expires_in": 300, "scope": "a"}, url="u", resource="http://r/mcp",
                               issuer="i", spiffe_id="s", client_id="s", dpop=key, now=1000)
    assert tok.token_type == "DPoP" and tok.expires_at == 1300 and tok.jti == "j1"
    assert tok.jkt == key.jkt and tok.fingerprint == fingerprint(access)
    assert access not in repr(tok) and access not in str(tok)
    assert access not in json.dumps(tok.summary())
    assert tok.authorization() == f"DPoP {access}"


@pytest.mark.parametrize("body,message", [
    ([], "is not a JSON object"),
    ({"token_type": "Bearer"}, "lacks access_token or token_type"),
    ({"access_token": "x", "token_type": "mac"}, "has token_type 'mac'"),
    ({"access_token": "x", "token_type": "DPoP"}, "issued a DPoP token to a request without"),
])
def test_malformed_token_responses(body, message):
    with pytest.raises(MalformedResponse, match=message):
        parse_token_response(body, url="u", resource="r", issuer="i", spiffe_id="s",
                             client_id="s", dpop=None, now=0)


def test_dpop_token_bound_to_another_key_is_refused():
    access = _jwt_like({"cnf": {"jkt": "someone-else"}})
    with pytest.raises(MalformedResponse, match="bound the token to key someone-else"):
        parse_token_response({"access_token": access, "token_type": "DPoP"}, url="u",
                             resource="r", issuer="i", spiffe_id="s", client_id="s",
                             dpop=DPoPKey(), now=0)


def test_error_mapping_keeps_server_reason():
    e = from_error_response(401, {"error": "invalid_client", "error_description": "bad sig"},
                            "http://as/token", "token request")
    assert isinstance(e, InvalidClient) and e.error_description == "bad sig"
    assert "server said invalid_client: bad sig" in str(e)
    assert isinstance(from_error_response(503, {}, "u", "x"), ServerUnavailable)


# ---------------------------------------------------------------- cache
def tok(now: float, ttl: float = 100, name: str = "t") -> Token:
    return Token(access_token=name, token_type="Bearer", issued_at=now, expires_at=now + ttl,
                 scope="", resource="r", issuer="i", spiffe_id="s", client_id="s", jkt=None,
                 fingerprint=name, jti=None)


class Clock:
    t = 1000.0

    def __call__(self):
        return self.t


def test_single_flight_under_concurrency():
    calls = []

    async def fetch(key):
        calls.append(key)
        await asyncio.sleep(0.01)
        return tok(clock.t)

    clock = Clock()

    async def main():
        cache = TokenCache(fetch, clock=clock)
        results = await asyncio.gather(*(cache.get("k") for _ in range(200)))
        assert len({id(r) for r in results}) == 1
    asyncio.run(main())
    assert calls == ["k"]


def test_refresh_ahead_serves_old_token_and_swaps():
    clock = Clock()
    names = iter(["first", "second"])

    async def fetch(key):
        return tok(clock.t, ttl=100, name=next(names))

    async def main():
        cache = TokenCache(fetch, refresh_ahead=0.8, clock=clock)
        assert (await cache.get("k")).access_token == "first"
        clock.t += 81
        assert (await cache.get("k")).access_token == "first"   # refresh started behind
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert (await cache.get("k")).access_token == "second"
    asyncio.run(main())


def test_server_down_keeps_serving_valid_token_then_fails_typed():
    clock = Clock()
    state = {"up": True}

    async def fetch(key):
        if not state["up"]:
            raise ServerUnavailable("down")
        return tok(clock.t, ttl=100)

    async def main():
        cache = TokenCache(fetch, clock=clock)
        first = await cache.get("k")
        state["up"] = False
        clock.t += 90
        assert await cache.get("k") is first          # refresh fails behind, still valid
        await asyncio.sleep(0)
        clock.t += 20                                   # now expired
        with pytest.raises(ServerUnavailable):
            await cache.get("k")
        with pytest.raises(ServerUnavailable):          # backing off: answered at once
            await cache.get("k")
    asyncio.run(main())


def test_invalidate_and_drop():
    clock = Clock()
    n = {"i": 0}

    async def fetch(key):
        n["i"] += 1
        return tok(clock.t, name=f"t{n['i']}")

    async def main():
        cache = TokenCache(fetch, clock=clock)
        a = await cache.get(("spiffe://x", "s"))
        cache.invalidate(("spiffe://x", "s"))
        b = await cache.get(("spiffe://x", "s"))
        assert a.access_token != b.access_token
        await cache.get(("spiffe://y", "s"))
        assert cache.drop(lambda k: k[0] == "spiffe://x") == [("spiffe://x", "s")]
        assert len(cache) == 1
    asyncio.run(main())
