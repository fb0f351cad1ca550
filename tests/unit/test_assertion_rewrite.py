"""Assertion mode's rewriting of a workload's own token and registration requests
(agent/inject/assertion.py), sans-IO: which requests are credentialed (decide.py), and what
becomes of a placeholder, a missing assertion, the workload's own JWT and a client_secret,
for every grant where the client authenticates."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace
from urllib.parse import parse_qsl, urlencode

import pytest

from agent.inject import assertion_route
from agent.inject.assertion import (
    JWT_BEARER,
    Refused,
    is_jwt,
    jti_of,
    rewrite_registration,
    rewrite_token_form,
)
from agent.oauth.errors import RegistrationError

SID = "spiffe://example.org/agent/a"
ISSUER = "https://as.example"
REG = "https://as.example/reg"
JWKS_URI = "https://node.example:8444/jwks.json"
MINTED = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJjcmVkbGVzcyJ9.c2ln"  # what the fake mint returns


def b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


WORKLOAD_JWT = f"{b64({'alg': 'ES256', 'typ': 'JWT'})}.{b64({'sub': 'me', 'jti': 'w-1'})}.c2ln"


def mint(audience: str = ISSUER):
    return lambda: SimpleNamespace(token=MINTED, jti="jti-1", audience=(audience,))


def form(body: bytes) -> list[tuple[str, str]]:
    return parse_qsl(body.decode(), keep_blank_values=True)


GRANTS = {
    "client_credentials": [("scope", "tools"), ("resource", "https://a/mcp")],
    "refresh_token": [("refresh_token", "rt-opaque")],
    "authorization_code": [
        ("code", "c0de"),
        ("redirect_uri", "http://127.0.0.1:1/cb"),
        ("code_verifier", "v" * 43),
    ],
    "urn:ietf:params:oauth:grant-type:token-exchange": [
        ("subject_token", "st"),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:access_token"),
        ("resource", "https://a/mcp"),
        ("resource", "https://b/mcp"),  # repeatable (RFC 8707, 8693): kept, both
    ],
    # the grant's own `assertion` is the authorization grant, not client authentication
    "urn:ietf:params:oauth:grant-type:jwt-bearer": [("assertion", WORKLOAD_JWT)],
}


@pytest.mark.parametrize("grant", sorted(GRANTS))
@pytest.mark.parametrize(
    "sent, action",
    [
        ([("client_assertion", "placeholder"), ("client_assertion_type", JWT_BEARER)], "replaced"),
        ([], "added"),
        ([("client_id", SID), ("client_secret", "s3cret")], "added"),
    ],
    ids=["placeholder", "missing", "client-secret"],
)
def test_every_grant_gets_credless_client_authentication(grant, sent, action):
    params = GRANTS[grant]
    body = urlencode([("grant_type", grant), *params, *sent]).encode()
    out = rewrite_token_form(body, SID, mint())
    pairs = form(out.body)
    # the grant's own parameters unchanged and in order, then credless's authentication
    assert pairs == [
        ("grant_type", grant),
        *params,
        ("client_id", SID),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", MINTED),
    ]
    assert "s3cret" not in out.body.decode() and "placeholder" not in out.body.decode()
    assert out.fields["action"] == action and out.fields["grant_type"] == grant
    assert out.fields["jti"] == "jti-1" and out.fields["request"] == assertion_route.TOKEN
    assert out.fields["removed"] == (["client_secret"] if "client_secret" in dict(sent) else [])
    assert MINTED not in json.dumps(out.fields)  # the audit names the jti, not the value


def test_a_workloads_own_jwt_assertion_is_refused_by_default():
    body = urlencode(
        {"grant_type": "client_credentials", "client_assertion": WORKLOAD_JWT}
    ).encode()
    minted = []
    with pytest.raises(Refused) as e:
        rewrite_token_form(body, SID, lambda: minted.append(1) or mint()())
    assert e.value.error == "invalid_request" and "workload_assertion" in e.value.description
    assert e.value.fields == {"what": "client_assertion", "workload_jti": "w-1"}
    assert WORKLOAD_JWT not in e.value.description
    assert not minted  # nothing of credless's is made for a refused request


def test_a_workloads_own_jwt_assertion_is_replaced_when_configured():
    body = urlencode(
        {"grant_type": "client_credentials", "client_assertion": WORKLOAD_JWT, "client_id": "x"}
    ).encode()
    out = rewrite_token_form(body, SID, mint(), "replace")
    assert dict(form(out.body))["client_assertion"] == MINTED
    assert WORKLOAD_JWT not in out.body.decode()
    assert out.fields["action"] == "replaced_workload_jwt" and out.fields["workload_jti"] == "w-1"
    assert out.fields["workload_client_id"] == "x"


@pytest.mark.parametrize("name", ["client_assertion", "client_id", "grant_type", "client_secret"])
def test_a_client_authentication_parameter_given_twice_is_refused(name):
    body = f"grant_type=client_credentials&{name}=a&{name}=b".encode()
    with pytest.raises(Refused, match="more than once"):
        rewrite_token_form(body, SID, mint())


@pytest.mark.parametrize(
    "body,why",
    [
        (b"grant_type=client_credentials&\xff=1", "not ASCII"),
        (b"a=%ff", "not UTF-8"),
        (b"novalue", "not name=value"),
        (b"grant_type=client_credentials&client_secret:s3cr3t-v4lue", "not name=value"),
        (b"&".join([b"a=1"] * 257), "more than 256 fields"),
    ],
)
def test_a_body_that_is_not_a_valid_form_is_refused_never_quoting_it(body, why):
    with pytest.raises(Refused, match="not a valid form") as err:
        rewrite_token_form(body, SID, mint())
    assert why in err.value.description
    assert "s3cr3t" not in err.value.description  # the audit and the answer quote it


def test_the_jwt_spiffe_profile_names_its_assertion_type():
    spiffe = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
    out = rewrite_token_form(b"grant_type=client_credentials", SID, mint(), "refuse", spiffe)
    assert dict(form(out.body))["client_assertion_type"] == spiffe


@pytest.mark.parametrize(
    "value, jwt",
    [
        ("placeholder-assertion-credless-will-replace", False),
        ("", False),
        ("a.b.c", False),  # three parts, no JSON header
        (WORKLOAD_JWT, True),
        (f"{b64({'alg': 'none'})}.{b64({'sub': 'x'})}.", True),  # unsigned: still a JWT
        (f"{b64({'alg': 'RSA-OAEP', 'enc': 'A256GCM'})}.a.b.c.d", True),  # JWE
        ('{"payload": "x", "signatures": []}', True),  # JWS JSON serialization
        ("{not json", False),
    ],
)
def test_what_counts_as_a_workloads_own_jwt(value, jwt):
    assert is_jwt(value) is jwt


def test_jti_of_reads_an_unverified_jws():
    assert jti_of(WORKLOAD_JWT) == "w-1" and jti_of("placeholder") is None


# ---------------------------------------------------------------- registration (RFC 7591)
def register(meta: dict, jwks_uri: str | None = JWKS_URI, policy: str = "refuse"):
    return rewrite_registration(
        json.dumps(meta).encode(),
        SID,
        mint(REG),
        endpoint=REG,
        jwks_uri=jwks_uri,
        jwks=lambda: {"keys": [{"kty": "EC", "kid": "k"}]},
        workload_assertion=policy,
    )


def test_a_registration_gets_the_spiffe_identitys_metadata_and_keeps_the_rest():
    out = register(
        {
            "client_name": "my agent",
            "grant_types": ["client_credentials", "refresh_token"],
            "token_endpoint_auth_method": "client_secret_basic",
            "jwks": {"keys": []},
            "software_statement": "placeholder",
        }
    )
    meta = json.loads(out.body)
    assert meta["client_name"] == "my agent"
    assert meta["grant_types"] == ["client_credentials", "refresh_token"]
    assert meta["token_endpoint_auth_method"] == "private_key_jwt"
    assert meta["jwks_uri"] == JWKS_URI and "jwks" not in meta
    assert meta["software_statement"] == MINTED and meta["spiffe_id"] == SID
    assert (
        out.fields["action"] == "replaced" and out.fields["request"] == assertion_route.REGISTRATION
    )
    # the statement's audience is the registration endpoint: echoed back to the workload,
    # it is no client assertion at the token endpoint
    assert out.fields["audience"] == REG
    assert out.fields["replaced"] == ["jwks", "token_endpoint_auth_method"]


def test_a_registration_without_a_jwks_uri_carries_the_keys_inline():
    meta = json.loads(register({"client_name": "x"}, jwks_uri=None).body)
    assert meta["jwks"] == {"keys": [{"kty": "EC", "kid": "k"}]} and "jwks_uri" not in meta


def test_a_registration_with_a_plain_http_jwks_uri_for_another_host_is_refused():
    with pytest.raises(RegistrationError, match="plain http"):
        register({"client_name": "x"}, jwks_uri="http://node.example:8444/jwks.json")


def test_a_workloads_own_software_statement_is_refused_or_replaced():
    with pytest.raises(Refused) as e:
        register({"software_statement": WORKLOAD_JWT})
    assert e.value.error == "invalid_software_statement"
    out = register({"software_statement": WORKLOAD_JWT}, policy="replace")
    assert json.loads(out.body)["software_statement"] == MINTED
    assert out.fields["workload_jti"] == "w-1"


@pytest.mark.parametrize(
    "body", [b'{"jwks_uri": "a", "jwks_uri": "b"}', b"[1]", b"not json"], ids=str
)
def test_a_registration_body_credless_cannot_read_unambiguously_is_refused(body):
    with pytest.raises(Refused):
        rewrite_registration(body, SID, mint(REG), endpoint=REG, jwks_uri=JWKS_URI, jwks=dict)


# ---------------------------------------------------------------- which requests
@pytest.mark.parametrize(
    "target, ctype, registration, kind",
    [
        (b"/token", b"application/x-www-form-urlencoded", None, assertion_route.TOKEN),
        (
            b"/token?x=1",
            b"application/x-www-form-urlencoded;charset=utf-8",
            None,
            assertion_route.TOKEN,
        ),
        (b"/reg", b"application/json", None, assertion_route.CANDIDATE),
        (b"/reg", b"application/json", b"/reg", assertion_route.REGISTRATION),
        (b"/other", b"application/json", b"/reg", None),
        (b"/token", b"application/json", None, None),
        (b"/reg", b"application/x-www-form-urlencoded", b"/reg", None),
        (b"/token", b"text/plain", None, None),
        (b"/token", None, None, None),
    ],
)
def test_which_requests_assertion_mode_credentials(target, ctype, registration, kind):
    assert assertion_route.assertion_request(target, ctype, b"/token", registration) == kind
