"""What credless asks an authorization server about a token it holds (agent/oauth/token_ops.py),
found by mutation testing: RFC 7662 introspection (the form sent, the claims answered and
nothing else, each refusal a caller reads) and RFC 7009 revocation (which cached tokens are
revoked and dropped, the form sent, which answers are success, which a server's error, which
worth retrying, and the audit event of each token, revoked or not).

Sans-IO: the service is a stand-in with a real TokenCache and AuditLog, its http client an
httpx.AsyncClient whose transport records each request and answers from routes; nothing is
dialled. No test prints a token or an assertion."""

from __future__ import annotations

import io
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from agent.identity.entries import Entry
from agent.identity.manager import Identity
from agent.identity.spiffeid import SpiffeId
from agent.oauth import token_ops
from agent.oauth.cache import TokenCache
from agent.oauth.discovery import ServerMetadata
from agent.oauth.errors import InvalidClient, InvalidGrant, OAuthError, ServerUnavailable
from agent.oauth.resolution import Resolved
from agent.oauth.tokens import JWT_BEARER, Token, fingerprint
from agent.oauth.trust import AuthorizationServerCertificateRefused, ServerTls
from agent.observe.logging import AuditLog
from tests.helpers import run_async as run

SID = "spiffe://example.org/w"
OTHER = "spiffe://example.org/v"
IDENT = Identity(SpiffeId.parse(SID), Entry("w", SID, frozenset()))
AS = "https://as.example"
INTROSPECT = AS + "/introspect"
REVOKE = AS + "/revoke"
ASSERTION = "client-assertion-for-the-test"
AUTH = {"client_assertion_type": JWT_BEARER, "client_assertion": ASSERTION}
AS_TLS = ServerTls("/etc/credless/as-ca.pem", "oauth.ca_file")
# what RFC 7662 introspection may tell about a token (never the token itself)
CLAIMS = ("active", "sub", "aud", "client_id", "exp", "iat", "scope", "token_type", "iss", "cnf")


@dataclass
class Sent:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes

    @property
    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode(), keep_blank_values=True))

    @property
    def json(self) -> Any:
        return json.loads(self.body)


Route = Callable[[httpx.Request], httpx.Response]


@dataclass
class Net:
    """The authorization server: routes by URL, every request recorded."""

    routes: dict[str, Route] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(
            Sent(
                request.method,
                str(request.url),
                {k.lower(): v for k, v in request.headers.items()},
                request.read(),
            )
        )
        route = self.routes.get(str(request.url))
        if route is None:
            return httpx.Response(404, json={"error": "not_found"})
        return route(request)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))


def answer(status: int, body: Any = None, content: bytes | None = None) -> Route:
    if content is not None:
        return lambda request: httpx.Response(status, content=content)
    return lambda request: httpx.Response(status, json=body)


def raising(exc: Callable[[httpx.Request], Exception]) -> Route:
    def route(request: httpx.Request) -> httpx.Response:
        raise exc(request)

    return route


def certificate_failure(request: httpx.Request) -> Exception:
    """What httpx raises when the server's certificate does not verify."""
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_message = "unable to get local issuer certificate"
    e = httpx.ConnectError("handshake failed", request=request)
    e.__cause__ = cause
    return e


def refused(request: httpx.Request) -> Exception:
    return httpx.ConnectError("connection refused", request=request)


def token(access: str, sid: str = SID, jti: str | None = "at-1") -> Token:
    return Token(
        access_token=access,
        token_type="Bearer",
        issued_at=0.0,
        expires_at=4e9,
        scope="",
        resource="https://mcp.example/mcp",
        issuer=AS,
        spiffe_id=sid,
        client_id=sid,
        jkt=None,
        fingerprint=fingerprint(access),
        jti=jti,
    )


async def never(key: Any) -> Token:
    raise AssertionError("no token is fetched here")


class Service:
    """The part of OAuthService token_ops uses: client_authentication (the resolved AS and
    the form fields that authenticate the client), http_client, as_tls, cache, audit."""

    def __init__(self, net: Net, audited: bool = True, **endpoints: str | None):
        self.net = net
        self.metadata = ServerMetadata(
            issuer=AS,
            token_endpoint=AS + "/token",
            introspection_endpoint=endpoints.get("introspection_endpoint", INTROSPECT),
            revocation_endpoint=endpoints.get("revocation_endpoint", REVOKE),
        )
        self.as_tls = AS_TLS
        self.cache: TokenCache = TokenCache(never)
        self.out = io.StringIO()
        self.audit = AuditLog("node-1", stream=self.out) if audited else None
        self.asked: list[tuple[Identity, str]] = []
        self._http = net.client()

    async def client_authentication(
        self, ident: Identity, server_name: str
    ) -> tuple[Resolved, dict[str, str]]:
        self.asked.append((ident, server_name))
        resolved = Resolved("https://mcp.example/mcp", AS, self.metadata, "", False)
        return resolved, dict(AUTH)

    def http_client(self) -> httpx.AsyncClient:
        return self._http

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]


def hold(svc: Service, sid: str, server: str, tok: Token, resource: str = "r") -> None:
    svc.cache.adopt((sid, server, resource, ""), tok)


# -- introspection


@run
async def test_introspection_sends_the_token_with_its_hint_and_the_clients_authentication():
    net = Net({INTROSPECT: answer(200, {"active": True, "scope": "s"})})
    svc = Service(net)
    tok = token("opaque-access-1")
    claims = await token_ops.introspect(svc, IDENT, "mcp", tok)
    assert claims == {"active": True, "scope": "s"}
    assert svc.asked == [(IDENT, "mcp")]
    (sent,) = net.sent
    assert (sent.method, sent.url) == ("POST", INTROSPECT)
    assert sent.form == {"token": tok.access_token, "token_type_hint": "access_token", **AUTH}
    assert sent.headers["accept"] == "application/json"


@run
async def test_introspection_answers_each_claim_it_may_tell_and_nothing_else():
    said = {name: f"value of {name}" for name in CLAIMS}
    said |= {"username": "alice", "access_token": "never-repeated", "ext": {"x": 1}}
    svc = Service(Net({INTROSPECT: answer(200, said)}))
    claims = await token_ops.introspect(svc, IDENT, "mcp", token("opaque-access-2"))
    assert claims == {name: f"value of {name}" for name in CLAIMS}


@run
async def test_introspection_invents_no_claim_the_server_did_not_say():
    svc = Service(Net({INTROSPECT: answer(200, {"active": False})}))
    assert await token_ops.introspect(svc, IDENT, "mcp", token("opaque-access-3")) == {
        "active": False
    }


@run
async def test_a_server_without_an_introspection_endpoint_is_named_and_nothing_is_sent():
    net = Net()
    svc = Service(net, introspection_endpoint=None)
    with pytest.raises(OAuthError) as caught:
        await token_ops.introspect(svc, IDENT, "mcp", token("opaque-access-4"))
    assert type(caught.value) is OAuthError
    assert AS in str(caught.value) and "introspection_endpoint" in str(caught.value)
    assert net.sent == []


@pytest.mark.parametrize(
    "status,body,cls,error",
    [
        (400, {"error": "invalid_client"}, InvalidClient, "invalid_client"),
        (401, {"error": "invalid_grant"}, InvalidGrant, "invalid_grant"),
        # only a 200 is an answer, whatever the body says
        (201, {"active": True}, OAuthError, None),
        (400, {"active": True}, OAuthError, None),
        # a 200 whose JSON is not an object is no answer; nor is an error that is not one
        (200, ["active"], OAuthError, None),
        (400, ["invalid_client"], OAuthError, None),
    ],
)
@run
async def test_an_introspection_that_is_not_a_200_object_is_the_servers_refusal(
    status, body, cls, error
):
    svc = Service(Net({INTROSPECT: answer(status, body)}))
    with pytest.raises(OAuthError) as caught:
        await token_ops.introspect(svc, IDENT, "mcp", token("opaque-access-5"))
    e = caught.value
    assert type(e) is cls
    assert (e.status, e.url, e.error) == (status, INTROSPECT, error)
    assert str(e).startswith(f"introspection at {INTROSPECT} failed with HTTP {status}")


@run
async def test_an_introspection_the_server_failed_is_worth_retrying_and_names_the_request():
    svc = Service(Net({INTROSPECT: answer(503, {"error": "temporarily_unavailable"})}))
    with pytest.raises(ServerUnavailable) as caught:
        await token_ops.introspect(svc, IDENT, "mcp", token("opaque-access-6"))
    assert caught.value.status == 503
    assert str(caught.value).startswith(f"introspection at {INTROSPECT} failed with HTTP 503")


@run
async def test_an_introspection_endpoint_whose_certificate_fails_names_the_agents_as_trust():
    svc = Service(Net({INTROSPECT: raising(certificate_failure)}))
    with pytest.raises(AuthorizationServerCertificateRefused) as caught:
        await token_ops.introspect(svc, IDENT, "mcp", token("opaque-access-7"))
    assert caught.value.url == INTROSPECT
    assert AS_TLS.describe() in str(caught.value)


@run
async def test_an_unreachable_introspection_endpoint_names_the_request():
    svc = Service(Net({INTROSPECT: raising(refused)}))
    with pytest.raises(ServerUnavailable) as caught:
        await token_ops.introspect(svc, IDENT, "mcp", token("opaque-access-8"))
    assert str(caught.value).startswith(f"introspection to {INTROSPECT}: could not connect")


# -- revocation: which tokens, and what each one's audit says


@run
async def test_revocation_revokes_and_drops_only_the_identitys_tokens_for_that_server():
    net = Net({REVOKE: answer(200, {})})
    svc = Service(net)
    mine = [token("access-mine-1", jti="at-1"), token("access-mine-2", jti=None)]
    other_server = token("access-other-server")
    other_identity = token("access-other-identity", sid=OTHER)
    hold(svc, SID, "mcp", mine[0], "r1")
    hold(svc, SID, "mcp", mine[1], "r2")
    hold(svc, SID, "other", other_server)
    hold(svc, OTHER, "mcp", other_identity)

    revoked = await token_ops.revoke(svc, SID, IDENT, "mcp", "operator asked")

    assert revoked == [t.fingerprint for t in mine]
    assert [t for _, t in svc.cache.tokens()] == [other_server, other_identity]
    assert [s.form["token"] for s in net.sent] == [t.access_token for t in mine]
    assert svc.asked == [(IDENT, "mcp"), (IDENT, "mcp")]
    events = svc.events()
    assert [e["event"] for e in events] == ["token.revoked", "token.revoked"]
    for e, t in zip(events, mine, strict=True):
        assert {k: e.get(k) for k in ("spiffe_id", "server", "issuer", "jti", "reason")} == {
            "spiffe_id": SID,
            "server": "mcp",
            "issuer": AS,
            "jti": t.jti,
            "reason": "operator asked",
        }
        assert e["token_sha256"] == t.fingerprint
        assert "error" not in e and "note" not in e
    assert all(t.access_token not in svc.out.getvalue() for t in mine)


@run
async def test_revocation_without_an_audit_log_still_revokes_and_drops():
    net = Net({REVOKE: answer(200, {})})
    svc = Service(net, audited=False)
    tok = token("access-unaudited")
    hold(svc, SID, "mcp", tok)
    assert await token_ops.revoke(svc, SID, IDENT, "mcp", "x") == [tok.fingerprint]
    assert svc.cache.tokens() == [] and len(net.sent) == 1


def failed(svc: Service) -> dict:
    (e,) = svc.events()
    assert e["event"] == "token.revocation_failed"
    assert e["note"] == "dropped; may be live until it expires"
    assert (e["spiffe_id"], e["server"], e["reason"]) == (SID, "mcp", "ended")
    return e


@run
async def test_a_token_of_an_identity_that_cannot_authenticate_is_dropped_and_said_live():
    net = Net({REVOKE: answer(200, {})})
    svc = Service(net)
    tok = token("access-orphan")
    hold(svc, SID, "mcp", tok)
    assert await token_ops.revoke(svc, SID, None, "mcp", "ended") == []
    assert svc.cache.tokens() == [] and net.sent == [] and svc.asked == []
    e = failed(svc)
    assert SID in e["error"] and e["token_sha256"] == tok.fingerprint


@run
async def test_a_server_without_a_revocation_endpoint_is_named_and_the_token_dropped():
    net = Net()
    svc = Service(net, revocation_endpoint=None)
    tok = token("access-no-endpoint")
    hold(svc, SID, "mcp", tok)
    assert await token_ops.revoke(svc, SID, IDENT, "mcp", "ended") == []
    assert svc.cache.tokens() == [] and net.sent == []
    e = failed(svc)
    assert AS in e["error"] and "revocation_endpoint" in e["error"]


@run
async def test_a_revocation_the_server_refuses_drops_the_token_and_audits_its_answer():
    svc = Service(Net({REVOKE: answer(400, {"error": "invalid_client"})}))
    tok = token("access-refused")
    hold(svc, SID, "mcp", tok)
    assert await token_ops.revoke(svc, SID, IDENT, "mcp", "ended") == []
    assert svc.cache.tokens() == []
    e = failed(svc)
    assert e["error"].startswith(f"revocation at {REVOKE} failed with HTTP 400")
    assert "invalid_client" in e["error"]


@run
async def test_revocation_goes_through_the_agents_as_trust():
    svc = Service(Net({REVOKE: raising(certificate_failure)}))
    hold(svc, SID, "mcp", token("access-bad-certificate"))
    assert await token_ops.revoke(svc, SID, IDENT, "mcp", "ended") == []
    assert AS_TLS.describe() in failed(svc)["error"]


# -- one RFC 7009 request


async def revoke_once(net: Net, **kw: Any) -> None:
    async with net.client() as http:
        await token_ops.revoke_token(http, REVOKE, "access-to-revoke", dict(AUTH), **kw)


@pytest.mark.parametrize("content", [b"", b"not json", b'{"ignored": true}'])
@run
async def test_a_revocation_answered_200_succeeds_whatever_its_body(content):
    net = Net({REVOKE: answer(200, content=content)})
    await revoke_once(net)
    (sent,) = net.sent
    assert (sent.method, sent.url) == ("POST", REVOKE)
    assert sent.form == {"token": "access-to-revoke", "token_type_hint": "access_token", **AUTH}
    assert sent.headers["accept"] == "application/json"


@pytest.mark.parametrize("status", [500, 502, 503])
@run
async def test_a_revocation_the_server_failed_is_worth_retrying(status):
    with pytest.raises(ServerUnavailable) as caught:
        await revoke_once(Net({REVOKE: answer(status, {"error": "invalid_client"})}))
    e = caught.value
    assert (e.status, e.url, e.error) == (status, REVOKE, None)
    assert str(e) == f"revocation at {REVOKE} failed with HTTP {status}"


@pytest.mark.parametrize(
    "status,route,cls,error",
    [
        (400, answer(400, {"error": "invalid_client"}), InvalidClient, "invalid_client"),
        (401, answer(401, {"error": "invalid_grant"}), InvalidGrant, "invalid_grant"),
        (499, answer(499, {}), OAuthError, None),
        (201, answer(201, {}), OAuthError, None),
        # a body that is not JSON, or not an object, names no error
        (400, answer(400, content=b"<html>bad request</html>"), OAuthError, None),
        (400, answer(400, ["invalid_client"]), OAuthError, None),
    ],
)
@run
async def test_a_revocation_refused_is_the_servers_error(status, route, cls, error):
    with pytest.raises(OAuthError) as caught:
        await revoke_once(Net({REVOKE: route}))
    e = caught.value
    assert type(e) is cls
    assert (e.status, e.url, e.error) == (status, REVOKE, error)
    assert str(e).startswith(f"revocation at {REVOKE} failed with HTTP {status}")


@pytest.mark.parametrize(
    "kw,trust", [({}, "the system store"), ({"tls": AS_TLS}, AS_TLS.describe())]
)
@run
async def test_a_revocation_endpoint_whose_certificate_fails_names_the_trust_used(kw, trust):
    with pytest.raises(AuthorizationServerCertificateRefused) as caught:
        await revoke_once(Net({REVOKE: raising(certificate_failure)}), **kw)
    assert caught.value.url == REVOKE and trust in str(caught.value)


@run
async def test_an_unreachable_revocation_endpoint_is_worth_retrying_and_names_the_request():
    with pytest.raises(ServerUnavailable) as caught:
        await revoke_once(Net({REVOKE: raising(refused)}))
    assert caught.value.url == REVOKE
    assert str(caught.value) == f"revocation to {REVOKE}: could not connect (connection refused)"
