"""Assertion mode through the proxy's typed ports (agent/inject/ports.py), in-process: the
server's settings (Tokens.servers: auth_profile, assertion_audience, workload_assertion),
the authorization server's metadata (Tokens.server_metadata), the jwks_uri
(Tokens.jwks_uri) and the keys (Identities.bundle) reach AssertionRequests without reading
any other module's attributes; and its refusals (413, 415, 400, 502) are counted under the
proxy's outcomes, audited and answered naming the audit event."""

from __future__ import annotations

import asyncio
import io
import json
from urllib.parse import parse_qsl

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from agent.config import InjectSection, ServerSection
from agent.identity.bundle import TrustBundle
from agent.identity.entries import Entry
from agent.identity.jwtsvid import JwtSvid
from agent.identity.manager import Identity
from agent.identity.spiffeid import SpiffeId, TrustDomain
from agent.inject.flows import ClientSide, UpstreamSide
from agent.inject.http1 import HEAD
from agent.inject.ports import ProofKey
from agent.inject.proxy import Proxy
from agent.inject.record import AuditBase
from agent.inject.served import Served
from agent.inject.upstreams import Upstream
from agent.oauth.discovery import ServerMetadata
from agent.oauth.errors import DiscoveryError
from agent.oauth.tokens import Token
from agent.observe.logging import AuditLog
from agent.observe.tally import CounterCell
from tests.unit.test_fast_path import INFO, FakeAttestor, FakeCache, NoRedirect
from tests.unit.transport import Transport

SID = "spiffe://example.org/w"
ISSUER = "http://127.0.0.1:9000"
TOKEN_PATH = b"/token"
AS_UP = Upstream(
    "as",
    "http",
    "127.0.0.1",
    9000,
    "http://127.0.0.1:9000",
    "assertion",
    TOKEN_PATH,
    (b"127.0.0.1:9000",),
)
MINTED = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ3In0.c2ln"
ANSWER = b'{"access_token":"at","token_type":"Bearer"}'
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)


class Minting:
    """Identities: JWT-SVIDs (each asked audience recorded) and a bundle of one key."""

    generation = 0

    def __init__(self) -> None:
        self.audiences: list[list[str]] = []
        self.key = ec.generate_private_key(ec.SECP256R1()).public_key()

    def resolve(self, attestation, quiet: bool = False) -> Identity | None:
        return None

    def note_use(self, ident: Identity, attestation) -> None:
        pass

    def jwt_svid(
        self, ident: Identity, audience: list[str], ttl: int | None = None, iss: str | None = None
    ) -> JwtSvid:
        self.audiences.append(list(audience))
        return JwtSvid(
            MINTED, ident.spiffe_id, tuple(audience), f"jti-{len(self.audiences)}", 0, 60
        )

    def bundle(self) -> TrustBundle:
        return TrustBundle(TrustDomain("example.org"), jwt_authorities={"k1": self.key})


class AsTokens:
    """Tokens: one assertion-mode server and its authorization server's metadata."""

    def __init__(self, server: ServerSection, jwks_uri: str | None = None, fail: bool = False):
        self.cache = FakeCache()
        self.m_hit = CounterCell()
        self.servers = {server.name: server}
        self.jwks_uri = jwks_uri
        self.fail = fail
        self.asked: list[str] = []

    async def server_metadata(self, issuer: str) -> ServerMetadata:
        self.asked.append(issuer)
        if self.fail:
            raise DiscoveryError(f"no authorization server metadata for {issuer}")
        return ServerMetadata(issuer, ISSUER + "/token", registration_endpoint=ISSUER + "/reg")

    def cached_token(self, ident: Identity, server_name: str) -> Token | None:
        return None

    async def token(self, ident: Identity, server_name: str) -> Token:
        raise AssertionError("assertion mode never asks for a token")

    def dpop_key(self, spiffe_id: str) -> ProofKey:
        raise AssertionError("no DPoP here")

    def invalidate(
        self, ident: Identity, server_name: str, token: Token, challenge: str | None = None
    ) -> None:
        raise AssertionError("no token here")


class AsWorld:
    def __init__(self, oauth: AsTokens, max_body: int = 4096):
        self.audit_out = io.StringIO()
        self.registry = CollectorRegistry()
        self.identity = Minting()
        self.oauth = oauth
        self.proxy = Proxy(
            InjectSection(upstream_pool_size=4, upstream_idle_seconds=4.0),
            {},
            NoRedirect(),
            FakeAttestor((1, 5)),
            self.identity,
            oauth,
            audit=AuditLog("node", stream=self.audit_out),
            registry=self.registry,
            max_body=max_body,
        )
        self.client = ClientSide(lambda c: None)
        self.client.connection_made(Transport())
        self.upstream = UpstreamSide()
        self.upstream.connection_made(Transport())
        self.proxy.pool.put((SID, AS_UP.host, AS_UP.port, AS_UP.scheme), self.upstream)
        ident = Identity(SpiffeId.parse(SID), Entry("w", SID, frozenset()))
        fragment = self.proxy.rec.fragment(server=AS_UP.name, spiffe_id=SID)
        self.served = Served(self.client, INFO, AS_UP, ident, 0, {"spiffe_id": SID}, fragment)

    async def send(self, target: bytes, body: bytes, *fields: bytes) -> bool:
        """The request through AssertionRequests.handle(); the AS answers 200."""
        head = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n%sContent-Length: %d\r\n\r\n" % (
            target,
            b"".join(f + b"\r\n" for f in fields),
            len(body),
        )
        self.client.data_received(head + body)
        ev = await self.client.next()
        assert ev is not None and ev[0] == HEAD
        audit_base = AuditBase({"method": "POST", "path": target.decode()}, self.served.fragment)
        task = asyncio.ensure_future(
            self.proxy.assertions.handle(ev[1], self.served, audit_base, 0)
        )
        while not task.done() and not self.upstream.transport.out:
            await asyncio.sleep(0)  # a turn of the loop: the request goes upstream or is answered
        if not task.done():
            self.upstream.data_received(RESPONSE)
        return await task

    def sent_form(self) -> dict[str, str]:
        body = self.upstream.transport.out.split(b"\r\n\r\n", 1)[1]
        return dict(parse_qsl(body.decode()))

    def sent_json(self) -> dict:
        return json.loads(self.upstream.transport.out.split(b"\r\n\r\n", 1)[1])

    def answer(self) -> tuple[int, dict]:
        out = self.client.transport.out
        status = int(out.split(b" ", 2)[1])
        return status, json.loads(out.split(b"\r\n\r\n", 1)[1])

    def audit(self) -> list[dict]:
        return [json.loads(line) for line in self.audit_out.getvalue().splitlines()]

    def count(self, outcome: str) -> float:
        return (
            self.registry.get_sample_value(
                "credless_injected_requests_total",
                {"server": "as", "mode": "assertion", "outcome": outcome},
            )
            or 0.0
        )


def server(**settings) -> ServerSection:
    return ServerSection(
        name="as", url=ISSUER + "/token", mode="assertion", issuer=ISSUER, **settings
    )


FORM = (b"Content-Type: application/x-www-form-urlencoded",)


def test_the_servers_settings_reach_the_token_request_through_the_port():
    async def body():
        w = AsWorld(
            AsTokens(
                server(
                    auth_profile="jwt-spiffe",
                    assertion_audience="token_endpoint",
                    workload_assertion="replace",
                )
            )
        )
        workload_jwt = MINTED.replace("c2ln", "b3du")  # a JWT of its own: replaced, not refused
        keep = await w.send(
            TOKEN_PATH,
            b"grant_type=client_credentials&client_assertion=" + workload_jwt.encode(),
            *FORM,
        )
        assert keep
        sent = w.sent_form()
        assert sent["client_assertion"] == MINTED and sent["client_id"] == SID
        assert sent["client_assertion_type"].endswith(":jwt-spiffe")
        assert w.identity.audiences == [[ISSUER + "/token"]]  # assertion_audience
        [injected] = [e for e in w.audit() if e["event"] == "assertion.injected"]
        assert injected["action"] == "replaced_workload_jwt"

    asyncio.run(body())


def test_the_defaults_refuse_a_workloads_own_jwt_with_an_event_id():
    async def body():
        w = AsWorld(AsTokens(server()))
        await w.send(
            TOKEN_PATH, b"grant_type=client_credentials&client_assertion=" + MINTED.encode(), *FORM
        )
        status, answer = w.answer()
        assert status == 400 and answer["error"] == "invalid_request"
        assert w.upstream.transport.out == b""
        [refused] = [e for e in w.audit() if e["event"] == "assertion.refused"]
        assert refused["event_id"] == answer["event_id"]
        assert w.count("assertion_refused") == 1

    asyncio.run(body())


def test_a_registration_reads_the_metadata_jwks_uri_and_bundle_through_the_ports():
    async def body():
        inline = AsWorld(AsTokens(server()))
        await inline.send(b"/reg", b'{"client_name": "w"}', b"Content-Type: application/json")
        assert inline.oauth.asked == [ISSUER]  # Tokens.server_metadata
        meta = inline.sent_json()
        assert meta["client_name"] == "w" and meta["spiffe_id"] == SID
        assert [k["kid"] for k in meta["jwks"]["keys"]] == ["k1"]  # Identities.bundle
        assert inline.identity.audiences == [[ISSUER + "/reg"]]

        uri = "http://127.0.0.1:8444/jwks.json"
        by_uri = AsWorld(AsTokens(server(), jwks_uri=uri))
        await by_uri.send(b"/reg", b'{"client_name": "w"}', b"Content-Type: application/json")
        meta = by_uri.sent_json()
        assert meta["jwks_uri"] == uri and "jwks" not in meta  # Tokens.jwks_uri

    asyncio.run(body())


def test_metadata_that_cannot_be_had_is_a_502_naming_the_event_and_nothing_goes():
    async def body():
        w = AsWorld(AsTokens(server(), fail=True))
        await w.send(b"/reg", b'{"client_name": "w"}', b"Content-Type: application/json")
        status, answer = w.answer()
        assert status == 502 and "no authorization server metadata" in answer["error_description"]
        assert w.upstream.transport.out == b""
        [failed] = [e for e in w.audit() if e["event"] == "request.failed"]
        assert failed["event_id"] == answer["event_id"] and failed["kind"] == "discovery"
        assert w.count("token_error") == 1

    asyncio.run(body())


@pytest.mark.parametrize(
    ("fields", "size", "status", "outcome"),
    [
        (FORM, 5000, 413, "body_too_large"),
        ((*FORM, b"Content-Encoding: gzip"), 10, 415, "encoding_refused"),
    ],
)
def test_a_body_credless_cannot_read_is_counted_audited_and_answered_with_its_event(
    fields, size, status, outcome
):
    async def body():
        w = AsWorld(AsTokens(server()), max_body=4096)
        keep = await w.send(TOKEN_PATH, b"a" * size, *fields)
        got, answer = w.answer()
        assert got == status and answer["error"] == "invalid_request"
        assert keep is (status != 413)  # over the limit: the connection is closed
        assert w.upstream.transport.out == b"" and w.identity.audiences == []
        [refused] = [e for e in w.audit() if e["event"] == "assertion.refused"]
        assert refused["status"] == status and refused["outcome"] == outcome
        assert refused["event_id"] == answer["event_id"]
        assert refused["spiffe_id"] == SID and refused["server"] == "as"
        assert w.count(outcome) == 1

    asyncio.run(body())
