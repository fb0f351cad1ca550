"""Discovery against a hostile MCP server and a hostile authorization server (issue 15,
item 6), with the real oidc-provider as the honest authorization server.

The MCP server is tests/mcp/hostile.py's: its 401 challenge and protected-resource metadata
(PRM) say whatever a test wants. The "wrong" authorization server listens on another loopback
address (127.0.0.2) and records every request that reaches it; the tests assert that no
assertion (nor anything else, mostly) ever arrived there. The agent's HTTP client goes
through a guard that dials loopback only and records anything else, so a test can name a
non-loopback endpoint (TEST-NET-1, 192.0.2.1) and show the agent never even tried it.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import time

import pytest

from agent.oauth import errors
from agent.observe import logging as obs
from tests.mcp.hostile import HostileMcpServer, LoopbackOnlyTransport, RecordingAuthorizationServer
from tests.oidc.stack import build, running

A = "spiffe://example.org/workload/a"
B = "spiffe://example.org/workload/b"
OFF_LOOPBACK = "192.0.2.1"  # TEST-NET-1: named, never dialled (the guard)
CAPTURED = io.StringIO()  # every diagnostic line of this module
JWT_SHAPED = re.compile(r"eyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]*")


@pytest.fixture(scope="module", autouse=True)
def capture_logs():
    obs.configure(level="debug", fmt="json", stream=CAPTURED)
    yield
    obs.configure(level="info", fmt="json")


@pytest.fixture
def make_world(tmp_path):
    """make_world(server={...} or f(oidc, wrong) -> {...}, oidc_kwargs=..., elsewhere_host=...)
    starts the hostile MCP server, the wrong AS, a third server on another origin, the real
    oidc-provider (which knows the hostile server's URL as a resource, scope "tools") and the
    agent's OAuth service for one [[servers]] entry "h" at the hostile server's URL. By default
    the hostile server is honest: its PRM names oidc-provider."""
    worlds = []
    with contextlib.ExitStack() as stack:

        def make(server=None, oidc_kwargs=None, elsewhere_host="127.0.0.2"):
            mcp = stack.enter_context(HostileMcpServer("127.0.0.1"))
            wrong = stack.enter_context(RecordingAuthorizationServer("127.0.0.2"))
            elsewhere = stack.enter_context(HostileMcpServer(elsewhere_host))
            guard = LoopbackOnlyTransport()
            audit = io.StringIO()

            def servers(oidc):
                extra = server(oidc, wrong) if callable(server) else dict(server or {})
                return [{"name": "h", "url": mcp.url, "scope": "tools", "issuer": "", **extra}]

            w = build(
                tmp_path,
                stream=audit,
                identities=(A, B),
                servers=servers,
                resources={mcp.url: {"format": "jwt", "scope": "tools"}},
                registered=(A,),
                oidc_kwargs=oidc_kwargs,
                default_issuer=False,
            )
            stack.enter_context(running(w, guard))
            w.mcp, w.wrong, w.elsewhere, w.guard, w.audit_stream = (
                mcp,
                wrong,
                elsewhere,
                guard,
                audit,
            )
            mcp.metadata([w.oidc.issuer])
            worlds.append(w)
            return w

        yield make
    for w in worlds:  # no assertion, token or proof in any log or audit line
        assert not JWT_SHAPED.search(CAPTURED.getvalue() + w.audit_stream.getvalue())


def audit(w, event: str) -> list[dict]:
    return [
        e
        for e in (json.loads(ln) for ln in w.audit_stream.getvalue().splitlines())
        if e["event"] == event
    ]


def token(w, sid: str = A):
    return w.run(w.svc.token(w.ident(sid), "h"))


def refused(w, cls, sid: str = A) -> errors.OAuthError:
    with pytest.raises(cls) as err:
        token(w, sid)
    return err.value


def pins(w) -> dict:
    path = w.state_dir / "oauth" / "authorization_servers.json"
    return json.loads(path.read_text()) if path.exists() else {}


def jwt_like(claims: dict) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa
    return f"{enc({'alg': 'ES256', 'typ': 'at+jwt'})}.{enc(claims)}.c2ln"


# ---------------------------------------------------------------- which AS may get assertions
def test_an_authorization_server_off_the_allow_list_never_gets_an_assertion(make_world):
    w = make_world(server=lambda oidc, wrong: {"authorization_servers": [oidc.issuer]})
    w.mcp.metadata([w.wrong.issuer])  # the server names its accomplice
    err = refused(w, errors.UntrustedAuthorizationServer)
    msg = str(err)
    assert "'h'" in msg and w.mcp.url in msg and w.wrong.issuer in msg and w.oidc.issuer in msg
    assert w.wrong.received() == []  # not even its metadata was asked for
    assert w.oidc.events("grant.success") == [] and w.oidc.events("grant.error") == []
    event = audit(w, "oauth.refused")[-1]
    assert event["check"] == "untrusted_authorization_server" and event["server"] == "h"
    assert event["spiffe_id"] == A and event["resource"] == w.mcp.url
    assert event["authorization_server"] == w.wrong.issuer
    assert event["allowed"] == [w.oidc.issuer] and event["reason"] == msg


def test_the_first_allowed_authorization_server_named_is_used(make_world):
    w = make_world(server=lambda oidc, wrong: {"authorization_servers": [oidc.issuer]})
    w.mcp.metadata([w.wrong.issuer, w.oidc.issuer])
    tok = token(w)
    assert tok.issuer == w.oidc.issuer
    assert w.oidc.events("grant.success")[-1]["client_id"] == A
    assert w.wrong.received() == []


def test_the_first_discovered_authorization_server_is_pinned_across_restarts(make_world):
    """No issuer and no list configured: the first AS discovered is pinned (persisted in
    state_dir); a server that later names another AS is refused, also after a restart."""
    w = make_world()
    assert token(w).issuer == w.oidc.issuer
    path = w.state_dir / "oauth" / "authorization_servers.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p["issuer"] for p in pins(w).values()] == [w.oidc.issuer]
    pinned = audit(w, "oauth.pinned")
    assert [(e["issuer"], e["server"], e["spiffe_id"]) for e in pinned] == [(w.oidc.issuer, "h", A)]

    w.mcp.metadata([w.wrong.issuer])  # the server turns hostile
    w.svc.discovery.invalidate()
    err = refused(w, errors.UntrustedAuthorizationServer, B)
    assert "pinned" in str(err) and str(path) in str(err)
    w.restart()  # and the agent restarts
    refused(w, errors.UntrustedAuthorizationServer, A)
    refused(w, errors.UntrustedAuthorizationServer, B)
    assert w.wrong.received() == []
    assert [p["issuer"] for p in pins(w).values()] == [w.oidc.issuer]  # never moved
    assert {e["spiffe_id"] for e in audit(w, "oauth.refused")} == {A, B}


def test_a_configured_issuer_is_used_without_asking_the_server(make_world):
    w = make_world(server=lambda oidc, wrong: {"issuer": oidc.issuer})
    w.mcp.metadata([w.wrong.issuer])
    assert token(w).issuer == w.oidc.issuer
    assert w.wrong.received() == [] and w.mcp.received() == []


# ---------------------------------------------------------------- where metadata comes from
@pytest.mark.parametrize(
    "elsewhere_host", ["127.0.0.2", "127.0.0.1"], ids=["other-host", "other-port"]
)
@pytest.mark.parametrize("own_metadata", [True, False], ids=["own-prm", "no-own-prm"])
def test_a_challenge_naming_metadata_on_another_origin_is_never_fetched(
    make_world, elsewhere_host, own_metadata
):
    """The challenge's resource_metadata URL must be on the MCP server's origin (RFC 9728
    §3, §5: the PRM URL derives from the resource). One elsewhere is ignored, never fetched,
    and audited; discovery goes on with the well-known URLs on the server's own origin."""
    w = make_world(elsewhere_host=elsewhere_host)
    w.elsewhere.metadata([w.wrong.issuer], resource=w.mcp.url, path="/prm")
    w.mcp.challenge(f'Bearer resource_metadata="{w.elsewhere.origin}/prm", scope="tools"')
    if own_metadata:
        assert token(w).issuer == w.oidc.issuer
    else:
        w.mcp.route("GET", "/.well-known/oauth-protected-resource/mcp", {}, 404)
        err = refused(w, errors.DiscoveryError)
        assert "no protected resource metadata" in str(err)
    assert w.elsewhere.received() == [] and w.wrong.received() == []
    event = audit(w, "oauth.refused")[0]
    assert event["check"] == "resource_metadata_origin" and event["spiffe_id"] == A
    assert event["url"] == f"{w.elsewhere.origin}/prm" and event["server"] == "h"


@pytest.mark.parametrize("claimed", ["other-path", "origin", "other-server"])
def test_metadata_for_another_resource_is_refused(make_world, claimed):
    """RFC 9728 §3.3: the PRM must name the resource it was fetched for (the configured URL;
    the origin only from the origin's own well-known URL)."""
    w = make_world()
    resource = {
        "other-path": f"{w.mcp.origin}/other",
        "origin": w.mcp.origin,
        "other-server": w.elsewhere.url,
    }[claimed]
    w.mcp.metadata([w.wrong.issuer], resource=resource)
    err = refused(w, errors.DiscoveryError)
    assert err.kind == "metadata_mismatch" and "RFC 9728" in str(err)
    assert w.wrong.received() == [] and pins(w) == {}
    assert audit(w, "oauth.refused")[-1]["check"] == "metadata_mismatch"


@pytest.mark.parametrize("chosen_by", ["issuer", "authorization_servers"])
def test_authorization_server_metadata_naming_another_issuer_is_refused(make_world, chosen_by):
    """RFC 8414 §3.3 (issue 16's missing test): metadata fetched for one issuer that names
    another (here: the honest AS, impersonated) is refused before its endpoints are used."""
    w = make_world(
        server=lambda oidc, wrong: {
            chosen_by: wrong.issuer if chosen_by == "issuer" else [wrong.issuer]
        }
    )
    w.mcp.metadata([w.wrong.issuer])
    w.wrong.publish(issuer=w.oidc.issuer)
    err = refused(w, errors.DiscoveryError)
    assert "RFC 8414 §3.3" in str(err) and w.oidc.issuer in str(err)
    assert [s.method for s in w.wrong.received()] == ["GET"]  # its metadata, nothing else
    assert w.wrong.credentials_received() == []


@pytest.mark.parametrize(
    "where",
    [
        "token_endpoint",
        "registration_endpoint",
        "jwks_uri",
        "introspection_endpoint",
        "issuer_in_prm",
    ],
)
def test_plain_http_endpoints_off_loopback_are_never_used(make_world, where):
    """https is required of every authorization-server URL the agent would use unless the
    host is loopback. The refusal comes before any connection: the guard saw none."""
    dynamic = {"registration": "dynamic"} if where == "registration_endpoint" else {}
    w = make_world(
        server={}
        if where == "issuer_in_prm"
        else lambda oidc, wrong: {"issuer": wrong.issuer, **dynamic}
    )
    insecure = f"http://{OFF_LOOPBACK}:{w.wrong.port}"
    if where == "issuer_in_prm":
        w.mcp.metadata([insecure])
    else:
        w.wrong.publish(**{where: f"{insecure}/{where}"})
    err = refused(w, errors.InsecureEndpoint)
    assert insecure in str(err) and "https" in str(err)
    assert w.guard.refused == []
    assert w.wrong.credentials_received() == [] and pins(w) == {}


def test_an_allowed_as_on_another_loopback_address_over_http_is_used(make_world):
    """The https rule has one exception, loopback; on loopback only the allow list decides
    (a PRM naming 127.0.0.2 is refused above because that AS is not allowed)."""
    w = make_world(server=lambda oidc, wrong: {"issuer": wrong.issuer, "dpop": "never"})
    w.wrong.token_response(
        {
            "access_token": jwt_like({"aud": w.mcp.url, "exp": time.time() + 60}),
            "token_type": "Bearer",
            "expires_in": 60,
        }
    )
    assert token(w).issuer == w.wrong.issuer
    assert [s.path for s in w.wrong.credentials_received()] == ["/token"]


# ---------------------------------------------------------------- what a token must be
@pytest.mark.parametrize(
    "claims,accepted",
    [
        ({"aud": "{mcp}"}, True),
        ({"resource": "{mcp}"}, True),
        ({"aud": "http://127.0.0.1:9/other"}, False),
        ({"aud": ["http://127.0.0.1:9/other", "https://x.example"]}, False),
        ({"aud": "{origin}"}, False),
        ({"resource": "http://127.0.0.1:9/other"}, False),
        ({}, False),
    ],
)
def test_a_jwt_access_token_for_another_audience_is_refused(make_world, claims, accepted):
    """A hostile (but allowed) AS answers with a JWT for another resource: the agent must
    never inject it into this server's requests, where the server could replay it."""
    w = make_world(server=lambda oidc, wrong: {"issuer": wrong.issuer, "dpop": "never"})
    fill = {"{mcp}": w.mcp.url, "{origin}": w.mcp.origin}
    claims = {
        k: ([fill.get(x, x) for x in v] if isinstance(v, list) else fill.get(v, v))
        for k, v in claims.items()
    }
    w.wrong.token_response(
        {
            "access_token": jwt_like({**claims, "exp": time.time() + 60}),
            "token_type": "Bearer",
            "expires_in": 60,
        }
    )
    if accepted:
        assert token(w).token_type == "Bearer"
        return
    err = refused(w, errors.OAuthError)
    assert err.kind == "token_refused" and w.mcp.url in str(err)
    assert w.svc.cache.tokens() == []
    failed = audit(w, "token.failed")[-1]
    assert failed["kind"] == "token_refused" and failed["server"] == "h"


@pytest.mark.parametrize("why", ["dpop-always", "prm-requires-dpop"])
def test_a_bearer_token_where_dpop_is_required_is_refused(make_world, why):
    """oidc-provider without DPoP ignores the proof and issues a Bearer token; where DPoP
    was required (servers.dpop = "always", or the PRM's dpop_bound_access_tokens_required)
    that token is refused, never cached or injected."""
    w = make_world(
        server={"dpop": "always"} if why == "dpop-always" else {}, oidc_kwargs={"dpop": False}
    )
    if why == "prm-requires-dpop":
        w.mcp.metadata([w.oidc.issuer], dpop_bound_access_tokens_required=True)
    err = refused(w, errors.OAuthError)
    assert err.kind == "token_refused" and "Bearer" in str(err) and "DPoP" in str(err)
    assert w.oidc.events("grant.success")  # the AS did issue one: a Bearer token
    assert w.svc.cache.tokens() == []
    assert audit(w, "token.failed")[-1]["kind"] == "token_refused"


def test_a_dpop_token_where_the_metadata_requires_dpop_is_accepted(make_world):
    w = make_world()
    w.mcp.metadata([w.oidc.issuer], dpop_bound_access_tokens_required=True)
    tok = token(w)
    assert tok.token_type == "DPoP" and tok.jkt == w.svc.dpop_key(A).jkt
