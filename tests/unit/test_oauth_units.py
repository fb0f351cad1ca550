"""OAuth pieces without a network: challenges, resources, DPoP proofs, responses, cache."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json

import httpx
import jwt
import pytest

from agent import config
from agent.oauth import discovery as disc
from agent.oauth import errors, trust
from agent.oauth.cache import TokenCache
from agent.oauth.dpop import DPoPKey, htu
from agent.oauth.errors import (
    InvalidClient,
    MalformedResponse,
    ServerUnavailable,
    from_error_response,
)
from agent.oauth.tokens import Token, fingerprint, parse_token_response


@pytest.mark.parametrize(
    "header,expected",
    [
        (
            'Bearer resource_metadata="https://mcp.example/.well-known/'
            'oauth-protected-resource/mcp", '
            'scope="tools:read tools:call"',
            {
                "bearer": {
                    "resource_metadata": "https://mcp.example/.well-known/oauth-protected-resource"
                    "/mcp",
                    "scope": "tools:read tools:call",
                }
            },
        ),
        (
            'DPoP algs="ES256 PS256", error="use_dpop_nonce", Bearer realm="x"',
            {"dpop": {"algs": "ES256 PS256", "error": "use_dpop_nonce"}, "bearer": {"realm": "x"}},
        ),
        (
            'Bearer error="insufficient_scope", scope="a\\"b"',
            {"bearer": {"error": "insufficient_scope", "scope": 'a"b'}},
        ),
        ("Bearer", {"bearer": {}}),
        ("", {}),
    ],
)
def test_www_authenticate(header, expected):
    assert disc.parse_www_authenticate(header) == expected


@pytest.mark.parametrize(
    "url,canonical",
    [
        ("HTTPS://MCP.Example.com/mcp/", "https://mcp.example.com/mcp"),
        ("http://127.0.0.1:9000/mcp#frag", "http://127.0.0.1:9000/mcp"),
        ("https://mcp.example.com", "https://mcp.example.com"),
    ],
)
def test_canonical_resource(url, canonical):
    assert disc.canonical_resource(url) == canonical


def test_canonical_resource_rejects_non_http():
    with pytest.raises(disc.DiscoveryError, match="not an absolute http"):
        disc.canonical_resource("ftp://x/y")


def test_dpop_proof_claims_and_header():
    key = DPoPKey()
    proof = key.proof(
        "post", "https://AS.example/token?x=1#f", access_token="tok", nonce="n1", now=1000
    )
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


def parse(body, **fields):
    """parse_token_response(body) for a request with these fields (the rest: placeholders,
    no DPoP key, at time 0)."""
    defaults = dict(
        url="u", resource=RES, issuer="i", spiffe_id="s", client_id="s", dpop=None, now=0
    )
    return parse_token_response(body, **{**defaults, **fields})


def test_token_response_parsing_and_no_secret_in_repr():
    key = DPoPKey()
    access = _jwt_like({"jti": "j1", "aud": "http://r/mcp", "cnf": {"jkt": key.jkt}})
    tok = parse(
        {"access_token": access, "token_type": "DPoP", "expires_in": 300, "scope": "a"},
        resource="http://r/mcp",
        dpop=key,
        now=1000,
    )
    assert tok.token_type == "DPoP" and tok.expires_at == 1300 and tok.jti == "j1"
    assert tok.jkt == key.jkt and tok.fingerprint == fingerprint(access)
    assert access not in repr(tok) and access not in str(tok)
    assert access not in json.dumps(tok.summary())
    assert tok.authorization() == f"DPoP {access}"


@pytest.mark.parametrize(
    "body,message",
    [
        ([], "is not a JSON object"),
        ({"token_type": "Bearer"}, "lacks access_token or token_type"),
        ({"access_token": "x", "token_type": "mac"}, "has token_type 'mac'"),
        ({"access_token": "x", "token_type": "DPoP"}, "issued a DPoP token to a request without"),
    ],
)
def test_malformed_token_responses(body, message):
    with pytest.raises(MalformedResponse, match=message):
        parse(body, resource="r")


def test_dpop_token_bound_to_another_key_is_refused():
    access = _jwt_like({"cnf": {"jkt": "someone-else"}})
    with pytest.raises(MalformedResponse, match="bound the token to key someone-else"):
        parse({"access_token": access, "token_type": "DPoP"}, resource="r", dpop=DPoPKey())


def test_error_mapping_keeps_server_reason():
    e = from_error_response(
        401,
        {"error": "invalid_client", "error_description": "bad sig"},
        "http://as/token",
        "token request",
    )
    assert isinstance(e, InvalidClient) and e.error_description == "bad sig"
    assert "server said invalid_client: bad sig" in str(e)
    assert isinstance(from_error_response(503, {}, "u", "x"), ServerUnavailable)


# ---------------------------------------------------------------- cache
# the cache reads a token's times only; its name tells one token from another in a test
_TOKEN = Token("t", "Bearer", 0.0, 0.0, "", "r", "i", "s", "s", None, "t", None)


def tok(now: float, ttl: float = 100, name: str = "t") -> Token:
    return dataclasses.replace(
        _TOKEN, access_token=name, fingerprint=name, issued_at=now, expires_at=now + ttl
    )


class Clock:
    t = 1000.0

    def __call__(self):
        return self.t


def test_single_flight_under_concurrency():
    calls = []

    async def fetch(key):
        calls.append(key)
        # a slow authorization server: the behaviour tested. Not a race: gather starts all
        # 200 callers in one loop iteration, before any timer can fire
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
        assert (await cache.get("k")).access_token == "first"  # refresh started behind
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
        assert await cache.get("k") is first  # refresh fails behind, still valid
        await asyncio.sleep(0)
        clock.t += 20  # now expired
        with pytest.raises(ServerUnavailable):
            await cache.get("k")
        with pytest.raises(ServerUnavailable):  # backing off: answered at once
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


# ---------------------------------------------------------------- what discovery trusts
# (issue 15 item 6: a hostile MCP server or authorization server must not get assertions
# sent elsewhere, plain-http endpoints used, or a token for another audience served)
MCP = "https://mcp.example.com/mcp"
PATH_PRM = "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"
ROOT_PRM = "https://mcp.example.com/.well-known/oauth-protected-resource"


def discover(handler, call):
    """Run call(Discovery) over an httpx MockTransport: nothing is dialled. Returns
    (result or the OAuthError raised, every URL the discovery asked for)."""
    asked: list[str] = []

    def record(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        return handler(request)

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(record)) as http:
            try:
                return await call(disc.Discovery(http))
            except errors.OAuthError as e:
                return e

    return asyncio.run(main()), asked


def serve(docs: dict[str, object]):
    def handler(request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        return httpx.Response(200, json=docs[url]) if url in docs else httpx.Response(404)

    return handler


@pytest.mark.parametrize(
    "url,allowed",
    [
        ("https://as.example/token", True),
        ("https://10.0.0.1/token", True),
        ("http://127.0.0.1:8080/token", True),
        ("http://127.0.0.2/token", True),  # all of 127.0.0.0/8 is loopback
        ("http://127.255.255.254:1/t", True),
        ("http://[::1]:9/token", True),
        ("http://localhost:9/token", True),
        ("http://LocalHost/token", True),
        ("http://[::ffff:127.0.0.1]:9/t", True),  # v4-mapped loopback
        ("http://as.example/token", False),
        ("http://10.0.0.1/token", False),
        ("http://192.0.2.1:80/token", False),
        ("http://0.0.0.0/token", False),  # "this host": not a loopback address
        ("http://[::]/token", False),
        ("http://127.0.0.1.nip.io/token", False),  # a name, however it looks
        ("http://localhost.example/token", False),
        ("http://127.0.0.1@as.example/token", False),  # userinfo: the host is as.example
        ("http://2130706433/token", False),  # an integer "address" is a name here
        ("ftp://127.0.0.1/token", False),
        ("file:///etc/passwd", False),
        ("//127.0.0.1/token", False),
        ("", False),
    ],
)
def test_endpoints_need_https_unless_loopback(url, allowed):
    if allowed:
        assert trust.check_endpoint(url, "token endpoint") == url
    else:
        with pytest.raises(errors.InsecureEndpoint) as err:
            trust.check_endpoint(url, "token endpoint")
        assert "token endpoint" in str(err.value) and repr(url) in str(err.value)


@pytest.mark.parametrize(
    "challenge_url",
    [
        "https://evil.example/.well-known/oauth-protected-resource/mcp",  # another host
        "https://mcp.example.com:8443/.well-known/oauth-protected-resource/mcp",  # another port
        "http://mcp.example.com/.well-known/oauth-protected-resource/mcp",  # another scheme
        "https://mcp.example.com@evil.example/prm",  # userinfo trick
        "http://127.0.0.1:9890/metrics",  # the node itself
    ],
)
def test_resource_metadata_url_off_the_servers_origin_is_never_fetched(challenge_url):
    docs = {
        PATH_PRM: {"resource": MCP, "authorization_servers": ["https://as.example"]},
        challenge_url: {"resource": MCP, "authorization_servers": ["https://evil.example"]},
    }
    meta, asked = discover(
        serve(docs), lambda d: d.resource(MCP, f'Bearer resource_metadata="{challenge_url}"')
    )
    assert challenge_url not in asked
    assert meta.authorization_servers == ("https://as.example",)
    assert meta.ignored_metadata_url == challenge_url


def test_resource_metadata_url_on_the_servers_origin_is_used():
    other = "https://MCP.example.com:443/custom/prm"  # same origin, spelt differently
    docs = {
        "https://mcp.example.com/custom/prm": {
            "resource": MCP,
            "authorization_servers": ["https://as.example"],
        }
    }
    meta, asked = discover(
        serve(docs), lambda d: d.resource(MCP, f'Bearer resource_metadata="{other}"')
    )
    assert asked == ["https://mcp.example.com/custom/prm"]
    assert meta.ignored_metadata_url is None


@pytest.mark.parametrize(
    "served_at,resource,ok",
    [
        (PATH_PRM, MCP, True),
        (PATH_PRM, "HTTPS://MCP.EXAMPLE.COM/mcp/", True),  # canonically the same
        (PATH_PRM, "https://mcp.example.com", False),  # the origin, from /mcp's URL
        (PATH_PRM, "https://mcp.example.com/other", False),  # another resource
        (PATH_PRM, "https://evil.example/mcp", False),
        (PATH_PRM, None, False),
        (ROOT_PRM, "https://mcp.example.com", True),  # RFC 9728 §3.3: the origin's
        (ROOT_PRM, MCP, True),
        (ROOT_PRM, "https://mcp.example.com/other", False),
    ],
)
def test_resource_metadata_must_name_the_configured_server(served_at, resource, ok):
    doc = {"authorization_servers": ["https://as.example"]}
    if resource is not None:
        doc["resource"] = resource
    meta, _asked = discover(serve({served_at: doc}), lambda d: d.resource(MCP, 'Bearer realm="x"'))
    if ok:
        assert meta.authorization_servers == ("https://as.example",)
    else:
        assert isinstance(meta, errors.DiscoveryError), meta
        assert "RFC 9728" in str(meta) and meta.kind == "metadata_mismatch"


@pytest.mark.parametrize(
    "doc_issuer",
    [
        "https://as.example/",  # one character more is another issuer
        "https://AS.example",
        "https://evil.example",
        None,
        "",
    ],
)
def test_authorization_server_metadata_must_name_the_issuer_it_was_fetched_for(doc_issuer):
    """RFC 8414 §3.3 (also issue 16's missing test): an AS whose metadata names another
    issuer is refused before its token endpoint is used."""
    doc = {"token_endpoint": "https://evil.example/token"}
    if doc_issuer is not None:
        doc["issuer"] = doc_issuer
    url = "https://as.example/.well-known/oauth-authorization-server"
    meta, asked = discover(serve({url: doc}), lambda d: d.server("https://as.example"))
    assert isinstance(meta, errors.DiscoveryError), meta
    assert "RFC 8414 §3.3" in str(meta) and meta.kind == "metadata_mismatch"
    assert all("evil" not in u for u in asked)


@pytest.mark.parametrize(
    "key,value,ok",
    [
        ("token_endpoint", "https://as.example/token", True),
        ("token_endpoint", "http://127.0.0.2:8080/token", True),
        ("token_endpoint", "http://as.example/token", False),
        ("token_endpoint", "http://192.0.2.1/token", False),
        ("token_endpoint", "ftp://as.example/token", False),
        ("registration_endpoint", "http://as.example/register", False),
        ("introspection_endpoint", "http://as.example/introspect", False),
        ("revocation_endpoint", "http://as.example/revoke", False),
        ("jwks_uri", "http://as.example/jwks", False),
        ("jwks_uri", "https://as.example/jwks", True),
    ],
)
def test_authorization_server_metadata_with_plain_http_endpoints_is_refused(key, value, ok):
    doc = {"issuer": "https://as.example", "token_endpoint": "https://as.example/token", key: value}
    if ok:
        assert disc.Discovery._parse_as(doc, "https://as.example", "u").raw[key] == value
    else:
        with pytest.raises(errors.InsecureEndpoint, match=key):
            disc.Discovery._parse_as(doc, "https://as.example", "u")


@pytest.mark.parametrize("issuer", ["http://as.example", "http://192.0.2.1:8080/tenant"])
def test_an_insecure_issuer_is_never_fetched(issuer):
    err, asked = discover(serve({}), lambda d: d.server(issuer))
    assert isinstance(err, errors.InsecureEndpoint) and asked == []


def test_an_insecure_well_known_metadata_url_is_never_fetched():
    err, asked = discover(
        serve({}), lambda d: d.resource("http://mcp.example.com/mcp", 'Bearer realm="x"')
    )
    assert isinstance(err, errors.InsecureEndpoint) and asked == []


RES = "https://mcp.example.com/mcp"


@pytest.mark.parametrize(
    "claims,ok",
    [
        ({"aud": RES}, True),
        ({"aud": ["https://other.example", RES]}, True),
        ({"aud": "HTTPS://MCP.example.com/mcp/"}, True),
        ({"resource": RES}, True),  # no aud: the resource claim
        ({"aud": "https://other.example/mcp"}, False),
        ({"aud": ["https://other.example/mcp", "https://x.example"]}, False),
        ({"aud": "https://mcp.example.com"}, False),  # the origin is another resource
        ({"aud": "https://mcp.example.com/mcp/other"}, False),
        ({"aud": "api://default"}, False),
        ({"aud": 42}, False),
        ({"resource": "https://other.example/mcp"}, False),
        ({"aud": "https://other.example/mcp", "resource": RES}, False),  # aud wins when present
        ({}, False),  # a JWT naming no audience
    ],
)
def test_jwt_access_token_must_be_for_this_server(claims, ok):
    access = _jwt_like({"jti": "j", **claims})
    body = {"access_token": access, "token_type": "Bearer", "expires_in": 60}
    if ok:
        assert parse(body, url="https://as.example/token").fingerprint == fingerprint(access)
    else:
        with pytest.raises(errors.OAuthError) as err:
            parse(body, url="https://as.example/token")
        assert err.value.kind == "token_refused" and RES in str(err.value)
        assert access not in str(err.value)


@pytest.mark.parametrize(
    "access",
    [
        "opaque-token-value",
        "a.b.c",  # three segments, no JSON header: opaque
        "v2.local.xyz",  # PASETO-like: opaque
    ],
)
def test_opaque_access_tokens_are_not_audience_checked(access):
    tok = parse({"access_token": access, "token_type": "Bearer"})
    assert tok.jti is None and tok.audience is None


def test_a_jwt_whose_payload_is_not_json_is_refused():
    head = base64.urlsafe_b64encode(b'{"alg":"ES256"}').rstrip(b"=").decode()
    with pytest.raises(errors.OAuthError) as err:
        parse({"access_token": f"{head}.bm90IGpzb24.sig", "token_type": "Bearer"})
    assert err.value.kind == "token_refused"


@pytest.mark.parametrize(
    "token_type,with_key,required,ok",
    [
        ("Bearer", False, 'servers.dpop = "always"', False),
        ("Bearer", True, "the resource metadata says dpop_bound_access_tokens_required", False),
        ("bearer", True, 'servers.dpop = "always"', False),
        ("Bearer", True, None, True),  # DPoP offered but not required: Bearer is fine
        ("Bearer", False, None, True),
        ("DPoP", True, 'servers.dpop = "always"', True),
    ],
)
def test_a_token_weaker_than_required_is_refused(token_type, with_key, required, ok):
    key = DPoPKey() if with_key else None
    claims = {"aud": RES, **({"cnf": {"jkt": key.jkt}} if key else {})}
    body = {"access_token": _jwt_like(claims), "token_type": token_type, "expires_in": 60}
    kw = dict(url="https://as.example/token", dpop=key, dpop_required=required)
    if ok:
        expected = "DPoP" if token_type.lower() == "dpop" else "Bearer"
        assert parse(body, **kw).token_type == expected
    else:
        with pytest.raises(errors.OAuthError) as err:
            parse(body, **kw)
        assert err.value.kind == "token_refused"
        assert "Bearer" in str(err.value) and required in str(err.value)


def test_a_dpop_jwt_without_its_key_binding_is_refused_where_dpop_is_required():
    key = DPoPKey()
    body = {"access_token": _jwt_like({"aud": RES}), "token_type": "DPoP"}
    with pytest.raises(errors.OAuthError, match="cnf.jkt") as err:
        parse(body, dpop=key, dpop_required="x")
    assert err.value.kind == "token_refused"


@pytest.mark.parametrize(
    "named,allowed,chosen",
    [
        (["https://as.example"], ["https://as.example"], "https://as.example"),
        (
            ["https://evil.example", "https://as.example"],
            ["https://as.example"],
            "https://as.example",
        ),  # the first allowed one
        (["https://AS.example/"], ["https://as.example"], "https://as.example"),  # as configured
        (["https://evil.example"], ["https://as.example"], None),
        (["https://as.example.evil.example"], ["https://as.example"], None),
        (["https://as.example/tenant2"], ["https://as.example/tenant1"], None),
        ([], ["https://as.example"], None),
    ],
)
def test_choose_authorization_server(named, allowed, chosen):
    assert trust.choose_authorization_server(named, allowed) == chosen


def test_pinned_authorization_servers_persist_and_never_move(tmp_path):
    store = trust.PinStore(tmp_path)
    assert store.get("weather", MCP) is None
    assert store.pin("weather", MCP, "https://as.example") == "https://as.example"
    # a later, different answer does not move the pin: the first one is returned
    assert store.pin("weather", MCP, "https://evil.example") == "https://as.example"
    again = trust.PinStore(tmp_path)  # a restarted agent
    assert again.get("weather", MCP) == "https://as.example"
    assert again.get("weather", "https://mcp.example.com/other") is None  # per resource
    assert again.get("other", MCP) is None  # per server
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"
    assert store.path.parent == tmp_path / "oauth"


@pytest.mark.parametrize(
    "value,problem",
    [
        (["https://as.example"], None),
        (["https://as.example/tenant1", "http://127.0.0.1:8080"], None),
        ([], None),
        (["http://as.example"], "https"),
        (["https://as.example#x"], "no query or fragment"),
        (["https://as.example?x=1"], "no query or fragment"),
        (["as.example"], "https"),
        ([1], "https"),
        ("https://as.example", "expected an array"),
    ],
)
def test_authorization_servers_setting(value, problem):
    data = {"servers": [{"name": "w", "url": MCP, "authorization_servers": value}]}
    if problem is None:
        assert config.parse(data).servers[0].authorization_servers == value
    else:
        with pytest.raises(config.ConfigError) as err:
            config.parse(data)
        assert len(err.value.problems) == 1
        assert err.value.problems[0].startswith("servers[0].authorization_servers: got ")
        assert problem in err.value.problems[0]


def test_a_configured_issuer_must_be_https_unless_loopback():
    with pytest.raises(config.ConfigError) as err:
        config.parse({"servers": [{"name": "w", "url": MCP, "issuer": "http://as.example"}]})
    assert err.value.problems[0].startswith('servers[0].issuer: got "http://as.example"')
    assert (
        config.parse({"servers": [{"name": "w", "url": MCP, "issuer": "http://127.0.0.1:4444"}]})
        .servers[0]
        .issuer
    )


@pytest.mark.parametrize(
    "uri,sent",
    [
        ("http://as.example/reg/c1", False),  # the management token would go in clear
        ("http://127.0.0.1:9/reg/c1", True),
        ("https://as.example/reg/c1", True),
    ],
)
def test_registration_management_token_goes_only_over_https_or_loopback(uri, sent):
    from agent.oauth import registration as reg

    client = reg.RegisteredClient(
        "spiffe://example.org/a", "https://as.example", "c1", uri, "registration-access-token"
    )
    result, asked = discover(lambda r: httpx.Response(204), lambda d: reg.delete(d.http, client))
    assert (asked == [uri]) is sent
    assert result is True if sent else isinstance(result, errors.InsecureEndpoint)
