"""The OAuth service (agent/oauth/service.py), found by mutation testing: which token is
obtained for which identity at which server's authorization server (the assertion minted,
the form sent, the DPoP key), the cache (a hit served without a request, the key memo,
refresh ahead of expiry, a refused token invalidated), the errors a caller reads and what
is audited and counted for each outcome, the lifecycle (start's HTTP client, stop, the
identity's end, run_sync from another thread) and the operator's probe. No token,
assertion or key ever appears in an error, an audit event or a log line.

The network is an httpx MockTransport-like recorder standing in for
httpx.AsyncHTTPTransport, so the client start() builds (its TlsRouter, headers, timeout,
redirect setting) is the one under test: it records what was sent, through which
transport (its verify and trust_env) and with which MCP server trust; nothing is dialled.
The clocks are injected: the service's wall clock (the cache's) and its monotonic clock (the
cache-key memo, a failure's latency)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry

from agent import __version__
from agent.config import Config, InjectSection, OAuthSection, ServerSection
from agent.identity.entries import Entry
from agent.identity.jwtsvid import JwtSvid
from agent.identity.manager import Identity
from agent.identity.spiffeid import SpiffeId
from agent.oauth import service as service_module
from agent.oauth.discovery import SERVER_TLS
from agent.oauth.errors import (
    DiscoveryError,
    InvalidClient,
    OAuthError,
    TokenRefused,
    UntrustedAuthorizationServer,
)
from agent.oauth.resolution import AdHocServer
from agent.oauth.service import KEY_MEMO_SECONDS, OAuthService
from agent.oauth.tokens import JWT_BEARER, JWT_SPIFFE
from agent.oauth.trust import AuthorizationServerCertificateRefused, ServerTls
from agent.observe.logging import AuditLog
from tests.tlsca import TestCA
from tests.unit import test_tokens_mutants
from tests.unit.test_as_certificate import Minting

SID = "spiffe://example.org/w"
OTHER = "spiffe://example.org/v"
IDENT = Identity(SpiffeId.parse(SID), Entry("w", SID, frozenset()))
IDENT2 = Identity(SpiffeId.parse(OTHER), Entry("v", OTHER, frozenset()))
MCP = "http://127.0.0.1:9/mcp"
PRM = "http://127.0.0.1:9/.well-known/oauth-protected-resource/mcp"
AS = "http://127.0.0.1:8"
AS_META = AS + "/.well-known/oauth-authorization-server"
TOKEN_EP = AS + "/token"
AS2 = "http://127.0.0.2:8"

debug_lines = test_tokens_mutants.debug_lines  # the diagnostic stream at debug, parsed


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64(obj: dict) -> str:
    return b64url(json.dumps(obj).encode())


@dataclass
class Minted:
    spiffe_id: str
    audience: tuple[str, ...]
    ttl: int | None
    iss: str | None
    token: str


class Minter(Minting):
    """The identity manager: each JWT-SVID minted is recorded, with a secret of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.minted: list[Minted] = []

    def jwt_svid(
        self, ident: Identity, audience: list[str], ttl: int | None = None, iss: str | None = None
    ) -> JwtSvid:
        n = len(self.minted) + 1
        head = b64({"alg": "ES256", "kid": "k1"})
        token = f"{head}.{b64({'jti': f'jti-{n}'})}.assertion-signature-{n}"
        self.minted.append(Minted(str(ident.spiffe_id), tuple(audience), ttl, iss, token))
        return JwtSvid(token, ident.spiffe_id, tuple(audience), f"jti-{n}", 0, 60)


@dataclass
class Sent:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    transport: Transport
    server_tls: ServerTls | None
    timeout: dict

    @property
    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode()))


Route = Callable[[httpx.Request], httpx.Response]


class Transport(httpx.AsyncBaseTransport):
    """One stand-in for an httpx.AsyncHTTPTransport: what it was made with; its requests
    go to the network's routes."""

    def __init__(self, net: Net, verify: Any, trust_env: bool):
        self.net, self.verify, self.trust_env = net, verify, trust_env
        self.closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.net.handle(self, request)

    async def aclose(self) -> None:
        self.closed = True


def answer(status: int, body: Any, **headers: str) -> Route:
    return lambda request: httpx.Response(status, json=body, headers=headers)


@dataclass
class Net:
    """Every party (MCP server, authorization server) at its URL: routes by "METHOD URL"."""

    routes: dict[str, Route] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)
    transports: list[Transport] = field(default_factory=list)
    on_request: Callable[[httpx.Request], None] = lambda request: None

    def transport(self, verify: Any = True, trust_env: bool = True, **_: Any) -> Transport:
        t = Transport(self, verify, trust_env)
        self.transports.append(t)
        return t

    async def handle(self, transport: Transport, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        self.sent.append(
            Sent(
                request.method,
                str(request.url),
                {k.lower(): v for k, v in request.headers.items()},
                body,
                transport,
                request.extensions.get(SERVER_TLS),
                dict(request.extensions.get("timeout", {})),
            )
        )
        self.on_request(request)
        route = self.routes.get(f"{request.method} {request.url}")
        if route is None:
            return httpx.Response(404, json={"error": "not_found"})
        return route(request)

    def to(self, url: str, method: str = "POST") -> list[Sent]:
        return [s for s in self.sent if s.url == url and s.method == method]


def as_metadata(**extra: Any) -> dict:
    return {
        "issuer": AS,
        "token_endpoint": TOKEN_EP,
        "introspection_endpoint": AS + "/introspect",
        "revocation_endpoint": AS + "/revoke",
        "registration_endpoint": AS + "/register",
        "dpop_signing_alg_values_supported": ["ES256"],
        **extra,
    }


class Issuer:
    """The token endpoint: a token per request, DPoP when a proof came, living `ttl`."""

    def __init__(self) -> None:
        self.issued: list[str] = []
        self.ttl = 600
        self.jwt = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        n = len(self.issued) + 1
        access = f"access-token-{n}-secret"
        if self.jwt:
            access = f"{b64({'alg': 'none'})}.{b64({'jti': f'at-{n}', 'aud': MCP})}.sig{n}"
        self.issued.append(access)
        body = {
            "access_token": access,
            "token_type": "DPoP" if "dpop" in request.headers else "Bearer",
            "expires_in": self.ttl,
        }
        if "scope" in form:
            body["scope"] = form["scope"]
        return httpx.Response(200, json=body)


def server(**kw: Any) -> ServerSection:
    """The MCP server at MCP, its issuer configured (no discovery of the resource) unless
    issuer="" is given."""
    args: dict[str, Any] = {"name": "mcp", "url": MCP, "issuer": AS}
    args.update(kw)
    return ServerSection(**args)


class World:
    """A service over the recorded network, with its clocks in the test's hands."""

    def __init__(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        *servers: ServerSection,
        oauth: dict | None = None,
        inject: dict | None = None,
        jwks_uri: str | None = None,
        state: str = "state",
    ):
        self.net = Net()
        monkeypatch.setattr(httpx, "AsyncHTTPTransport", self.net.transport)
        self.mono = 5000.0  # the service's monotonic clock
        self.offset = 0.0  # added to the wall clock the service's cache reads
        fake_time = SimpleNamespace(time=time.time, monotonic=lambda: self.mono)
        monkeypatch.setattr(service_module, "time", fake_time)
        self.issuer = Issuer()
        self.net.routes[f"GET {AS_META}"] = answer(200, as_metadata())
        self.net.routes[f"POST {TOKEN_EP}"] = self.issuer
        self.audit_out = io.StringIO()
        self.keys: list[str] = []  # hold_keys()
        self.registry = CollectorRegistry()
        self.minter = Minter()
        self.cfg = Config(
            oauth=OAuthSection(**(oauth or {})),
            inject=InjectSection(**(inject or {})),
            servers=servers or (server(),),
        )
        self.svc = OAuthService(
            self.cfg,
            self.minter,
            str(tmp_path / state),
            audit=AuditLog("node", stream=self.audit_out),
            registry=self.registry,
            jwks_uri=jwks_uri,
            clock=lambda: time.time() + self.offset,
        )

    async def __aenter__(self) -> World:
        await self.svc.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.svc.stop()

    def audit(self, event: str | None = None) -> list[dict]:
        lines = [json.loads(line) for line in self.audit_out.getvalue().splitlines()]
        return [e for e in lines if event is None or e["event"] == event]

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def requests_total(self, outcome: str, server: str = "mcp") -> float | None:
        return self.metric("credless_token_requests_total", server=server, outcome=outcome)

    def lookups(self, result: str) -> float | None:
        return self.metric("credless_token_cache_lookups_total", result=result)

    def secrets(self) -> list[str]:
        """Every token, assertion and DPoP proof that went over the wire, and every DPoP
        private key held (as its JWK `d` and its DER in base64)."""
        proofs = [s.headers["dpop"] for s in self.net.sent if "dpop" in s.headers]
        return self.issuer.issued + [m.token for m in self.minter.minted] + proofs + self.keys

    def hold_keys(self) -> None:
        """Note each DPoP key the service holds now (stop() destroys them)."""
        for key in self.svc.held_dpop_keys().values():
            der = key.private_der()
            d = serialization.load_der_private_key(der, None).private_numbers().private_value
            self.keys += [b64url(d.to_bytes(32, "big")), base64.b64encode(der).decode()]

    def assert_no_secret_in(self, *texts: str) -> None:
        text = "\n".join([self.audit_out.getvalue(), *texts])
        for secret in self.secrets():
            assert secret not in text


def discovered(w: World, prm: dict | None = None, url: str = MCP) -> None:
    """The MCP server at url, its issuer not configured: a 401 naming Bearer, and its
    resource metadata (by default naming AS) at its well-known URL."""
    path = url.split("127.0.0.1:9", 1)[1]
    w.net.routes[f"POST {url}"] = answer(401, {}, **{"WWW-Authenticate": "Bearer"})
    w.net.routes[f"GET http://127.0.0.1:9/.well-known/oauth-protected-resource{path}"] = answer(
        200, prm or {"resource": url, "authorization_servers": [AS]}
    )


async def settle() -> None:
    """Wait for every other task on the loop (a background refresh) to finish."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    await asyncio.gather(*others, return_exceptions=True)


@pytest.fixture
def world(tmp_path, monkeypatch):
    return lambda *servers, **kw: World(tmp_path, monkeypatch, *servers, **kw)


# --- which token, for whom, from where ------------------------------------------------------


def token_error(w, error: type[Exception], server: str = "mcp") -> Exception:
    """What w's service raises when IDENT asks for a token for server (one is expected)."""

    async def go():
        async with w:
            with pytest.raises(error) as e:
                await w.svc.token(IDENT, server)
            return e.value

    return asyncio.run(go())


def probed(w, url: str) -> dict:
    """The summary of w's service probing url as IDENT."""

    async def go():
        async with w:
            return await w.svc.probe(url, IDENT)

    return asyncio.run(go())


def test_a_token_is_obtained_for_the_identity_at_its_servers_authorization_server(world):
    w = world()

    async def go():
        async with w:
            return await w.svc.token(IDENT, "mcp")

    tok = asyncio.run(go())
    assert [(s.method, s.url) for s in w.net.sent] == [("GET", AS_META), ("POST", TOKEN_EP)]
    (sent,) = w.net.to(TOKEN_EP)
    (minted,) = w.minter.minted
    assert (minted.spiffe_id, minted.audience, minted.ttl, minted.iss) == (SID, (AS,), 60, SID)
    assert sent.form == {
        "grant_type": "client_credentials",
        "resource": MCP,
        "client_assertion_type": JWT_BEARER,
        "client_assertion": minted.token,
    }
    assert "dpop" not in sent.headers  # a configured issuer: nothing says the server takes DPoP
    assert tok.access_token == w.issuer.issued[0] and tok.token_type == "Bearer"
    assert (tok.spiffe_id, tok.resource, tok.issuer, tok.client_id) == (SID, MCP, AS, SID)
    assert w.requests_total("ok") == 1 and w.lookups("miss") == 1 and w.lookups("hit") == 0
    (obtained,) = w.audit("token.obtained")
    assert obtained["spiffe_id"] == SID and obtained["server"] == "mcp"
    assert obtained["issuer"] == AS and obtained["token_sha256"] == tok.fingerprint
    assert w.metric("credless_token_cache_size") == 1
    w.assert_no_secret_in()


@pytest.mark.parametrize(
    "setting, form, audience, iss",
    [
        ({"client_id": "c-7"}, {"client_id": "c-7"}, AS, "c-7"),
        ({"auth_profile": "jwt-spiffe"}, {"client_assertion_type": JWT_SPIFFE}, AS, None),
        ({"assertion_audience": "token_endpoint"}, {}, TOKEN_EP, SID),
        ({"scope": "tools:read tools:call"}, {"scope": "tools:read tools:call"}, AS, SID),
    ],
    ids=["client_id", "jwt-spiffe", "token-endpoint-audience", "scope"],
)
def test_the_servers_settings_shape_the_assertion_and_the_request(
    world, setting, form, audience, iss
):
    w = world(server(**setting))

    async def go():
        async with w:
            return await w.svc.token(IDENT, "mcp")

    tok = asyncio.run(go())
    (sent,) = w.net.to(TOKEN_EP)
    (minted,) = w.minter.minted
    assert (minted.audience, minted.iss, minted.ttl) == ((audience,), iss, 60)
    assert {k: sent.form[k] for k in form} == form
    assert tok.client_id == setting.get("client_id", SID)


@pytest.mark.parametrize("dpop", ["always", "never", "auto"])
def test_dpop_proofs_follow_the_servers_setting_with_one_key_per_identity(world, dpop):
    w = world(server(dpop=dpop))

    async def go():
        async with w:
            first = await w.svc.token(IDENT, "mcp")
            other = await w.svc.token(IDENT2, "mcp")
            return first, other, w.svc.held_dpop_keys()

    first, other, keys = asyncio.run(go())
    bound = dpop == "always"
    assert [("dpop" in s.headers) for s in w.net.to(TOKEN_EP)] == [bound, bound]
    assert first.token_type == ("DPoP" if bound else "Bearer")
    if bound:
        assert sorted(keys) == sorted([SID, OTHER])
        assert (first.jkt, other.jkt) == (keys[SID].jkt, keys[OTHER].jkt)
        assert first.jkt != other.jkt
    else:
        assert keys == {} and first.jkt is None


def test_a_discovered_server_is_pinned_and_its_resource_metadata_decides_scope_and_dpop(world):
    w = world(server(issuer=""))
    prm = {
        "resource": MCP,
        "authorization_servers": [AS],
        "scopes_supported": ["a", "b"],
        "dpop_bound_access_tokens_required": True,
    }
    discovered(w, prm)

    async def go():
        async with w:
            return await w.svc.token(IDENT, "mcp")

    tok = asyncio.run(go())
    assert tok.token_type == "DPoP" and tok.scope == "a b"
    (sent,) = w.net.to(TOKEN_EP)
    assert sent.form["scope"] == "a b" and "dpop" in sent.headers
    (pinned,) = w.audit("oauth.pinned")
    assert pinned["spiffe_id"] == SID and pinned["issuer"] == AS and pinned["server"] == "mcp"


def test_an_authorization_server_other_than_the_pinned_one_gets_no_assertion(tmp_path, monkeypatch):
    prm = {"resource": MCP, "authorization_servers": [AS]}

    def make() -> World:
        w = World(tmp_path, monkeypatch, server(issuer=""))
        discovered(w, prm)
        return w

    first = make()

    async def token(w: World):
        async with w:
            try:
                return await w.svc.token(IDENT, "mcp")
            except OAuthError as e:
                return e

    asyncio.run(token(first))
    prm["authorization_servers"] = [AS2]  # the server moved, after a restart
    later = make()
    err = asyncio.run(token(later))
    assert isinstance(err, UntrustedAuthorizationServer)
    assert later.net.to(TOKEN_EP) == [] and later.minter.minted == []
    (refused,) = later.audit("oauth.refused")
    assert refused["spiffe_id"] == SID and refused["check"] == "untrusted_authorization_server"
    labels = {"server": "mcp", "check": "untrusted_authorization_server"}
    assert later.metric("credless_oauth_refused_total", **labels) == 1


def test_a_refusal_resolved_for_nobody_is_audited_under_no_identity(world):
    w = world(server(issuer="", authorization_servers=[AS2]))
    prm = {"resource": MCP, "authorization_servers": [AS]}
    discovered(w, prm)

    async def go():
        async with w:
            with pytest.raises(UntrustedAuthorizationServer):
                await w.svc.resolve(w.svc.server("mcp"))
            with pytest.raises(UntrustedAuthorizationServer):
                await w.svc.resolve(w.svc.server("mcp"), ident=IDENT2)

    asyncio.run(go())
    assert [e["spiffe_id"] for e in w.audit("oauth.refused")] == [None, OTHER]


# --- the cache ------------------------------------------------------------------------------


def test_a_second_token_for_the_same_identity_and_server_is_a_hit_without_a_request(world):
    w = world()

    async def go():
        async with w:
            a = await w.svc.token(IDENT, "mcp")
            b = await w.svc.token(IDENT, "mcp")
            c = await w.svc.token(IDENT2, "mcp")
            return a, b, c

    a, b, c = asyncio.run(go())
    assert a is b and c.spiffe_id == OTHER and c.fingerprint != a.fingerprint
    assert len(w.net.to(TOKEN_EP)) == 2
    assert w.lookups("hit") == 1 and w.lookups("miss") == 2 and w.requests_total("ok") == 2


def test_the_fast_path_serves_what_token_resolved_for_the_memo_time_only(world):
    w = world(server(), server(name="second", url="http://127.0.0.1:9/other"))

    async def go():
        async with w:
            assert w.svc.cached_token(IDENT, "mcp") is None  # nothing resolved yet
            tok = await w.svc.token(IDENT, "mcp")
            start = w.mono
            served = [w.svc.cached_token(IDENT, "mcp")]
            others = [w.svc.cached_token(IDENT2, "mcp"), w.svc.cached_token(IDENT, "second")]
            w.mono = start + KEY_MEMO_SECONDS
            served.append(w.svc.cached_token(IDENT, "mcp"))
            w.mono = start + KEY_MEMO_SECONDS + 0.01
            late = w.svc.cached_token(IDENT, "mcp")
            return tok, served, others, late

    tok, served, others, late = asyncio.run(go())
    assert served == [tok, tok] and others == [None, None] and late is None
    assert w.lookups("hit") == 2  # the fast path's hits are counted
    assert len(w.net.to(TOKEN_EP)) == 1


def test_a_token_asked_for_with_a_challenge_is_not_memoised_for_the_fast_path(world):
    w = world()

    async def go():
        async with w:
            await w.svc.token(IDENT, "mcp", challenge='Bearer scope="x"')
            return w.svc.cached_token(IDENT, "mcp")

    assert asyncio.run(go()) is None


def test_a_token_is_refreshed_in_the_background_after_refresh_ahead_of_its_lifetime(world):
    w = world(oauth={"refresh_ahead": 0.5})

    async def go():
        async with w:
            first = await w.svc.token(IDENT, "mcp")
            w.offset = 290  # before half its 600 s
            early = await w.svc.token(IDENT, "mcp")
            await settle()
            requests_before = len(w.net.to(TOKEN_EP))
            w.offset = 310  # past half: served, and a refresh starts
            served = await w.svc.token(IDENT, "mcp")
            await settle()
            after = await w.svc.token(IDENT, "mcp")
            return first, early, requests_before, served, after

    first, early, requests_before, served, after = asyncio.run(go())
    assert early is first and requests_before == 1
    assert served is first and after is not first
    assert len(w.net.to(TOKEN_EP)) == 2
    (refreshed,) = w.audit("token.refreshed")
    assert refreshed["token_sha256"] == after.fingerprint


def test_an_expired_token_is_never_served_by_the_services_clock(world):
    w = world()

    async def go():
        async with w:
            first = await w.svc.token(IDENT, "mcp")
            w.offset = 3600
            stale = w.svc.cached_token(IDENT, "mcp")
            fresh = await w.svc.token(IDENT, "mcp")
            return first, stale, fresh

    first, stale, fresh = asyncio.run(go())
    assert stale is None and fresh.fingerprint != first.fingerprint


def test_an_adopted_token_and_its_key_are_served_at_once(world):
    w = world(server(dpop="always"))

    async def go():
        async with w:
            tok = await w.svc.token(IDENT, "mcp")
            key = w.svc.held_dpop_keys()[SID]
            (cache_key,) = [k for k, _ in w.svc.cache.tokens()]
            return tok, key, cache_key

    tok, key, cache_key = asyncio.run(go())
    nxt = world(server(dpop="always"), state="next")

    async def adopt():
        async with nxt:
            mine = nxt.svc.dpop_key(OTHER)
            nxt.svc.adopt(cache_key, tok, key)
            nxt.svc.adopt((OTHER, "mcp", MCP, ""), dataclasses.replace(tok, spiffe_id=OTHER), None)
            return (
                nxt.svc.cached_token(IDENT, "mcp"),
                nxt.svc.cached_token(IDENT2, "mcp"),
                nxt.svc.held_dpop_keys(),
                mine,
            )

    served, other, keys, mine = asyncio.run(adopt())
    assert served is tok and other is not None and other.spiffe_id == OTHER
    assert keys == {SID: key, OTHER: mine}  # no key handed over: its own kept
    assert nxt.net.sent == []


# --- a refused token ------------------------------------------------------------------------


def test_a_refused_token_is_never_served_again_and_others_stay(world):
    w = world()

    async def go():
        async with w:
            mine = await w.svc.token(IDENT, "mcp")
            theirs = await w.svc.token(IDENT2, "mcp")
            w.svc.invalidate(IDENT, "mcp", dataclasses.replace(theirs, fingerprint="other"))
            kept = w.svc.cached_token(IDENT2, "mcp")
            w.svc.invalidate(IDENT, "mcp", dataclasses.replace(mine))  # a copy: by fingerprint
            gone = w.svc.cached_token(IDENT, "mcp")
            again = await w.svc.token(IDENT, "mcp")
            w.svc.invalidate(IDENT2, "mcp", theirs)
            return mine, theirs, kept, gone, again, w.svc.cached_token(IDENT2, "mcp")

    mine, theirs, kept, gone, again, theirs_after = asyncio.run(go())
    assert kept is theirs and gone is None and theirs_after is None
    assert again.fingerprint != mine.fingerprint
    assert len(w.net.to(TOKEN_EP)) == 3


# --- failures -------------------------------------------------------------------------------


def test_a_refused_token_request_is_counted_and_audited_without_the_assertion(world):
    w = world()
    refusal = {"error": "invalid_client", "error_description": "unknown client"}

    def refuse(request: httpx.Request) -> httpx.Response:
        w.mono += 0.12345  # the authorization server takes its time
        return answer(400, refusal)(request)

    w.net.routes[f"POST {TOKEN_EP}"] = refuse

    err = token_error(w, InvalidClient)
    (failed,) = w.audit("token.failed")
    assert failed["spiffe_id"] == SID and failed["server"] == "mcp" and failed["issuer"] == AS
    assert failed["error"] == "invalid_client" and failed["kind"] == "invalid_client"
    assert failed["reason"] == str(err) and failed["latency_ms"] == 123.5
    assert w.requests_total("invalid_client") == 1 and w.requests_total("ok") is None
    assert w.metric("credless_oauth_refused_total", server="mcp", check="invalid_client") is None
    w.assert_no_secret_in(str(err), repr(err))


def test_a_token_weaker_than_required_is_refused_and_counted_as_a_refusal(world):
    w = world(server(dpop="always"))
    w.net.routes[f"POST {TOKEN_EP}"] = answer(
        200, {"access_token": "bearer-token-secret", "token_type": "Bearer", "expires_in": 60}
    )

    err = token_error(w, TokenRefused)
    assert w.requests_total("token_refused") == 1
    assert w.metric("credless_oauth_refused_total", server="mcp", check="token_refused") == 1
    (failed,) = w.audit("token.failed")
    assert failed["kind"] == "token_refused" and failed["error"] is None
    assert "bearer-token-secret" not in str(err) + w.audit_out.getvalue()
    w.assert_no_secret_in(str(err))


def test_an_unknown_server_is_named_with_the_configured_ones(world):
    w = world(server(name="zeta"), server(name="alpha", url="http://127.0.0.1:9/a"))

    err = token_error(w, OAuthError, server="nope")
    assert str(err) == "no [[servers]] entry named 'nope'; configured: alpha, zeta"
    assert err.__cause__ is None and err.__suppress_context__
    assert w.net.sent == [] and w.minter.minted == []


def test_a_service_not_started_says_so_and_sends_nothing(world):
    w = world()
    svc = w.svc

    async def before_start():
        with pytest.raises(RuntimeError, match="^the OAuth service is not started$"):
            await svc.token(IDENT, "mcp")
        with pytest.raises(OAuthError, match="^the OAuth service is not started$"):
            await svc.server_metadata(AS)

    asyncio.run(before_start())
    with pytest.raises(RuntimeError, match="^the OAuth service is not started$"):
        svc.assertion_audiences()
    with pytest.raises(RuntimeError, match="^the OAuth service is not started$"):
        svc.http_client()
    coro = svc.resumed(SID)
    with pytest.raises(RuntimeError, match="^the OAuth service is not started$"):
        svc.run_sync(coro)
    assert coro.cr_frame is None  # closed, not left never awaited
    assert w.net.sent == []


# --- the HTTP client start() makes ----------------------------------------------------------


def test_every_request_says_whose_it_is_and_has_the_configured_timeout(world):
    w = world(server(issuer=""), oauth={"request_timeout_seconds": 7.5})
    discovered(w)

    async def go():
        async with w:
            await w.svc.token(IDENT, "mcp")
            return w.svc.http

    http = asyncio.run(go())
    assert len(w.net.sent) == 4
    for sent in w.net.sent:
        assert sent.headers["user-agent"] == f"credless/{__version__}"
        assert sent.timeout == {"connect": 7.5, "read": 7.5, "write": 7.5, "pool": 7.5}
    default = w.net.transports[0]
    assert default.verify is True and default.trust_env is False
    assert http.is_closed and default.closed  # stop() closed the client


def test_oauth_ca_file_verifies_the_authorization_servers_and_each_server_its_own(world, tmp_path):
    (tmp_path / "ca").mkdir()
    (tmp_path / "other").mkdir()
    ca, other = TestCA(tmp_path / "ca"), TestCA(tmp_path / "other", "another CA")
    w = world(
        server(issuer="", ca_file=str(ca.cert_path)),
        oauth={"ca_file": str(ca.cert_path)},
        inject={"upstream_ca_file": str(other.cert_path)},
    )
    discovered(w)

    async def go():
        async with w:
            await w.svc.token(IDENT, "mcp")

    asyncio.run(go())
    default = w.net.transports[0]
    assert isinstance(default.verify, ssl.SSLContext) and default.trust_env is False
    assert [c["subject"] for c in default.verify.get_ca_certs()] == [
        c["subject"] for c in ssl_ca(ca.cert_path)
    ]
    mcp_tls = ServerTls(str(ca.cert_path), "servers[mcp].ca_file")
    assert [(s.url, s.server_tls) for s in w.net.sent] == [
        (MCP, mcp_tls),
        (PRM, mcp_tls),
        (AS_META, None),
        (TOKEN_EP, None),
    ]
    assert {id(s.transport) for s in w.net.sent if s.server_tls is None} == {id(default)}


def ssl_ca(path: Path) -> list[dict]:
    ctx = ssl.create_default_context(cafile=str(path))
    return ctx.get_ca_certs()


@pytest.mark.parametrize(
    "url, expected",
    [
        (MCP, ServerTls("/etc/mcp-ca.pem", "servers[mcp].ca_file")),
        ("HTTP://127.0.0.1:9/mcp", ServerTls("/etc/mcp-ca.pem", "servers[mcp].ca_file")),
        ("http://127.0.0.1:9/b", ServerTls("/etc/upstream.pem", "inject.upstream_ca_file")),
        ("http://127.0.0.1:9/c", ServerTls("/etc/c.pem", "servers[c].ca_file")),
        ("http://127.0.0.1:9/probe", ServerTls("/etc/upstream.pem", "inject.upstream_ca_file")),
    ],
)
def test_each_mcp_server_is_verified_by_its_own_trust(world, url, expected):
    w = world(
        server(ca_file="/etc/mcp-ca.pem"),
        server(name="b", url="http://127.0.0.1:9/b"),
        server(name="c", url="http://127.0.0.1:9/c", ca_file="/etc/c.pem"),
        inject={"upstream_ca_file": "/etc/upstream.pem"},
    )
    assert w.svc.server_tls(url) == expected


def test_a_server_without_any_ca_file_is_verified_by_the_system_store(world):
    w = world(server(issuer=""))
    assert w.svc.server_tls("http://127.0.0.1:9/x") == ServerTls("", "the system store")
    assert w.svc.server_tls(MCP) == ServerTls("", "the system store")


def test_a_redirect_is_not_followed(world):
    w = world()
    w.net.routes[f"GET {AS_META}"] = lambda r: httpx.Response(
        302, headers={"Location": AS2 + "/.well-known/oauth-authorization-server"}
    )

    async def go():
        async with w:
            with pytest.raises(DiscoveryError):
                await w.svc.token(IDENT, "mcp")

    asyncio.run(go())
    assert not [s for s in w.net.sent if s.url.startswith(AS2)]
    assert w.net.to(TOKEN_EP) == []


def test_discovery_is_reused_for_oauth_discovery_ttl_seconds(world):
    """A short TTL (configured) against the default of 300 s: read again each time."""
    w = world(oauth={"discovery_ttl_seconds": 1e-9})

    async def go():
        async with w:
            await w.svc.token(IDENT, "mcp")
            await w.svc.token(IDENT2, "mcp")

    asyncio.run(go())
    assert len(w.net.to(AS_META, "GET")) == 2


# --- what else callers ask of it ------------------------------------------------------------


def test_the_assertion_audiences_are_every_configured_pinned_and_discovered_endpoint(world):
    w = world(
        server(authorization_servers=[AS2]),
        server(name="found", url="http://127.0.0.1:9/f", issuer=""),
    )
    discovered(w, url="http://127.0.0.1:9/f")

    async def go():
        async with w:
            before = w.svc.assertion_audiences()
            await w.svc.token(IDENT, "found")
            return before, w.svc.assertion_audiences()

    before, after = asyncio.run(go())
    assert before == frozenset({AS, AS2})
    assert after == frozenset(
        {AS, AS2, TOKEN_EP, AS + "/introspect", AS + "/revoke", AS + "/register"}
    )


def test_server_metadata_is_the_discovered_document(world):
    w = world()

    async def go():
        async with w:
            return await w.svc.server_metadata(AS)

    meta = asyncio.run(go())
    assert meta.issuer == AS and meta.registration_endpoint == AS + "/register"
    assert [s.url for s in w.net.sent] == [AS_META]


def test_client_authentication_is_a_fresh_assertion_for_the_issuer(world):
    w = world(server(client_id="c-7"))

    async def go():
        async with w:
            return await w.svc.client_authentication(IDENT, "mcp")

    resolved, fields = asyncio.run(go())
    (minted,) = w.minter.minted
    assert resolved.issuer == AS and resolved.resource == MCP
    assert fields == {"client_assertion_type": JWT_BEARER, "client_assertion": minted.token}
    assert (minted.spiffe_id, minted.audience, minted.ttl, minted.iss) == (SID, (AS,), 60, "c-7")


def test_introspection_and_revocation_go_to_the_servers_endpoints(world):
    w = world()
    w.net.routes[f"POST {AS}/introspect"] = answer(200, {"active": True, "scope": "s"})
    w.net.routes[f"POST {AS}/revoke"] = answer(200, {})

    async def go():
        async with w:
            tok = await w.svc.token(IDENT, "mcp")
            seen = await w.svc.introspect(IDENT, "mcp", tok)
            revoked = await w.svc.revoke(SID, IDENT, "mcp", "operator")
            return tok, seen, revoked, w.svc.cached_token(IDENT, "mcp")

    tok, seen, revoked, after = asyncio.run(go())
    assert seen == {"active": True, "scope": "s"}
    assert revoked == [tok.fingerprint] and after is None
    (introspected,) = w.net.to(AS + "/introspect")
    assert introspected.form["token"] == tok.access_token
    assert introspected.form["client_assertion"] == w.minter.minted[1].token


def test_run_sync_runs_a_call_on_the_services_loop_from_another_thread(world):
    w = world()

    async def go():
        async with w:
            await w.svc.token(IDENT, "mcp")
            await w.svc.forget(SID)  # the grace period starts
            back = await asyncio.to_thread(w.svc.run_sync, w.svc.resumed(SID))
            again = await asyncio.to_thread(w.svc.run_sync, w.svc.resumed(SID))
            return back, again

    assert asyncio.run(go()) == (True, False)


# --- an identity's end ----------------------------------------------------------------------


def test_an_identity_ending_without_grace_drops_its_tokens_key_and_registered_clients(world):
    w = world(server(registration="dynamic", dpop="always"), jwks_uri="https://b.example/k")
    w.net.routes[f"POST {AS}/register"] = answer(
        201,
        {
            "client_id": "dyn-1",
            "registration_client_uri": AS + "/register/dyn-1",
            "registration_access_token": "management-secret",
        },
    )
    w.net.routes[f"DELETE {AS}/register/dyn-1"] = answer(204, {})

    async def go():
        async with w:
            await w.svc.token(IDENT, "mcp")
            await w.svc.token(IDENT2, "mcp")
            key = w.svc.held_dpop_keys()[SID]
            out = await w.svc.forget(SID, grace=0)  # the configured 300 s not used
            return key, out, w.svc.held_dpop_keys(), w.svc.cached_token(IDENT2, "mcp")

    key, out, keys, theirs = asyncio.run(go())
    assert out == {"tokens_dropped": 1, "clients_deleted": ["dyn-1"]}
    assert list(keys) == [OTHER] and theirs is not None
    with pytest.raises(TypeError):  # destroyed: it can sign nothing
        key.proof("POST", TOKEN_EP)
    (ended,) = w.audit("identity.ended")
    assert ended["spiffe_id"] == SID and ended["tokens_dropped"] == 1
    assert ended["dpop_key_destroyed"] is True and ended["clients_deleted"] == ["dyn-1"]
    (deleted,) = w.net.to(AS + "/register/dyn-1", "DELETE")
    assert deleted.headers["authorization"] == "Bearer management-secret"
    assert "management-secret" not in w.audit_out.getvalue()


def test_an_identity_without_a_key_or_clients_ends_with_nothing_to_destroy(world):
    w = world()

    async def go():
        async with w:
            await w.svc.token(IDENT, "mcp")
            return await w.svc.drop(SID)

    assert asyncio.run(go()) == {"tokens_dropped": 1, "clients_deleted": []}
    (ended,) = w.audit("identity.ended")
    assert ended["dpop_key_destroyed"] is False


def test_stopping_destroys_every_dpop_key(world):
    w = world(server(dpop="always"))

    async def go():
        async with w:
            await w.svc.token(IDENT, "mcp")
            return w.svc.held_dpop_keys()[SID]

    key = asyncio.run(go())
    assert w.svc.held_dpop_keys() == {}
    with pytest.raises(TypeError):
        key.proof("POST", TOKEN_EP)


# --- dynamic registration through the service -----------------------------------------------


@pytest.mark.parametrize(
    "configured, given, registered",
    [
        ("https://conf.example/k", "https://arg.example/k", "https://conf.example/k"),
        ("", "https://arg.example/k", "https://arg.example/k"),
    ],
)
def test_a_dynamic_client_is_registered_once_with_the_jwks_uri_oauth_names(
    tmp_path, monkeypatch, configured, given, registered
):
    def make() -> World:
        w = World(
            tmp_path,
            monkeypatch,
            server(registration="dynamic"),
            oauth={"jwks_uri": configured},
            jwks_uri=given,
        )
        w.net.routes[f"POST {AS}/register"] = answer(201, {"client_id": "dyn-1"})
        return w

    first = make()

    async def go(w: World):
        async with w:
            return await w.svc.token(IDENT, "mcp")

    tok = asyncio.run(go(first))
    (reg_sent,) = first.net.to(AS + "/register")
    assert json.loads(reg_sent.body)["jwks_uri"] == registered
    assert tok.client_id == "dyn-1" and first.net.to(TOKEN_EP)[0].form["client_id"] == "dyn-1"
    labels = {"server": "mcp", "action": "register", "outcome": "ok"}
    assert first.metric("credless_oauth_registrations_total", **labels) == 1
    (event,) = first.audit("oauth.client_registered")
    assert event["client_id"] == "dyn-1" and event["spiffe_id"] == SID
    later = make()  # a restart: the client is kept in the state directory
    asyncio.run(go(later))
    assert later.net.to(AS + "/register") == []


# --- the operator's probe -------------------------------------------------------------------


def test_a_probe_of_a_configured_server_uses_its_entry_and_introspects_an_opaque_token(world):
    w = world(server(name="mcp", dpop="always"))
    w.net.routes[f"POST {AS}/introspect"] = answer(200, {"active": True})

    out = probed(w, "HTTP://127.0.0.1:9/mcp")
    tok_sha = out["token_sha256"]
    assert out["server"] == "mcp" and out["issuer"] == AS and out["token_endpoint"] == TOKEN_EP
    assert out["auth_profile"] == "jwt-bearer" and out["dpop"] is True
    assert out["token_type"] == "DPoP" and out["spiffe_id"] == SID and out["jti"] is None
    assert out["introspection"] == {"active": True}
    assert len(w.net.to(TOKEN_EP)) == 1 and tok_sha
    assert w.requests_total("ok") == 1
    w.assert_no_secret_in(json.dumps(out))


def test_a_probe_of_an_unconfigured_url_is_an_ad_hoc_server_pinned_nowhere(world):
    w = world(server(name="mcp"))
    url = "http://127.0.0.1:9/elsewhere"
    discovered(w, url=url)
    w.net.routes[f"POST {AS}/introspect"] = answer(400, {"error": "invalid_request"})

    async def go():
        async with w:
            return await w.svc.probe(url, IDENT), w.svc.server("probe")

    out, probe = asyncio.run(go())
    assert probe == AdHocServer(name="probe", url=url)
    assert out["server"] == "probe" and out["dpop"] is False and out["resource"] == url
    assert out["introspection"]["error"]["error"] == "invalid_request"
    assert w.audit("oauth.pinned") == []


def test_a_probe_of_a_jwt_token_does_not_introspect(world):
    w = world()
    w.issuer.jwt = True

    out = probed(w, MCP)
    assert out["jti"] == "at-1" and "introspection" not in out
    assert w.net.to(AS + "/introspect") == []


# --- what is logged -------------------------------------------------------------------------


def test_the_log_names_tokens_by_fingerprint_only(world, debug_lines):
    w = world(server(dpop="always"), oauth={"token_grace_seconds": 123.456})

    async def go():
        async with w:
            tok = await w.svc.token(IDENT, "mcp")
            w.hold_keys()
            await w.svc.token(IDENT, "mcp")
            w.svc.cached_token(IDENT, "mcp")
            await w.svc.forget(SID)
            w.svc.resume(SID)
            return tok

    tok = asyncio.run(go())
    lines = [line for line in debug_lines() if line.get("component") == "oauth"]
    cache = [
        (ln["event"], ln["spiffe_id"], ln["server"], ln["token_sha256"])
        for ln in lines
        if ln["event"] in ("token cache hit", "token cache miss")
    ]
    assert ("token cache miss", SID, "mcp", tok.fingerprint) in cache
    assert cache.count(("token cache hit", SID, "mcp", tok.fingerprint)) == 2
    (kept,) = [ln for ln in lines if ln["event"].startswith("identity ended")]
    assert kept["spiffe_id"] == SID and kept["tokens_kept"] == 1 and kept["kept_seconds"] == 123.5
    assert [ln["spiffe_id"] for ln in lines if ln["event"].startswith("identity back")] == [SID]
    assert len(w.secrets()) == 5  # the token, the assertion, the proof, the key twice
    w.assert_no_secret_in(json.dumps(debug_lines()))


# --- found by the first run -----------------------------------------------------------------


def test_an_identitys_next_request_within_its_grace_cancels_its_drop(world):
    w = world()

    async def go():
        async with w:
            await w.svc.token(IDENT, "mcp")
            await w.svc.forget(SID)  # its last process ended: a drop is pending
            w.svc.cached_token(IDENT, "mcp")  # a new process's request: back
            after_fast_path = w.svc.resume(SID)  # nothing pending any more
            await w.svc.forget(SID)
            await w.svc.token(IDENT, "mcp")
            after_token = w.svc.resume(SID)
            await w.svc.forget(SID)
            out = await w.svc.forget(SID, grace=0)  # ends again, for good: dropped now
            after_forget = w.svc.resume(SID)  # and the pending drop is gone with it
            return after_fast_path, after_token, after_forget, out

    *pending, out = asyncio.run(go())
    assert pending == [False, False, False]
    assert out == {"tokens_dropped": 1, "clients_deleted": []}
    assert len(w.audit("identity.ended")) == 1


def test_client_authentication_and_the_probe_audit_a_refusal_under_the_identity(world):
    w = world(server(issuer="", authorization_servers=[AS2]))
    discovered(w)

    async def go():
        async with w:
            with pytest.raises(UntrustedAuthorizationServer):
                await w.svc.client_authentication(IDENT, "mcp")
            with pytest.raises(UntrustedAuthorizationServer):
                await w.svc.probe(MCP, IDENT2)

    asyncio.run(go())
    assert [e["spiffe_id"] for e in w.audit("oauth.refused")] == [SID, OTHER]
    assert w.minter.minted == []


def test_client_authentication_of_a_dynamic_client_asserts_as_its_registered_client(world):
    w = world(server(registration="dynamic"), jwks_uri="https://b.example/k")
    w.net.routes[f"POST {AS}/register"] = answer(201, {"client_id": "dyn-1"})

    async def go():
        async with w:
            return await w.svc.client_authentication(IDENT, "mcp")

    _resolved, fields = asyncio.run(go())
    assertion = w.minter.minted[-1]
    assert fields["client_assertion"] == assertion.token and assertion.iss == "dyn-1"


def test_the_probe_summary_says_exactly_what_it_names(world):
    w = world()
    w.issuer.jwt = True

    out = probed(w, MCP)
    assert set(out) == {
        "server",
        "issuer",
        "token_endpoint",
        "auth_profile",
        "dpop",
        "token_type",
        "expires_in",
        "scope",
        "audience",
        "resource",
        "client_id",
        "spiffe_id",
        "cnf_jkt",
        "jti",
        "token_sha256",
    }


def test_a_challenge_given_with_the_request_is_read_instead_of_asking_the_server(world):
    w = world(server(issuer=""))
    discovered(w)

    async def go():
        async with w:
            return await w.svc.token(IDENT, "mcp", challenge='Bearer scope="from-challenge"')

    tok = asyncio.run(go())
    assert w.net.to(MCP) == []  # its own 401 was read: the server is not probed again
    (sent,) = w.net.to(TOKEN_EP)
    assert sent.form["scope"] == "from-challenge" and tok.scope == "from-challenge"


def test_a_request_with_its_own_challenge_leaves_a_refusals_challenge_for_the_next(world):
    w = world(server(issuer=""))
    discovered(w)

    async def go():
        async with w:
            first = await w.svc.token(IDENT, "mcp")
            w.svc.invalidate(IDENT, "mcp", first, 'DPoP algs="ES256"')  # the scheme refused
            second = await w.svc.token(IDENT, "mcp", challenge='Bearer error="invalid_token"')
            w.svc.invalidate(IDENT, "mcp", second)
            third = await w.svc.token(IDENT, "mcp")  # reads the refusal's challenge now
            return first, second, third

    types = [t.token_type for t in asyncio.run(go())]
    assert types == ["Bearer", "Bearer", "DPoP"]


def test_a_revocation_is_audited_with_its_reason(world):
    w = world()
    w.net.routes[f"POST {AS}/revoke"] = answer(200, {})

    async def go():
        async with w:
            await w.svc.token(IDENT, "mcp")
            return await w.svc.revoke(SID, IDENT, "mcp", "operator asked")

    asyncio.run(go())
    (revoked,) = w.audit("token.revoked")
    assert revoked["reason"] == "operator asked" and revoked["spiffe_id"] == SID


def test_run_sync_gives_up_after_its_timeout(world):
    w = world()

    async def go():
        async with w:
            release = asyncio.Event()

            async def stuck() -> str:
                await release.wait()
                return "finished"

            call = asyncio.ensure_future(asyncio.to_thread(w.svc.run_sync, stuck(), 0.01))
            await asyncio.wait({call}, timeout=5)  # a bound, not a wait for anything
            release.set()
            with pytest.raises(TimeoutError):
                await call

    asyncio.run(go())


def test_a_metadata_certificate_that_does_not_verify_is_refused_naming_oauth_ca_file(
    world, tmp_path
):
    (tmp_path / "ca").mkdir()
    ca = TestCA(tmp_path / "ca")
    w = world(oauth={"ca_file": str(ca.cert_path)})

    def refuse(request: httpx.Request) -> httpx.Response:
        cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
        cause.verify_message = "unable to get local issuer certificate"
        raise httpx.ConnectError("handshake failed", request=request) from cause

    w.net.routes[f"GET {AS_META}"] = refuse

    err = token_error(w, AuthorizationServerCertificateRefused)
    assert err.url == AS_META and f"oauth.ca_file ({ca.cert_path})" in str(err)
    assert w.net.to(TOKEN_EP) == [] and w.minter.minted == []


# --- a finding: the probe of one of two servers sharing a URL -------------------------------


def test_probing_one_of_two_servers_sharing_a_url_probes_that_one(world):
    """Two entries for one MCP server (config allows it: names must differ, URLs need not),
    one asked for by name: the admin call (agent/daemon.py) runs the service's
    probe on the service's loop, here a thread of its own."""
    import threading

    from agent.daemon import Daemon

    w = world(server(name="read", scope="read"), server(name="write", scope="write"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(w.svc.start(), loop).result(10)
        daemon = SimpleNamespace(
            cfg=w.cfg,
            agent=SimpleNamespace(
                identity=SimpleNamespace(identity_for_id=lambda sid: IDENT), oauth=w.svc
            ),
        )
        out = Daemon._oauth_probe(daemon, {"server": "write", "spiffe_id": SID})
    finally:
        asyncio.run_coroutine_threadsafe(w.svc.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    (sent,) = w.net.to(TOKEN_EP)
    assert out["server"] == "write" and sent.form["scope"] == "write"
