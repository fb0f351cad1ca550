"""OAuth with SPIFFE credentials against the real oidc-provider, on loopback.

The agent's own parts run in-process (identity manager, bundle endpoint as the clients'
jwks_uri, OAuth service); the authorization server is oidc-provider started by the test.
"""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import jwt
import pytest

from agent.oauth import errors
from agent.observe import logging as obs
from tests.helpers import serving
from tests.oidc.stack import build as stack_build
from tests.oidc.stack import running

A = "spiffe://example.org/workload/a"
B = "spiffe://example.org/workload/b"
JWT_RES = "http://127.0.0.1:9/mcp"  # resource identifiers: never dialled here
OPAQUE_RES = "http://127.0.0.1:10/mcp"
CAPTURED = io.StringIO()  # every log and audit line of this module


@pytest.fixture(scope="module", autouse=True)
def capture_logs():
    obs.configure(level="debug", fmt="json", stream=CAPTURED)
    yield
    obs.configure(level="info", fmt="json")


# dpop "always": oidc-provider binds tokens, and this server (no MCP peer) never asks for DPoP
DEFAULT_SERVERS = [
    {"name": "jwt", "url": JWT_RES, "scope": "tools:read tools:call", "dpop": "always"}
]


def build(tmp_path, oidc_kwargs=None, servers=None, registered=(A,)):
    return stack_build(
        tmp_path,
        stream=CAPTURED,
        identities=(A, B),
        servers=servers or DEFAULT_SERVERS,
        registered=registered,
        resources={
            JWT_RES: {"format": "jwt", "scope": "tools:read tools:call"},
            OPAQUE_RES: {"format": "opaque", "scope": "tools:read"},
        },
        oidc_kwargs=oidc_kwargs,
    )


@pytest.fixture
def stack(tmp_path, request):
    params = getattr(request, "param", {}) or {}
    s = build(tmp_path, **params)
    s.params = params
    s.tokens = []
    with running(s):
        yield s
    # the whole module's logs must hold none of the credentials it handled
    text = CAPTURED.getvalue()
    for t in s.tokens:
        assert t not in text


def server_jwks(oidc) -> jwt.PyJWKSet:
    return jwt.PyJWKSet.from_dict(httpx.get(f"{oidc.issuer}/jwks").json())


def test_dpop_bound_jwt_token_with_a_jwt_svid_assertion(stack):
    tok = stack.run(stack.svc.token(stack.ident(A), "jwt"))
    stack.tokens.append(tok.access_token)
    assert tok.token_type == "DPoP"
    key = server_jwks(stack.oidc).keys[0].key
    claims = jwt.decode(tok.access_token, key, algorithms=["ES256"], audience=JWT_RES)
    assert claims["client_id"] == A and claims["iss"] == stack.oidc.issuer
    assert claims["cnf"]["jkt"] == stack.svc.dpop_key(A).jkt == tok.jkt
    assert set(claims["scope"].split()) == {"tools:read", "tools:call"}
    success = stack.oidc.events("grant.success")
    assert success and success[-1]["client_id"] == A
    audit = [json.loads(ln) for ln in CAPTURED.getvalue().splitlines() if '"stream": "audit"' in ln]
    obtained = [e for e in audit if e["event"] == "token.obtained"][-1]
    assert obtained["jti"] == claims["jti"] and obtained["jkt"] == tok.jkt
    assert obtained["token_sha256"] == tok.fingerprint


@pytest.mark.parametrize(
    "stack",
    [{"servers": [{"name": "jwt", "url": JWT_RES, "auth_profile": "jwt-spiffe", "dpop": "never"}]}],
    indirect=True,
)
def test_jwt_spiffe_profile(stack):
    tok = stack.run(stack.svc.token(stack.ident(A), "jwt"))
    stack.tokens.append(tok.access_token)
    assert tok.token_type == "Bearer" and tok.jkt is None
    assert stack.oidc.events("grant.success")[-1]["client_id"] == A


@pytest.mark.parametrize(
    "stack", [{"servers": [{"name": "op", "url": OPAQUE_RES, "dpop": "always"}]}], indirect=True
)
def test_opaque_token_is_introspected_active_with_sub_and_aud(stack):
    ident = stack.ident(A)
    tok = stack.run(stack.svc.token(ident, "op"))
    stack.tokens.append(tok.access_token)
    assert tok.jti is None  # opaque: nothing to read in it
    info = stack.run(stack.svc.introspect(ident, "op", tok))
    # oidc-provider names the client of a client_credentials token in client_id; it has no
    # end-user, so it sends no sub (RFC 7662 makes sub optional)
    assert info["active"] is True and info["client_id"] == A and "sub" not in info
    assert info["aud"] == OPAQUE_RES and info["token_type"] == "DPoP"


@pytest.mark.parametrize(
    "stack",
    [
        {
            "oidc_kwargs": {"registration": True},
            "registered": (),
            "servers": [{"name": "jwt", "url": JWT_RES, "registration": "dynamic"}],
        }
    ],
    indirect=True,
)
def test_dynamic_registration_then_token_then_delete(stack):
    ident = stack.ident(B)
    tok = stack.run(stack.svc.token(ident, "jwt"))
    stack.tokens.append(tok.access_token)
    created = stack.oidc.events("registration_create.success")
    assert [e["client_id"] for e in created] == [B]
    assert tok.client_id == B
    stored = stack.svc.store.for_identity(B)
    assert [c.client_id for c in stored] == [B]
    assert oct((stack.svc.store.path.stat().st_mode) & 0o777) == "0o600"
    out = stack.run(stack.svc.forget(B, grace=0))  # at once: no grace period
    assert out == {"tokens_dropped": 1, "clients_deleted": [B]}
    assert [e["client_id"] for e in stack.oidc.events("registration_delete.success")] == [B]
    assert stack.svc.store.for_identity(B) == []


def test_unknown_client_is_refused_with_the_servers_reason(stack):
    with pytest.raises(errors.InvalidClient) as err:
        stack.run(stack.svc.token(stack.ident(B), "jwt"))  # B is not registered
    assert err.value.error == "invalid_client"
    assert stack.oidc.events("grant.error")[-1]["error"] == "invalid_client"


def _raw_request(stack, mint, token_endpoint=None, issuer=None):
    """A client-credentials request for A with the assertion mint(audience, issuer) makes,
    to oidc-provider unless another endpoint is given."""
    from agent.oauth.tokens import request_token

    return stack.run(
        request_token(
            stack.svc.http,
            token_endpoint=token_endpoint or stack.oidc.token_endpoint,
            issuer=issuer or stack.oidc.issuer,
            resource=JWT_RES,
            scope="",
            profile="jwt-bearer",
            assertion_audience="issuer",
            client_id=A,
            spiffe_id=A,
            mint_assertion=mint,
            dpop=None,
            nonces={},
        )
    )


def test_wrong_audience_and_expired_assertions_are_refused(stack):
    ident = stack.ident(A)
    with pytest.raises(errors.InvalidClient):
        _raw_request(
            stack,
            lambda aud, iss: stack.mgr.jwt_svid(ident, ["https://other.example"], iss=iss).token,
        )
    assert "aud" in stack.oidc.events("grant.error")[-1]["reason"]
    real_clock = stack.mgr.source.keys.clock
    stack.mgr.source.keys.clock = lambda: real_clock() - 3600  # minted an hour ago
    try:
        with pytest.raises(errors.InvalidClient):
            _raw_request(
                stack, lambda aud, iss: stack.mgr.jwt_svid(ident, [aud], ttl=60, iss=iss).token
            )
    finally:
        stack.mgr.source.keys.clock = real_clock
    assert "expired" in stack.oidc.events("grant.error")[-1]["reason"]


@pytest.mark.parametrize("stack", [{"oidc_kwargs": {"require_nonce": True}}], indirect=True)
def test_dpop_nonce_challenge_is_answered_once(stack):
    tok = stack.run(stack.svc.token(stack.ident(A), "jwt"))
    stack.tokens.append(tok.access_token)
    assert tok.token_type == "DPoP"
    errs = [e["error"] for e in stack.oidc.events("grant.error")]
    assert errs == ["use_dpop_nonce"] and len(stack.oidc.events("grant.success")) == 1


def test_server_stopped_cached_token_served_new_identity_gets_clear_error(stack):
    ident_a = stack.ident(A)
    first = stack.run(stack.svc.token(ident_a, "jwt"))
    stack.tokens.append(first.access_token)
    stack.oidc.stop()
    assert stack.run(stack.svc.token(ident_a, "jwt")) is first
    assert stack.mgr.source.entries()  # B's identity exists but has never had a token
    with pytest.raises(errors.ServerUnavailable) as err:
        stack.run(stack.svc.token(stack.ident(B), "jwt"))
    assert "token request to " in str(err.value) and stack.oidc.issuer in str(err.value)
    assert "could not connect" in str(err.value)


def test_server_answering_garbage_is_a_malformed_response(stack, tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Garbage(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"<html>surprise</html>")

        def log_message(self, *a):
            pass

    with (
        serving(ThreadingHTTPServer(("127.0.0.1", 0), Garbage)) as srv,
        pytest.raises(errors.MalformedResponse, match="not JSON"),
    ):
        _raw_request(
            stack,
            lambda a, i: "not-a-real-assertion",
            token_endpoint=f"http://127.0.0.1:{srv.server_address[1]}/t",
            issuer="x",
        )


def test_two_hundred_concurrent_requests_make_one_token_request(stack):
    ident = stack.ident(A)

    async def many():
        return await asyncio.gather(*(stack.svc.token(ident, "jwt") for _ in range(200)))

    toks = stack.run(many())
    stack.tokens.append(toks[0].access_token)
    assert len({t.fingerprint for t in toks}) == 1
    assert len(stack.oidc.events("grant.success")) == 1
