"""The authorization servers the Workload API refuses as audiences, known before a workload
asks (agent/oauth/audiences.py, Discovery's endpoints, WorkloadApiServer's refusal).

An AS may put its token endpoint, or an endpoint credless never calls (PAR, device
authorization, CIBA, an mTLS alias), on another origin than its issuer. A JWT-SVID for such
an endpoint is a client assertion there: the workload could get its own token and call the
MCP server past the proxy. Before, the Workload API knew those endpoints only once a request
had made credless read the AS's metadata, and never knew the ones it does not call. Now every
`*_endpoint` member counts, every configured AS is read at start, and until it is read every
URL audience is refused with UNAVAILABLE (fails closed)."""

from __future__ import annotations

import asyncio

import pytest
from grpclib.const import Status
from prometheus_client import CollectorRegistry

from agent.identity.entries import Entry
from agent.oauth.audiences import (
    FIRST_RETRY_SECONDS,
    LONGEST_RETRY_SECONDS,
    AuthorizationServerReader,
)
from agent.oauth.discovery import assertion_endpoints
from tests.unit.test_workload_api_mutants import (
    WEB,
    WEB_EXE,
    WEB_PID,
    Stream,
    World,
    denial,
    issued,
    jwt_request,
)

ISSUER = "https://accounts.example"
TOKEN = "https://oauth2.example-apis.test/token"  # another origin than the issuer


# ------------------------------------------------------------------ what metadata names


def test_every_endpoint_member_and_mtls_alias_of_as_metadata_counts():
    doc = {
        "issuer": ISSUER,
        "token_endpoint": TOKEN,
        "pushed_authorization_request_endpoint": "https://par.example/par",
        "device_authorization_endpoint": "https://device.example/code",
        "backchannel_authentication_endpoint": "https://ciba.example/bc",
        "a_future_endpoint": "https://future.example/x",
        "mtls_endpoint_aliases": {"token_endpoint": "https://mtls.example/token", "n": 3},
        "jwks_uri": "https://keys.example/jwks",  # keys, no endpoint that takes assertions
        "userinfo_endpoint": 7,  # not a URL
        "registration_endpoint": "",
        "scopes_supported": ["https://scope.example/x"],
    }
    assert assertion_endpoints(doc) == {
        ISSUER,
        TOKEN,
        "https://par.example/par",
        "https://device.example/code",
        "https://ciba.example/bc",
        "https://future.example/x",
        "https://mtls.example/token",
    }


@pytest.mark.parametrize("aliases", [None, "https://mtls.example/token", ["https://m.example"]])
def test_mtls_aliases_that_are_not_an_object_name_nothing(aliases):
    assert assertion_endpoints({"issuer": ISSUER, "mtls_endpoint_aliases": aliases}) == {ISSUER}


# ------------------------------------------------------------------ the reader


class Reads:
    """read(issuer) that fails `failures[issuer]` times, then succeeds; the waits asked."""

    def __init__(self, failures: dict[str, int] | None = None) -> None:
        self.failures = dict(failures or {})
        self.read: list[str] = []
        self.waits: list[float] = []
        self.hold: asyncio.Event | None = None

    async def __call__(self, issuer: str) -> None:
        self.read.append(issuer)
        if self.hold is not None:
            await self.hold.wait()
        if self.failures.get(issuer, 0) > 0:
            self.failures[issuer] -= 1
            raise OSError(f"connection refused by {issuer}")

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


def reader(
    issuers: dict[str, tuple[str, ...]], reads: Reads, registry: CollectorRegistry | None = None
) -> AuthorizationServerReader:
    return AuthorizationServerReader(
        issuers, issuers.__getitem__, reads, registry=registry, sleep=reads.sleep
    )


def unread_gauge(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("credless_oauth_unread_servers")


async def settled(r: AuthorizationServerReader) -> None:
    """Once every read task has finished."""
    await asyncio.gather(*r._tasks)


def test_every_server_is_unread_until_its_authorization_servers_are_read():
    reads, registry = Reads(), CollectorRegistry()
    r = reader({"b": (ISSUER, "https://as2.example"), "a": (ISSUER,)}, reads, registry)
    assert r.unread() == ("a", "b")  # before start: nothing read, nothing known
    assert unread_gauge(registry) == 2

    async def go():
        reads.hold = asyncio.Event()
        await r.start()
        await asyncio.sleep(0)
        held = r.unread()
        reads.hold.set()
        await settled(r)
        return held

    assert asyncio.run(go()) == ("a", "b")
    assert r.unread() == () and unread_gauge(registry) == 0
    assert sorted(reads.read) == [ISSUER, ISSUER, "https://as2.example"]


def test_a_failed_read_is_retried_with_a_growing_wait_and_the_server_stays_unread():
    reads = Reads({"https://as2.example": 9})
    r = reader({"a": (ISSUER,), "b": (ISSUER, "https://as2.example")}, reads)

    async def go():
        await r.start()
        while len(reads.waits) < 9:
            assert r.unread() == ("b",) or len(reads.waits) == 0
            await asyncio.sleep(0)
        await settled(r)

    asyncio.run(go())
    assert r.unread() == ()
    expected, w = [], FIRST_RETRY_SECONDS
    for _ in range(9):
        expected.append(w)
        w = min(w * 2, LONGEST_RETRY_SECONDS)
    assert reads.waits == expected and expected[-1] == LONGEST_RETRY_SECONDS


def test_a_server_with_no_authorization_server_yet_is_read_at_once():
    """Neither issuer nor pin (trust on first use): nothing to read until its first
    discovery, which reads and pins one; it does not hold the Workload API's URLs."""
    reads = Reads()
    r = reader({"tofu": ()}, reads)

    async def go():
        await r.start()
        await settled(r)

    asyncio.run(go())
    assert r.unread() == () and reads.read == []


def test_stop_cancels_a_read_still_waiting():
    reads = Reads()
    r = reader({"a": (ISSUER,)}, reads)

    async def go():
        reads.hold = asyncio.Event()
        await r.start()
        await asyncio.sleep(0)
        await r.stop()
        return r._tasks

    assert asyncio.run(go()) == []
    assert r.unread() == ("a",)


# ------------------------------------------------------------------ the Workload API


@pytest.fixture
def unread_world():
    unread: list[str] = ["weather"]
    w = World(unread_authorization_servers=lambda: unread)
    w.unread = unread
    yield w
    w.close()


@pytest.mark.parametrize(
    "audience",
    [
        (TOKEN,),
        ("spiffe://example.org/db", TOKEN),
        (" HTTP://127.0.0.2:8443/token",),
        ("https://user@oauth2.example-apis.test/token",),
    ],
)
def test_while_an_authorization_server_is_unread_a_url_audience_is_refused(unread_world, audience):
    w = unread_world
    web = w.connect(WEB_PID, WEB_EXE)
    err = w.refused("FetchJWTSVID", Stream(web, jwt_request(*audience)))
    assert err.status is Status.UNAVAILABLE
    assert "for server weather" in err.message and "retry" in err.message
    event = denial(w, err)
    assert event["unread"] == ["weather"] and event["audience"] == list(audience)
    assert w.manager.jwt_asked == [] and w.count("FetchJWTSVID", "UNAVAILABLE") == 1


@pytest.mark.parametrize("audience", ["spiffe://example.org/db", "my-service", "https:no-host"])
def test_while_unread_an_audience_that_is_no_url_is_served(unread_world, audience):
    web = unread_world.connect(WEB_PID, WEB_EXE)
    assert issued(unread_world, web, audience).spiffe_id == WEB


def test_once_read_the_same_url_audience_is_served(unread_world):
    web = unread_world.connect(WEB_PID, WEB_EXE)
    unread_world.unread.clear()
    assert issued(unread_world, web, TOKEN).spiffe_id == WEB


def test_an_entry_that_opts_in_is_served_while_unread(unread_world):
    w = unread_world
    entry = w.manager.entries[WEB_EXE]
    w.manager.entries[WEB_EXE] = Entry(
        entry.id, entry.spiffe_id, entry.selectors, authorization_server_audience=True
    )
    web = w.connect(WEB_PID, WEB_EXE)
    assert issued(w, web, TOKEN).spiffe_id == WEB


def test_an_audience_naming_a_known_authorization_server_is_refused_for_good(unread_world):
    """Known beats unread: the answer is the final PERMISSION_DENIED, not 'retry'."""
    w = unread_world
    web = w.connect(WEB_PID, WEB_EXE)
    w.servers.append(TOKEN)
    err = w.refused("FetchJWTSVID", Stream(web, jwt_request(TOKEN)))
    assert err.status is Status.PERMISSION_DENIED
    assert denial(w, err)["authorization_server"] == TOKEN
