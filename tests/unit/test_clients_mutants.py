"""Which client an identity is at an authorization server (agent/oauth/clients.py), found by
mutation testing: the configured client_id or the SPIFFE ID when preregistered; one dynamic
registration per (identity, issuer), kept and reused, concurrent first requests included; what
the registration sends (a software statement for that issuer, the agent's keys or its
jwks_uri, DPoP binding); what a failed registration leaves (nothing stored, counted as an
error); and the deletion of an identity's registered clients when it ends (each deleted one
forgotten and counted, one that failed or offers no management kept for the next time).

Sans-IO: the authorization server is an httpx MockTransport recording each request; the
store is a real ClientStore in a temporary directory, the counter a real one in a registry
of the test's own, the audit a real AuditLog on a string."""

from __future__ import annotations

import asyncio
import io
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from agent.identity.bundle_endpoint import oauth_jwks
from agent.identity.entries import Entry
from agent.identity.jwtsvid import JwtSvid
from agent.identity.manager import Identity
from agent.identity.spiffeid import SpiffeId
from agent.oauth import registration as reg
from agent.oauth.clients import Clients
from agent.oauth.discovery import ServerMetadata
from agent.oauth.errors import OAuthError, RegistrationError
from agent.oauth.resolution import AdHocServer, Resolved
from agent.oauth.trust import ServerTls
from agent.observe.logging import AuditLog
from tests.helpers import run_async as run
from tests.unit import test_tokens_mutants
from tests.unit.test_as_certificate import Minting
from tests.unit.test_token_ops_mutants import Sent

SID = "spiffe://example.org/w"
OTHER = "spiffe://example.org/v"
IDENT = Identity(SpiffeId.parse(SID), Entry("w", SID, frozenset()))
IDENT2 = Identity(SpiffeId.parse(OTHER), Entry("v", OTHER, frozenset()))
AS = "http://127.0.0.1:8"
AS2 = "http://127.0.0.2:8"
REGISTER = AS + "/register"
JWKS_URI = "https://agent.example/keys"
AS_TLS = ServerTls("/etc/credless/as-ca.pem", "oauth.ca_file")

debug_lines = test_tokens_mutants.debug_lines  # the diagnostic stream at debug, parsed


Route = Callable[[httpx.Request], httpx.Response]


@dataclass
class Net:
    """The authorization servers: routes by "METHOD URL", every request recorded. hold, if
    set, is awaited before a registration is answered."""

    routes: dict[str, Route] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)
    hold: asyncio.Event | None = None
    entered: asyncio.Event | None = None

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(
            Sent(
                request.method,
                str(request.url),
                {k.lower(): v for k, v in request.headers.items()},
                await request.aread(),
            )
        )
        if self.entered is not None:
            self.entered.set()
        if self.hold is not None:
            await self.hold.wait()
        route = self.routes.get(f"{request.method} {request.url}")
        if route is None:
            return httpx.Response(404, json={"error": "not_found"})
        return route(request)


def registered(client_id: str, uri: str | None = None, rat: str | None = None) -> Route:
    body: dict[str, Any] = {"client_id": client_id}
    if uri:
        body |= {"registration_client_uri": uri, "registration_access_token": rat}
    return lambda request: httpx.Response(201, json=body)


def status(code: int, body: Any = None) -> Route:
    return lambda request: httpx.Response(code, json=body or {})


def certificate_failure(request: httpx.Request) -> httpx.Response:
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_message = "unable to get local issuer certificate"
    e = httpx.ConnectError("handshake failed", request=request)
    e.__cause__ = cause
    raise e


class Minter(Minting):
    """The identity manager: each JWT-SVID asked for is recorded (a software statement of
    its own each time)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str, tuple[str, ...]]] = []

    def jwt_svid(
        self, ident: Identity, audience: list[str], ttl: int | None = None, iss: str | None = None
    ) -> JwtSvid:
        self.asked.append((str(ident.spiffe_id), tuple(audience)))
        token = f"statement-{len(self.asked)}"
        return JwtSvid(token, ident.spiffe_id, tuple(audience), "j", 0, 60)


class World:
    def __init__(self, tmp_path, jwks_uri: str | None = None):
        self.net = Net()
        self.http = httpx.AsyncClient(transport=httpx.MockTransport(self.net.handle))
        self.store = reg.ClientStore(tmp_path)
        self.minter = Minter()
        self.registry = CollectorRegistry()
        counter = Counter(
            "credless_oauth_registrations",
            "Dynamic client registrations and deletions",
            ["server", "action", "outcome"],
            registry=self.registry,
        )
        self.out = io.StringIO()
        self.clients = Clients(
            self.store,
            self.minter,
            lambda: self.http,
            AS_TLS,
            jwks_uri,
            counter,
            AuditLog("node-1", stream=self.out),
        )

    def count(self, server: str, action: str, outcome: str) -> float | None:
        return self.registry.get_sample_value(
            "credless_oauth_registrations_total",
            {"server": server, "action": action, "outcome": outcome},
        )

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]


def server(registration: str = "dynamic", client_id: str = "", name: str = "mcp") -> AdHocServer:
    return AdHocServer(
        name=name, url="http://127.0.0.1:9/mcp", registration=registration, client_id=client_id
    )


def resolved(issuer: str = AS, dpop: bool = False, endpoint: str | None = "/register") -> Resolved:
    meta = ServerMetadata(
        issuer=issuer,
        token_endpoint=issuer + "/token",
        registration_endpoint=issuer + endpoint if endpoint else None,
    )
    return Resolved("http://127.0.0.1:9/mcp", issuer, meta, "", dpop)


# -- which client_id


@pytest.mark.parametrize(
    "client_id,expected", [("configured-client", "configured-client"), ("", SID)]
)
@run
async def test_a_preregistered_identity_is_its_configured_client_or_its_spiffe_id(
    tmp_path, client_id, expected
):
    w = World(tmp_path)
    w.store.put(reg.RegisteredClient(SID, AS, "a-registered-one"))
    got = await w.clients.client_id(IDENT, server("preregistered", client_id), resolved())
    assert got == expected
    assert w.net.sent == [] and w.minter.asked == []


@run
async def test_a_registered_client_is_reused_without_asking_the_server(tmp_path):
    w = World(tmp_path)
    w.store.put(reg.RegisteredClient(SID, AS, "kept-client"))
    assert await w.clients.client_id(IDENT, server(), resolved()) == "kept-client"
    assert w.net.sent == [] and w.minter.asked == []


@pytest.mark.parametrize("dpop", [False, True])
@run
async def test_a_first_request_registers_the_identity_with_its_keys_once(tmp_path, dpop):
    w = World(tmp_path)
    w.net.routes[f"POST {REGISTER}"] = registered("new-client", AS + "/clients/1", "rat-1")

    got = await w.clients.client_id(IDENT, server(), resolved(dpop=dpop))
    again = await w.clients.client_id(IDENT, server(), resolved(dpop=dpop))

    assert got == again == "new-client"
    (sent,) = w.net.sent
    assert (sent.method, sent.url) == ("POST", REGISTER)
    meta = sent.json
    # the software statement is a JWT-SVID of this identity for this issuer
    assert w.minter.asked == [(SID, (AS,))]
    assert meta["software_statement"] == "statement-1"
    assert meta["spiffe_id"] == meta["client_name"] == SID
    assert meta["jwks"] == json.loads(oauth_jwks(w.minter.bundle()))
    assert "jwks_uri" not in meta
    assert meta.get("dpop_bound_access_tokens", False) is dpop
    assert w.store.get(SID, AS) == reg.RegisteredClient(
        SID, AS, "new-client", AS + "/clients/1", "rat-1"
    )
    assert w.count("mcp", "register", "ok") == 1
    assert w.count("mcp", "register", "error") is None
    (event,) = w.events()
    assert event["event"] == "oauth.client_registered"
    assert (event["spiffe_id"], event["server"]) == (SID, "mcp")
    assert (event["issuer"], event["client_id"]) == (AS, "new-client")


@run
async def test_a_configured_jwks_uri_is_registered_instead_of_the_keys(tmp_path):
    w = World(tmp_path, jwks_uri=JWKS_URI)
    w.net.routes[f"POST {REGISTER}"] = registered("new-client")
    assert await w.clients.client_id(IDENT, server(), resolved()) == "new-client"
    (sent,) = w.net.sent
    assert sent.json["jwks_uri"] == JWKS_URI and "jwks" not in sent.json


@run
async def test_with_a_jwks_uri_registration_does_not_need_the_agents_keys(tmp_path):
    w = World(tmp_path, jwks_uri=JWKS_URI)

    def no_bundle() -> Any:
        raise RuntimeError("the identity manager has no trust bundle")

    w.minter.bundle = no_bundle  # the keys are the jwks_uri's to serve, not read here
    w.net.routes[f"POST {REGISTER}"] = registered("new-client")
    assert await w.clients.client_id(IDENT, server(), resolved()) == "new-client"
    assert w.net.sent[0].json["jwks_uri"] == JWKS_URI


@run
async def test_each_identity_and_issuer_registers_a_client_of_its_own(tmp_path):
    w = World(tmp_path)
    w.net.routes[f"POST {REGISTER}"] = registered("at-as-1")
    w.net.routes[f"POST {AS2}/register"] = registered("at-as-2")
    assert await w.clients.client_id(IDENT, server(), resolved()) == "at-as-1"
    assert await w.clients.client_id(IDENT, server(), resolved(AS2)) == "at-as-2"
    w.net.routes[f"POST {REGISTER}"] = registered("other-at-as-1")
    assert await w.clients.client_id(IDENT2, server(), resolved()) == "other-at-as-1"
    assert [s.url for s in w.net.sent] == [REGISTER, AS2 + "/register", REGISTER]
    assert [a for a in w.minter.asked] == [(SID, (AS,)), (SID, (AS2,)), (OTHER, (AS,))]
    assert w.count("mcp", "register", "ok") == 3


@run
async def test_concurrent_first_requests_register_one_client(tmp_path):
    w = World(tmp_path)
    w.net.routes[f"POST {REGISTER}"] = registered("only-client")
    w.net.hold, w.net.entered = asyncio.Event(), asyncio.Event()

    async def release() -> None:
        await w.net.entered.wait()  # the first registration is under way: let it finish
        w.net.hold.set()

    first, second, _ = await asyncio.gather(
        w.clients.client_id(IDENT, server(), resolved()),
        w.clients.client_id(IDENT, server(), resolved()),
        release(),
    )
    assert first == second == "only-client"
    assert len(w.net.sent) == 1 and len(w.minter.asked) == 1
    assert w.count("mcp", "register", "ok") == 1


def per_identity(request: httpx.Request) -> httpx.Response:
    """A client_id of the identity's own at each server."""
    name = json.loads(request.content)["spiffe_id"].rsplit("/", 1)[-1]
    return httpx.Response(201, json={"client_id": f"{name}@{request.url.host}"})


@run
async def test_a_registration_under_way_holds_up_no_other_identity_or_issuer(tmp_path):
    w = World(tmp_path)
    w.net.routes[f"POST {REGISTER}"] = per_identity
    w.net.routes[f"POST {AS2}/register"] = per_identity
    gate = asyncio.Event()
    w.net.hold, w.net.entered = gate, asyncio.Event()
    slow = asyncio.ensure_future(w.clients.client_id(IDENT, server(), resolved()))
    await w.net.entered.wait()  # its registration is under way, and stays so
    w.net.hold = None  # the others are answered at once
    # (a bound on a failure only: each answers as soon as its own registration does)
    other_identity = w.clients.client_id(IDENT2, server(), resolved())
    assert await asyncio.wait_for(other_identity, 10) == "v@127.0.0.1"
    other_issuer = w.clients.client_id(IDENT, server(), resolved(AS2))
    assert await asyncio.wait_for(other_issuer, 10) == "w@127.0.0.2"
    assert not slow.done()
    gate.set()
    assert await slow == "w@127.0.0.1"
    assert w.store.get(SID, AS).client_id == "w@127.0.0.1"


@run
async def test_a_server_without_a_registration_endpoint_is_named_with_the_fix(tmp_path):
    w = World(tmp_path)
    with pytest.raises(RegistrationError) as caught:
        await w.clients.client_id(IDENT, server(), resolved(endpoint=None))
    message = str(caught.value)
    assert AS in message and SID in message and "registration_endpoint" in message
    assert 'registration = "preregistered"' in message
    assert w.net.sent == [] and w.minter.asked == []
    assert w.store.for_identity(SID) == []


@run
async def test_a_refused_registration_stores_nothing_and_is_counted_as_an_error(tmp_path):
    w = World(tmp_path)
    w.net.routes[f"POST {REGISTER}"] = status(400, {"error": "invalid_client_metadata"})
    with pytest.raises(RegistrationError) as caught:
        await w.clients.client_id(IDENT, server(name="srv"), resolved())
    assert caught.value.error == "invalid_client_metadata"
    assert w.store.get(SID, AS) is None
    assert w.count("srv", "register", "error") == 1
    assert w.count("srv", "register", "ok") is None
    assert w.events() == []
    # the next request tries again
    w.net.routes[f"POST {REGISTER}"] = registered("second-try")
    assert await w.clients.client_id(IDENT, server(name="srv"), resolved()) == "second-try"


@run
async def test_registration_goes_through_the_agents_as_trust(tmp_path):
    w = World(tmp_path)
    w.net.routes[f"POST {REGISTER}"] = certificate_failure
    with pytest.raises(OAuthError) as caught:
        await w.clients.client_id(IDENT, server(), resolved())
    assert caught.value.kind == "authorization_server_certificate"
    assert AS_TLS.describe() in str(caught.value)
    assert w.count("mcp", "register", "error") == 1


# -- deletion when the identity ends


def managed(sid: str, issuer: str, client_id: str) -> reg.RegisteredClient:
    return reg.RegisteredClient(sid, issuer, client_id, f"{issuer}/clients/{client_id}", "rat")


@run
async def test_an_ended_identitys_clients_are_deleted_forgotten_and_counted(tmp_path):
    w = World(tmp_path)
    mine = [managed(SID, AS, "c1"), managed(SID, AS2, "c2")]
    theirs = managed(OTHER, AS, "c3")
    for c in (*mine, theirs):
        w.store.put(c)
        w.net.routes[f"DELETE {c.registration_client_uri}"] = status(204)

    deleted = await w.clients.delete(SID)

    assert sorted(deleted) == ["c1", "c2"]
    assert sorted(s.url for s in w.net.sent) == sorted(c.registration_client_uri for c in mine)
    assert all(s.method == "DELETE" for s in w.net.sent)
    assert w.store.for_identity(SID) == [] and w.store.for_identity(OTHER) == [theirs]
    assert w.count("-", "delete", "ok") == 2
    assert w.count("-", "delete", "error") is None


@run
async def test_a_client_the_server_offers_no_management_for_stays_stored(tmp_path):
    w = World(tmp_path)
    unmanaged = reg.RegisteredClient(SID, AS, "c1")
    w.store.put(unmanaged)
    assert await w.clients.delete(SID) == []
    assert w.net.sent == [] and w.store.for_identity(SID) == [unmanaged]
    assert w.count("-", "delete", "ok") is None and w.count("-", "delete", "error") is None


@pytest.mark.parametrize("failure", [status(500), certificate_failure])
@run
async def test_a_failed_deletion_is_kept_for_next_time_and_the_others_go_on(
    tmp_path, failure, debug_lines
):
    w = World(tmp_path)
    failing, fine = managed(SID, AS, "c1"), managed(SID, AS2, "c2")
    w.store.put(failing)
    w.store.put(fine)
    w.net.routes[f"DELETE {failing.registration_client_uri}"] = failure
    w.net.routes[f"DELETE {fine.registration_client_uri}"] = status(204)

    assert await w.clients.delete(SID) == ["c2"]

    assert w.store.for_identity(SID) == [failing]
    assert w.count("-", "delete", "error") == 1 and w.count("-", "delete", "ok") == 1
    (warned,) = [line for line in debug_lines() if line.get("level") == "warning"]
    assert "retry" in warned["event"] and warned["spiffe_id"] == SID
    assert failing.registration_client_uri in warned["error"]


@run
async def test_a_deletion_goes_through_the_agents_as_trust(tmp_path, debug_lines):
    w = World(tmp_path)
    client = managed(SID, AS, "c1")
    w.store.put(client)
    w.net.routes[f"DELETE {client.registration_client_uri}"] = certificate_failure
    assert await w.clients.delete(SID) == []
    (warned,) = [line for line in debug_lines() if line.get("level") == "warning"]
    assert AS_TLS.describe() in warned["error"]
