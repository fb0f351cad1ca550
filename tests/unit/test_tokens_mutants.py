"""The token client's rules (agent/oauth/tokens.py), found by mutation testing: what is sent
to the token endpoint (the grant, the client assertion and its audience, the resource, the
scope, the DPoP proof and its nonce), how an answer is read (token_type, expires_in, scope,
the JWT claims credless checks before forwarding a token) and what an operator may read of
it (errors and debug lines that name the request, never the assertion or the token).

Sans-IO: the token endpoint is an httpx.MockTransport (nothing is dialled) and the clock is
the module's `time`, replaced."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import types
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest

from agent.oauth import tokens
from agent.oauth.dpop import DPoPKey
from agent.oauth.errors import (
    InsecureEndpoint,
    InvalidClient,
    MalformedResponse,
    OAuthError,
    ServerUnavailable,
    TokenRefused,
)
from agent.oauth.tokens import (
    JWT_BEARER,
    JWT_SPIFFE,
    Token,
    assertion_fingerprint,
    check_audience,
    fingerprint,
    parse_token_response,
    post_form,
    request_token,
)
from agent.oauth.trust import AuthorizationServerCertificateRefused, authorization_server_tls
from agent.observe import logging as obs

RES = "https://mcp.example.com/mcp"
ISSUER = "https://as.example"
ENDPOINT = "https://as.example/oauth2/token"
SID = "spiffe://example.org/w"
NOW = 1_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_like(claims: object, header: object = None) -> str:
    """An unsigned JWT-shaped string (the agent reads such claims, never verifies them)."""
    head = {"alg": "ES256"} if header is None else header
    return f"{b64(json.dumps(head).encode())}.{b64(json.dumps(claims).encode())}.sig"


def parse(body, **fields):
    defaults = dict(
        url=ENDPOINT, resource=RES, issuer=ISSUER, spiffe_id=SID, client_id=SID, dpop=None, now=NOW
    )
    return parse_token_response(body, **{**defaults, **fields})


@pytest.fixture
def clock(monkeypatch):
    """The module's clock, fixed at NOW (tokens.time.time() is all it reads)."""
    fake = types.SimpleNamespace(time=lambda: NOW)
    monkeypatch.setattr(tokens, "time", fake)
    return fake


# --- the token endpoint, in process -----------------------------------------------------


class Endpoint:
    """A token endpoint that answers each request with the next of `answers` (status, JSON
    body or raw bytes, headers), recording what it received."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, body, headers = self.answers.pop(0)
        if isinstance(body, bytes):
            return httpx.Response(status, content=body, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    def form(self, n: int = 0) -> dict[str, str]:
        fields = parse_qs(self.requests[n].content.decode(), keep_blank_values=True)
        assert all(len(v) == 1 for v in fields.values())
        return {k: v[0] for k, v in fields.items()}


class Minter:
    """mint_assertion: a fresh JWT-shaped assertion per call, recording (aud, iss)."""

    def __init__(self):
        self.calls: list[tuple[str, str | None]] = []
        self.minted: list[str] = []

    def __call__(self, aud: str, iss: str | None) -> str:
        self.calls.append((aud, iss))
        n = len(self.calls)
        a = jwt_like({"jti": f"jti-{n}", "iss": iss, "aud": aud}, {"alg": "ES256", "kid": "k7"})
        self.minted.append(a)
        return a


def ok(access: str = "opaque-access", token_type: str = "Bearer", **extra):  # noqa: S107
    return (200, {"access_token": access, "token_type": token_type, **extra}, {})


def run_request(endpoint: Callable[[httpx.Request], httpx.Response], **kw: Any) -> Any:
    """request_token over the endpoint; returns (token or the error raised, minter)."""
    minter = kw.pop("mint_assertion", None) or Minter()
    args: dict[str, Any] = dict(
        token_endpoint=ENDPOINT,
        issuer=ISSUER,
        resource=RES,
        scope="",
        profile="jwt-bearer",
        assertion_audience="issuer",
        client_id=SID,
        spiffe_id=SID,
        mint_assertion=minter,
        dpop=None,
        nonces={},
    )
    args.update(kw)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(endpoint)) as http:
            try:
                return await request_token(http, **args)
            except OAuthError as e:
                return e

    return asyncio.run(go()), minter


# --- what is sent ---------------------------------------------------------------------------


def test_the_request_is_a_client_credentials_grant_with_the_assertion_and_the_resource(clock):
    ep = Endpoint(ok())
    tok, minter = run_request(ep)
    assert isinstance(tok, Token)
    (req,) = ep.requests
    assert req.method == "POST" and str(req.url) == ENDPOINT
    assert req.headers["content-type"] == "application/x-www-form-urlencoded"
    assert req.headers["accept"] == "application/json"
    assert "dpop" not in req.headers  # no key: no proof
    assert ep.form() == {
        "grant_type": "client_credentials",
        "resource": RES,
        "client_assertion_type": JWT_BEARER,
        "client_assertion": minter.minted[0],
    }  # no scope asked, no client_id (it is the assertion's iss)


@pytest.mark.parametrize(
    "profile,audience,aud,iss,assertion_type",
    [
        ("jwt-bearer", "issuer", ISSUER, SID, JWT_BEARER),
        ("jwt-bearer", "token_endpoint", ENDPOINT, SID, JWT_BEARER),
        ("jwt-spiffe", "token_endpoint", ISSUER, None, JWT_SPIFFE),  # always the issuer
        ("jwt-spiffe", "issuer", ISSUER, None, JWT_SPIFFE),
    ],
)
def test_the_assertion_profile_chooses_its_audience_issuer_and_type(
    clock, profile, audience, aud, iss, assertion_type
):
    ep = Endpoint(ok())
    _, minter = run_request(ep, profile=profile, assertion_audience=audience)
    assert minter.calls == [(aud, iss)]
    assert ep.form()["client_assertion_type"] == assertion_type


@pytest.mark.parametrize(
    "profile,client_id,sent",
    [
        ("jwt-bearer", "registered-client", True),  # registration gave another client id
        ("jwt-bearer", SID, False),
        ("jwt-spiffe", "registered-client", False),  # the SVID's sub is the client
    ],
)
def test_a_client_id_other_than_the_spiffe_id_is_named_in_the_form(clock, profile, client_id, sent):
    ep = Endpoint(ok())
    _, minter = run_request(ep, profile=profile, client_id=client_id)
    form = ep.form()
    assert form.get("client_id") == (client_id if sent else None)
    if profile == "jwt-bearer":
        assert minter.calls[0][1] == client_id  # iss = sub = client_id


def test_a_scope_is_asked_for_only_when_configured(clock):
    ep = Endpoint(ok(), ok())
    run_request(ep, scope="tools:read tools:call")
    run_request(ep, scope="")
    assert ep.form(0)["scope"] == "tools:read tools:call"
    assert "scope" not in ep.form(1)


@pytest.mark.parametrize("endpoint", ["http://as.example/token", "ftp://as.example/token", ""])
def test_an_insecure_token_endpoint_gets_no_assertion(endpoint):
    ep = Endpoint()
    err, minter = run_request(ep, token_endpoint=endpoint)
    assert isinstance(err, InsecureEndpoint) and str(err).startswith(
        f"token endpoint {endpoint!r} refused: "
    )
    assert minter.calls == [] and ep.requests == []


def test_the_dpop_proof_binds_post_to_the_token_endpoint_with_the_issuers_nonce(clock):
    key = DPoPKey()
    key.note_nonce(ENDPOINT, "remembered-for-resources")  # the key's own: not for the AS
    ep = Endpoint(ok(jwt_like({"aud": RES, "cnf": {"jkt": key.jkt}}), "DPoP"), ok("o", "DPoP"))
    nonces = {"https://other-issuer.example": "theirs"}
    run_request(ep, dpop=key, nonces=nonces)
    nonces[ISSUER] = "n-1"
    run_request(ep, dpop=key, nonces=nonces)
    first, second = (
        jwt.decode(r.headers["dpop"], options={"verify_signature": False}) for r in ep.requests
    )
    header = jwt.get_unverified_header(ep.requests[0].headers["dpop"])
    assert header["typ"] == "dpop+jwt" and header["jwk"]
    assert first["htm"] == "POST" and first["htu"] == ENDPOINT
    assert "nonce" not in first  # none known for this issuer; the key's remembered one unused
    assert second["nonce"] == "n-1"


# --- the DPoP nonce challenge -----------------------------------------------------------


def nonce_challenge(nonce: str | None = "fresh-nonce", error: str = "use_dpop_nonce"):
    return (400, {"error": error}, {"DPoP-Nonce": nonce} if nonce is not None else {})


def test_a_nonce_challenge_is_answered_once_with_a_fresh_assertion_and_the_nonce(clock):
    key = DPoPKey()
    nonces: dict[str, str] = {}
    ep = Endpoint(nonce_challenge(), ok("opaque", "DPoP"))
    tok, minter = run_request(ep, dpop=key, nonces=nonces)
    assert isinstance(tok, Token) and tok.jkt == key.jkt
    assert len(ep.requests) == 2 and nonces == {ISSUER: "fresh-nonce"}
    assert ep.form(0)["client_assertion"] != ep.form(1)["client_assertion"]  # a fresh jti
    assert len(minter.calls) == 2
    retry = jwt.decode(ep.requests[1].headers["dpop"], options={"verify_signature": False})
    assert retry["nonce"] == "fresh-nonce"


def test_a_second_nonce_challenge_is_not_answered_again(clock):
    ep = Endpoint(nonce_challenge("n1"), nonce_challenge("n2"), ok())
    err, _ = run_request(ep, dpop=DPoPKey())
    assert isinstance(err, OAuthError) and err.error == "use_dpop_nonce" and err.status == 400
    assert len(ep.requests) == 2


@pytest.mark.parametrize(
    "answer,with_key",
    [
        (nonce_challenge(), False),  # no proof was sent: no nonce can help
        (nonce_challenge(None), True),  # no nonce given
        (nonce_challenge("bad nonce"), True),  # not the RFC's NQCHAR: never carried
        (nonce_challenge("x" * 1025), True),
        (nonce_challenge(error="invalid_dpop_proof"), True),  # another error
        ((400, ["use_dpop_nonce"], {"DPoP-Nonce": "n"}), True),  # not an error object
    ],
)
def test_only_a_valid_nonce_challenge_to_a_dpop_request_is_retried(clock, answer, with_key):
    ep = Endpoint(answer, ok())
    nonces: dict[str, str] = {}
    err, minter = run_request(ep, dpop=DPoPKey() if with_key else None, nonces=nonces)
    assert isinstance(err, OAuthError) and err.status == 400
    assert len(ep.requests) == 1 and len(minter.calls) == 1
    if answer[2].get("DPoP-Nonce") in ("n", "fresh-nonce"):
        assert nonces == {ISSUER: answer[2]["DPoP-Nonce"]}
    else:
        assert nonces == {}


def test_a_nonce_given_with_a_token_is_kept_for_the_next_request(clock):
    nonces: dict[str, str] = {}
    run_request(Endpoint((200, ok()[1], {"DPoP-Nonce": "later"})), nonces=nonces)
    assert nonces == {ISSUER: "later"}
    run_request(Endpoint((200, ok()[1], {"DPoP-Nonce": "not valid"})), nonces=nonces)
    assert nonces == {ISSUER: "later"}


# --- what a refusal says --------------------------------------------------------------------


def test_a_refusal_names_what_credless_sent_and_never_the_assertion(clock):
    ep = Endpoint((401, {"error": "invalid_client", "error_description": "unknown key"}, {}))
    err, minter = run_request(
        ep, client_id="registered-client", assertion_audience="token_endpoint"
    )
    assert isinstance(err, InvalidClient) and err.status == 401 and err.url == ENDPOINT
    text = str(err)
    assert text.startswith(f"token request at {ENDPOINT} failed with HTTP 401 (server said ")
    assert minter.minted[0] not in text
    assert "client_id 'registered-client'" in text and "jwt-bearer assertion" in text
    assert "key 'k7'" in text and "jti 'jti-1'" in text and f"audience {ENDPOINT!r}" in text
    assert "unknown key" in text


def test_a_token_received_is_checked_and_timed_from_the_request(clock):
    access = jwt_like({"aud": RES, "jti": "t-1"})
    tok, _ = run_request(Endpoint(ok(access, "bearer", expires_in=120, scope="a b")))
    assert tok.token_type == "Bearer" and tok.issued_at == NOW and tok.expires_at == NOW + 120
    assert (tok.scope, tok.jti, tok.issuer, tok.resource) == ("a b", "t-1", ISSUER, RES)
    assert (tok.spiffe_id, tok.client_id) == (SID, SID)
    other, _ = run_request(Endpoint(ok("opaque")), client_id="registered-client")
    assert (other.spiffe_id, other.client_id) == (SID, "registered-client")
    refused, _ = run_request(Endpoint(ok(jwt_like({"aud": "https://other.example/mcp"}))))
    assert isinstance(refused, TokenRefused) and refused.url == ENDPOINT
    assert str(refused).startswith(f"token response from {ENDPOINT}: the access token is for")
    weaker, _ = run_request(Endpoint(ok()), dpop=DPoPKey(), dpop_required="always")
    assert isinstance(weaker, TokenRefused)


@pytest.mark.parametrize(
    "answer,said",
    [
        ((503, {"error": "temporarily_unavailable"}, {}), "at {} failed with HTTP 503"),
        ((400, b"<html>no</html>", {}), "at {} answered HTTP 400 with a body that is not JSON"),
    ],
)
def test_a_token_request_that_fails_says_so_naming_the_endpoint(clock, answer, said):
    err, _ = run_request(Endpoint(answer))
    assert isinstance(err, (ServerUnavailable, MalformedResponse))
    assert str(err) == "token request " + said.format(ENDPOINT)

    def down(request):
        raise httpx.ConnectError("connection refused", request=request)

    err, _ = run_request(down)
    assert isinstance(err, ServerUnavailable)
    assert str(err) == f"token request to {ENDPOINT}: could not connect (connection refused)"


@pytest.fixture
def debug_lines():
    """The diagnostic stream at debug, as parsed lines (tests/conftest.py puts the logging
    set-up back after each test)."""
    out = io.StringIO()
    obs.configure(level="debug", fmt="json", stream=out)
    return lambda: [json.loads(line) for line in out.getvalue().splitlines()]


def test_debug_lines_name_the_request_and_the_token_by_fingerprint_only(clock, debug_lines):
    key = DPoPKey()
    access = jwt_like({"aud": RES, "jti": "t-9", "cnf": {"jkt": key.jkt}})
    ep = Endpoint(nonce_challenge(), ok(access, "DPoP", expires_in=300, scope="s"))
    tok, minter = run_request(ep, dpop=key, client_id="c9")
    lines = [line for line in debug_lines() if line.get("component") == "oauth"]
    text = json.dumps(lines)
    for secret in [access, *minter.minted, ep.requests[0].headers["dpop"]]:
        assert secret not in text
    sent = [line for line in lines if line["event"] == "token request"]
    assert [line["attempt"] for line in sent] == [1, 2]
    assert sent[0]["url"] == ENDPOINT and sent[0]["client_id"] == "c9"
    assert sent[0]["profile"] == "jwt-bearer" and sent[0]["resource"] == RES
    assert sent[0]["assertion_kid"] == "k7" and sent[0]["assertion_jti"] == "jti-1"
    assert sent[1]["assertion_jti"] == "jti-2" and sent[0]["assertion_aud"] == ISSUER
    assert sent[0]["dpop_jkt"] == key.jkt
    (refused,) = [line for line in lines if line["event"] == "token request refused"]
    assert refused["status"] == 400 and refused["error"] == "use_dpop_nonce"
    assert refused["attempt"] == 1 and refused["url"] == ENDPOINT
    (got,) = [line for line in lines if line["event"] == "token received"]
    assert got["token_sha256"] == tok.fingerprint == fingerprint(access)
    assert got["jti"] == "t-9" and got["jkt"] == key.jkt and got["token_type"] == "DPoP"
    assert got["expires_in"] == 300 and got["scope"] == "s" and got["url"] == ENDPOINT


# --- post_form ------------------------------------------------------------------------------


def post(endpoint, form=None, headers=None, json_body=None, tls=None, transport=None):
    async def go():
        t = transport or httpx.MockTransport(endpoint)
        async with httpx.AsyncClient(transport=t) as http:
            kw = {} if tls is None else {"tls": tls}
            try:
                return await post_form(
                    http, ENDPOINT, form, headers or {}, "token request", json_body=json_body, **kw
                )
            except OAuthError as e:
                return e

    return asyncio.run(go())


def test_post_form_sends_a_form_or_json_and_returns_the_answer():
    ep = Endpoint((201, {"a": 1}, {"X-Y": "z"}), (200, {"b": 2}, {}))
    status, body, headers = post(ep, form={"k": "v"}, headers={"Accept": "x/y", "H": "1"})
    assert (status, body, headers["x-y"]) == (201, {"a": 1}, "z")
    req = ep.requests[0]
    assert req.content == b"k=v" and req.headers["accept"] == "x/y" and req.headers["h"] == "1"
    post(ep, json_body={"redirect_uris": []})
    assert json.loads(ep.requests[1].content) == {"redirect_uris": []}
    assert ep.requests[1].headers["accept"] == "application/json"


@pytest.mark.parametrize(
    "status,unavailable", [(500, True), (503, True), (499, False), (400, False)]
)
def test_a_5xx_is_unavailable_whatever_its_body(status, unavailable):
    got = post(Endpoint((status, {"error": "invalid_client"}, {})))
    if unavailable:
        assert isinstance(got, ServerUnavailable) and got.status == status and got.url == ENDPOINT
        assert f"token request at {ENDPOINT} failed with HTTP {status}" in str(got)
    else:
        assert got[0] == status and got[1] == {"error": "invalid_client"}


@pytest.mark.parametrize("content", [b"<html>gateway</html>", b"", b"null"])
def test_an_answer_that_is_not_json_is_malformed(content):
    got = post(Endpoint((400, content, {})))
    assert isinstance(got, MalformedResponse) and not isinstance(got, TokenRefused)
    assert got.status == 400 and got.url == ENDPOINT
    assert "HTTP 400 with a body that is not JSON" in str(got)


def test_no_answer_is_unavailable_and_a_bad_certificate_is_refused(tmp_path):
    def down(request):
        raise httpx.ConnectError("connection refused", request=request)

    got = post(down)
    assert isinstance(got, ServerUnavailable) and got.url == ENDPOINT
    assert got.__cause__ is None
    assert str(got) == f"token request to {ENDPOINT}: could not connect (connection refused)"

    import ssl

    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_message = "unable to get local issuer certificate"

    def untrusted(request):
        raise httpx.ConnectError("certificate verify failed", request=request) from cause

    got = post(untrusted)  # verified, by default, against the system store
    assert isinstance(got, AuthorizationServerCertificateRefused) and got.url == ENDPOINT
    assert "unable to get local issuer certificate" in str(got)
    assert authorization_server_tls("").describe() in str(got)
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    got = post(untrusted, tls=authorization_server_tls(str(ca)))
    assert isinstance(got, AuthorizationServerCertificateRefused) and str(ca) in str(got)


# --- reading a token response ---------------------------------------------------------------


@pytest.mark.parametrize(
    "expires_in,exp,expires_at",
    [
        (300, None, NOW + 300),
        (2.5, None, NOW + 2.5),
        (1, NOW + 50, NOW + 1),  # one second is a lifetime
        (0.5, NOW + 50, NOW + 0.5),
        (300, NOW + 50, NOW + 300),  # expires_in wins over the JWT's exp
        (None, NOW + 50, NOW + 50),
        (0, NOW + 50, NOW + 50),  # not a lifetime
        (-5, None, NOW + 60),
        (True, None, NOW + 60),  # a bool is not a number of seconds
        ("300", None, NOW + 60),
        (None, "soon", NOW + 60),
        (None, None, NOW + 60),  # no lifetime given: short
    ],
)
def test_a_tokens_lifetime(expires_in, exp, expires_at):
    claims = {"aud": RES, **({"exp": exp} if exp is not None else {})}
    body = {"access_token": jwt_like(claims), "token_type": "Bearer"}
    if expires_in is not None:
        body["expires_in"] = expires_in
    tok = parse(body)
    assert tok.expires_at == expires_at and tok.issued_at == NOW


def test_an_opaque_tokens_default_lifetime_is_short():
    assert parse({"access_token": "opaque", "token_type": "Bearer"}).expires_at == NOW + 60


@pytest.mark.parametrize(
    "body",
    [
        {"access_token": "", "token_type": "Bearer"},
        {"access_token": 7, "token_type": "Bearer"},
        {"access_token": "x", "token_type": None},
        {"access_token": "x"},
        {"token_type": "Bearer"},
        "access_token=x",
        None,
    ],
)
def test_a_response_without_a_token_and_its_type_is_malformed(body):
    with pytest.raises(MalformedResponse) as err:
        parse(body)
    assert not isinstance(err.value, TokenRefused) and err.value.url == ENDPOINT
    assert ENDPOINT in str(err.value)


@pytest.mark.parametrize(
    "ttype,expected",
    [("Bearer", "Bearer"), ("BEARER", "Bearer"), ("dpop", "DPoP"), ("DPOP", "DPoP")],
)
def test_token_type_is_case_insensitive_and_said_canonically(ttype, expected):
    key = DPoPKey()
    tok = parse({"access_token": "opaque", "token_type": ttype}, dpop=key)
    assert tok.token_type == expected and tok.authorization() == f"{expected} opaque"
    assert tok.jkt == (key.jkt if expected == "DPoP" else None)


@pytest.mark.parametrize("ttype", ["mac", "N_A", "bearer2", ""])
def test_an_unknown_token_type_is_refused(ttype):
    with pytest.raises(MalformedResponse) as err:
        parse({"access_token": "x", "token_type": ttype})
    assert err.value.url == ENDPOINT and not isinstance(err.value, TokenRefused)
    assert str(err.value) == (
        f"token response from {ENDPOINT} has token_type {ttype!r}; expected Bearer or DPoP"
    )


def test_a_dpop_token_to_a_request_without_a_proof_is_malformed():
    with pytest.raises(MalformedResponse) as err:
        parse({"access_token": "x", "token_type": "DPoP"}, dpop=None)
    assert err.value.url == ENDPOINT
    assert str(err.value) == f"{ENDPOINT} issued a DPoP token to a request without a proof"


def test_an_opaque_dpop_token_is_taken_as_bound_to_our_key_even_where_required():
    key = DPoPKey()
    tok = parse({"access_token": "opaque", "token_type": "DPoP"}, dpop=key, dpop_required="x")
    assert tok.jkt == key.jkt and tok.token_type == "DPoP"


@pytest.mark.parametrize("cnf", [None, "jkt", ["jkt"], {}, {"x5t#S256": "t"}])
def test_a_dpop_jwt_without_a_key_binding_is_ours_only_where_dpop_is_not_required(cnf):
    key = DPoPKey()
    claims = {"aud": RES, **({"cnf": cnf} if cnf is not None else {})}
    body = {"access_token": jwt_like(claims), "token_type": "DPoP"}
    assert parse(body, dpop=key).jkt == key.jkt
    with pytest.raises(TokenRefused) as err:
        parse(body, dpop=key, dpop_required="servers.dpop = always")
    assert err.value.url == ENDPOINT
    assert str(err.value) == (
        f"{ENDPOINT} issued a DPoP token for {RES} that is a JWT without cnf.jkt (no key "
        "binding, RFC 9449 §6.1), but DPoP-bound tokens are required (servers.dpop = always)"
    )


def test_a_dpop_jwt_bound_to_another_key_is_refused_even_where_not_required():
    key = DPoPKey()
    body = {"access_token": jwt_like({"aud": RES, "cnf": {"jkt": "theirs"}}), "token_type": "DPoP"}
    with pytest.raises(MalformedResponse) as err:
        parse(body, dpop=key)
    assert err.value.url == ENDPOINT
    assert str(err.value) == f"{ENDPOINT} bound the token to key theirs, not ours"
    body = {"access_token": jwt_like({"aud": RES, "cnf": {"jkt": key.jkt}}), "token_type": "DPoP"}
    assert parse(body, dpop=key, dpop_required="x").jkt == key.jkt


def test_a_bearer_token_where_dpop_is_required_is_refused_naming_why():
    with pytest.raises(TokenRefused) as err:
        parse(
            {"access_token": "opaque", "token_type": "Bearer"}, dpop=DPoPKey(), dpop_required="why"
        )
    assert err.value.url == ENDPOINT
    assert str(err.value) == (
        f"{ENDPOINT} issued a Bearer token for {RES}, but DPoP-bound tokens are required (why); "
        "a stealable token is never used where a bound one was asked for (RFC 9449)"
    )


@pytest.mark.parametrize(
    "scope,expected", [("a b", "a b"), ("", ""), (None, ""), (["a", "b"], ""), (3, "")]
)
def test_scope_is_the_granted_string_or_nothing(scope, expected):
    body = {"access_token": "opaque", "token_type": "Bearer"}
    if scope is not None:
        body["scope"] = scope
    assert parse(body).scope == expected


def test_the_token_records_its_identity_fingerprint_jti_and_audience():
    access = jwt_like({"aud": [RES, "https://x"], "jti": "j"})
    tok = parse(
        {"access_token": access, "token_type": "Bearer"}, spiffe_id="spiffe://td/s", client_id="c"
    )
    assert (tok.access_token, tok.spiffe_id, tok.client_id, tok.issuer) == (
        access,
        "spiffe://td/s",
        "c",
        ISSUER,
    )
    assert tok.audience == [RES, "https://x"] and tok.jti == "j"
    assert tok.fingerprint == hashlib.sha256(access.encode()).hexdigest()[:16]
    assert (
        parse({"access_token": jwt_like({"aud": RES, "jti": 5}), "token_type": "Bearer"}).jti
        is None
    )


# --- which tokens are JWTs ------------------------------------------------------------------


@pytest.mark.parametrize(
    "access",
    [
        "a.b",  # two segments
        "a.b.c.d",
        f"{b64(b'{}')}.{b64(b'[1]')}",
        "e30.e30.sig.extra",  # {} . {} . sig . extra
        "e+0.e30.sig",
        "W10.e30.sig",  # the header is [] (not a JOSE header)
        "bm90.e30.sig",  # the header is not JSON
    ],
)
def test_tokens_that_are_not_jwts_are_opaque(access):
    tok = parse({"access_token": access, "token_type": "Bearer"})
    assert tok.audience is None and tok.jti is None


@pytest.mark.parametrize("payload", [b64(b"[1]"), b64(b'"aud"'), "bm90", b64(b"\xff\xfe")])
def test_a_jwt_header_with_a_payload_that_is_not_an_object_is_refused(payload):
    access = f"{b64(b'{}')}.{payload}.sig"
    with pytest.raises(TokenRefused) as err:
        parse({"access_token": access, "token_type": "Bearer"})
    assert err.value.url == ENDPOINT and access not in str(err.value)
    assert str(err.value) == (
        f"token response from {ENDPOINT}: the access token is a JWT whose payload is not a "
        "JSON object"
    )


def test_an_unsigned_jwt_with_an_empty_signature_is_still_a_jwt():
    access = f"{b64(b'{}')}.{b64(json.dumps({'aud': 'https://other.example'}).encode())}."
    with pytest.raises(TokenRefused):
        parse({"access_token": access, "token_type": "Bearer"})


# --- the audience check -----------------------------------------------------------------


@pytest.mark.parametrize(
    "claims,said",
    [
        ({}, "names no audience"),
        ({"aud": None}, "names no audience"),
        ({"aud": "https://other.example/mcp"}, "is for audience 'https://other.example/mcp'"),
        ({"resource": ["https://x.example"]}, "is for audience ['https://x.example']"),
        ({"aud": [None, 3, "mcp.example.com/mcp"]}, "is for audience"),  # no URL among them
    ],
)
def test_a_token_for_another_audience_is_refused_naming_it(claims, said):
    with pytest.raises(TokenRefused) as err:
        check_audience(claims, RES, ENDPOINT)
    assert err.value.url == ENDPOINT
    what = said if said != "is for audience" else f"is for audience {claims['aud']!r}"
    assert str(err.value) == (
        f"token response from {ENDPOINT}: the access token {what}, not this server ({RES}); a "
        "token for another resource is never sent to it (RFC 8707, RFC 9068 §4)"
    )


@pytest.mark.parametrize(
    "claims",
    [
        {"aud": RES + "/"},
        {"aud": [3, RES]},
        {"resource": [RES]},
        {"aud": "HTTPS://MCP.EXAMPLE.COM/mcp"},
    ],
)
def test_a_token_naming_this_server_passes(claims):
    check_audience(claims, RES, ENDPOINT)


# --- assertion_fingerprint ------------------------------------------------------------------


def test_assertion_fingerprint_names_its_key_jti_issuer_and_audience_only():
    a = jwt_like(
        {"jti": "j", "iss": "spiffe://x", "aud": ["https://as"], "sub": "s", "exp": 1},
        {"alg": "ES256", "kid": "k1", "typ": "JWT"},
    )
    assert assertion_fingerprint(a) == {
        "kid": "k1",
        "jti": "j",
        "iss": "spiffe://x",
        "aud": ["https://as"],
    }
    assert assertion_fingerprint(jwt_like({}, {})) == {
        "kid": None,
        "jti": None,
        "iss": None,
        "aud": None,
    }


@pytest.mark.parametrize(
    "assertion",
    [
        "",
        "not-a-jwt",
        "e30",  # one segment
        "bm90.e30.s",
        "e30.bm90.s",
        f"{b64(b'[]')}.e30.s",
        f"e30.{b64(b'[]')}.s",
        f"{b64(b'1')}.{b64(b'2')}.s",
    ],
)
def test_assertion_fingerprint_of_something_unreadable_is_empty(assertion):
    assert assertion_fingerprint(assertion) == {}


# --- the Token ------------------------------------------------------------------------------


def token(**kw: Any) -> Token:
    fields: dict[str, Any] = dict(
        access_token="secret-access",
        token_type="Bearer",
        issued_at=NOW,
        expires_at=NOW + 100,
        scope="s",
        resource=RES,
        issuer=ISSUER,
        spiffe_id=SID,
        client_id="c",
        jkt="thumb",
        fingerprint=fingerprint("secret-access"),
        jti="j",
        audience=RES,
    )
    fields.update(kw)
    return Token(**fields)


@pytest.mark.parametrize(
    "now,skew,valid",
    [
        (NOW, 5.0, True),
        (NOW + 94.9, 5.0, True),
        (NOW + 95, 5.0, False),  # this close to expiry it could expire on the way
        (NOW + 99, 0, True),
        (NOW + 100, 0, False),
        (NOW + 50, 50, False),
    ],
)
def test_a_token_is_valid_until_its_expiry_less_the_skew(now, skew, valid):
    assert token().valid(now, skew) is valid


def test_validity_defaults_to_the_clock_and_a_five_second_skew(clock):
    assert token(expires_at=NOW + 5.01).valid() and not token(expires_at=NOW + 5).valid()
    assert tokens.EXPIRY_SKEW_SECONDS == 5.0


def test_the_authorization_field_is_the_type_then_the_token():
    t = token(token_type="DPoP")
    assert t.authorization_bytes == b"DPoP secret-access"
    assert t.authorization_field == b"\r\nAuthorization: DPoP secret-access"


def test_a_tokens_summary_and_repr_say_everything_but_the_token(clock):
    t = token(expires_at=NOW + 42.7)
    assert t.summary() == {
        "token_type": "Bearer",
        "expires_in": 42,
        "scope": "s",
        "audience": RES,
        "resource": RES,
        "issuer": ISSUER,
        "client_id": "c",
        "spiffe_id": SID,
        "cnf_jkt": "thumb",
        "jti": "j",
        "token_sha256": fingerprint("secret-access"),
    }
    assert (
        repr(t)
        == str(t)
        == (
            f"Token(type=Bearer, fingerprint={fingerprint('secret-access')}, spiffe_id={SID}, "
            f"resource={RES}, expires_at={NOW + 43:.0f})"
        )
    )


def test_a_token_endpoint_whose_certificate_fails_is_refused_naming_the_ca_used(tmp_path):
    import ssl

    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_message = "self-signed certificate"

    def untrusted(request):
        raise httpx.ConnectError("certificate verify failed", request=request) from cause

    ca = tmp_path / "as-ca.pem"
    ca.write_text("")
    err, minter = run_request(untrusted, tls=authorization_server_tls(str(ca)))
    assert isinstance(err, AuthorizationServerCertificateRefused) and str(ca) in str(err)
    assert minter.minted[0] not in str(err)


# --- found while triaging: JSON nested deeper than the parser's recursion limit ---------------

DEEP = b"[" * 100_000 + b"]" * 100_000  # valid JSON; json.loads raises RecursionError on it


def test_an_answer_nested_too_deep_is_malformed_not_a_crash():
    got = post(Endpoint((200, DEEP, {})))
    assert isinstance(got, MalformedResponse) and got.url == ENDPOINT


def test_an_access_token_whose_payload_is_nested_too_deep_is_refused_not_a_crash():
    access = f"{b64(b'{}')}.{b64(DEEP)}.sig"
    with pytest.raises(TokenRefused):
        parse({"access_token": access, "token_type": "Bearer"})
