"""The fast lane (agent/inject/lane.py) without sockets: which reads go upstream as read,
with only the credential fields spliced in, and which are left to the full path (parser,
coroutine). A read the lane declines is untouched: the full path decides it afresh."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.attest.selectors import Attestation
from agent.config import InjectSection, ServerSection
from agent.identity.bundle import TrustBundle
from agent.identity.entries import Entry
from agent.identity.jwtsvid import JwtSvid
from agent.identity.manager import Identity
from agent.identity.spiffeid import SpiffeId
from agent.inject import decide
from agent.inject.flows import ClientSide, UpstreamSide
from agent.inject.lane import FastLane
from agent.inject.ports import Policy, ProofKey, SockAddr
from agent.inject.proxy import Proxy
from agent.inject.redirect import RedirectInfo
from agent.inject.served import Served
from agent.inject.upstreams import Upstream
from agent.oauth.discovery import ServerMetadata
from agent.oauth.tokens import Token
from agent.observe.logging import AuditLog
from agent.observe.tally import CounterCell
from agent.policy.rules import Decision
from tests.unit.transport import Transport

SID = "spiffe://example.org/w"
TOKEN = Token(
    "header.payload.sig",
    "Bearer",
    0,
    time.time() + 3600,
    "tools",
    "r",
    "i",
    SID,
    "c",
    None,
    "sha-of-token",
    "jti-1",
)
UP = Upstream(
    "tools",
    "http",
    "127.0.0.1",
    8080,
    "http://127.0.0.1:8080",
    "broker",
    b"/mcp",
    (b"127.0.0.1:8080",),
)
INFO = RedirectInfo("127.0.0.1", 8080, 100, 100, 0, 1, 1, 5, 1)
BODY = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
ANSWER = b'{"jsonrpc":"2.0","id":1,"result":{}}'
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)


def request(
    *fields: bytes,
    version: bytes = b"1.1",
    method: bytes = b"POST",
    body: bytes = BODY,
    target: bytes = b"/mcp?session=1",
) -> bytes:
    """A request as the workload sends it: its Content-Length unless fields frame the body
    (Transfer-Encoding; body is then as framed)."""
    framed = any(f.lower().startswith(b"transfer-encoding:") for f in fields)
    length = b"" if framed else b"Content-Length: %d\r\n" % len(body)
    return b"%s %s HTTP/%s\r\nHost: 127.0.0.1:8080\r\n%s%s\r\n%s" % (
        method,
        target,
        version,
        b"".join(f + b"\r\n" for f in fields),
        length,
        body,
    )


class AllowAll:
    """A policy that allows everything: still, a POST body is read to be decided."""

    def decide(
        self, sid: str, server: str, method: str, tool: str | None, parent: str | None, /
    ) -> Decision:
        return Decision(True, None, "allowed")


class FakeImages:
    """The kernel's view of the one process image: (start, exec) or None once it exited."""

    def __init__(self, image: tuple[int, int] | None):
        self.image = image

    def image_changes(self, tgid: int) -> int | None:
        return None

    def kernel_image(self, tgid: int) -> tuple[int, int] | None:
        return self.image


class FakeAttestor:
    def __init__(self, image: tuple[int, int] | None):
        self.source = FakeImages(image)

    def attest_image(self, tgid: int, exec_ns: int, timeout: float = 1.0) -> Attestation | None:
        return None  # the lane never asks: the connection was attested when it was accepted

    def ancestors(self, att: Attestation) -> Iterator[Attestation]:
        return iter(())  # nor for its ancestors


class FakeIdentities:
    generation = 0  # the registration entries never change here

    def resolve(self, attestation: Attestation, quiet: bool = False) -> Identity | None:
        return None

    def note_use(self, ident: Identity, attestation: Attestation) -> None:
        pass

    def jwt_svid(
        self, ident: Identity, audience: list[str], ttl: int | None = None, iss: str | None = None
    ) -> JwtSvid:
        raise AssertionError("no assertion-mode server here")

    def bundle(self) -> TrustBundle:
        raise AssertionError("no assertion-mode server here")


class FakeCache:
    generation = 0


class FakeOAuth:
    """The token cache's answer is whatever the world holds now; nothing is fetched."""

    def __init__(self, world: World):
        self.world = world
        self.cache = FakeCache()
        self.m_hit = CounterCell()
        self.servers: dict[str, ServerSection] = {}
        self.invalidated: list[Token] = []
        self.challenges: list[str | None] = []  # what each invalidate() was told
        self.key: ProofKey | None = None  # a DPoP key, for DPoP tokens
        self.jwks_uri: str | None = None

    def cached_token(self, ident: Identity, server_name: str) -> Token | None:
        self.world.asked += 1
        return self.world.token

    async def token(self, ident: Identity, server_name: str) -> Token:
        raise AssertionError("the lane never awaits a token")

    def dpop_key(self, spiffe_id: str) -> ProofKey:
        assert self.key is not None
        return self.key

    async def server_metadata(self, issuer: str) -> ServerMetadata:
        raise AssertionError("no assertion-mode server here")

    def invalidate(
        self, ident: Identity, server_name: str, token: Token, challenge: str | None = None
    ) -> None:
        self.invalidated.append(token)
        self.challenges.append(challenge)


class NoRedirect:
    """The lane is given connections already looked up: no record is ever asked for but
    who has written on the connection: `bits` (bpf/redirect.h CREDLESS_SENDER_*; None: the
    record is gone), with its slot's change counter `changes`; `sender_reads` counts the
    reads of the record itself."""

    def __init__(self) -> None:
        self.changes: int | None = 0
        self.bits: int | None = 0
        self.sender_reads = 0
        self.cookies: set[int] = set()  # the connections asked about

    def lookup(self, peer: SockAddr, local: SockAddr, netns: int) -> RedirectInfo | None:
        return None

    def forget(self, peer: SockAddr, local: SockAddr, info: RedirectInfo) -> None:
        pass

    def sender_changes(self, cookie: int) -> int | None:
        self.cookies.add(cookie)
        return self.changes

    def sender(self, cookie: int) -> int | None:
        self.cookies.add(cookie)
        self.sender_reads += 1
        return self.bits


class World:
    """A proxy with its kernel, identity and OAuth parts answered from fields."""

    def __init__(
        self,
        token: Token | None = TOKEN,
        pooled: bool = True,
        image: tuple[int, int] | None = (1, 5),
        policy: Policy | None = None,
        **parts: Any,
    ):
        """parts: the Proxy's other arguments, in place of these stand-ins (the kernel's
        records, the attestor, the identities, its settings: tests/unit/test_proxy_mutants.py)."""
        self.audit_out = io.StringIO()
        self.registry = CollectorRegistry()
        self.now = 1000.0  # the upstream pool's clock: a test moves it, nothing else does
        self.asked = 0
        self.token = token
        self.oauth = FakeOAuth(self)
        cfg = InjectSection(
            upstream_pool_size=4,
            upstream_idle_seconds=4.0,
            workload_authorization="strip",
            unattested="deny",
        )
        args: dict[str, Any] = dict(
            cfg=cfg,
            upstreams={},
            redirect=NoRedirect(),
            attestor=FakeAttestor(image),
            identity=FakeIdentities(),
            oauth=self.oauth,
            audit=AuditLog("node", stream=self.audit_out),
            registry=self.registry,
            policy=policy,
            clock=lambda: self.now,
        )
        self.proxy = Proxy(**{**args, **parts})
        self.client = ClientSide(lambda c: None)
        self.client.connection_made(Transport())
        self.upstream = UpstreamSide()
        self.upstream.connection_made(Transport())
        self.key = (SID, UP.host, UP.port, UP.scheme)
        if pooled:
            self.proxy.pool.put(self.key, self.upstream)
        ident = Identity(SpiffeId.parse(SID), Entry("w", SID, frozenset()))
        fragment = self.proxy.rec.fragment(server=UP.name, pid=INFO.tgid, spiffe_id=SID)
        self.served = Served(self.client, INFO, UP, ident, 0, {"spiffe_id": SID}, fragment)
        self.lane = FastLane(self.proxy, self.served)
        self.client.fast = self.lane.offer

    def audit(self) -> list[dict]:
        return [json.loads(line) for line in self.audit_out.getvalue().splitlines()]


def run(world: World, *reads: bytes, answer: bytes = RESPONSE) -> None:
    for data in reads:
        world.client.data_received(data)
    if world.upstream.transport.out:
        world.upstream.data_received(answer)


def in_loop(test):
    """The protocols ask for the running loop: run the test's body inside one."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        async def body():
            return test(*args, **kwargs)

        return asyncio.run(body())

    return wrapper


@in_loop
def test_a_plain_request_goes_as_read_with_the_token_spliced_in():
    w = World()
    run(w, request(b"Content-Type: application/json"))
    sent = w.upstream.transport.out
    head, body = sent.split(b"\r\n\r\n")
    assert body == BODY
    assert head == (
        b"POST /mcp?session=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n"
        b"Authorization: Bearer header.payload.sig" % len(BODY)
    )
    assert w.client.transport.out == RESPONSE  # the answer, byte for byte
    assert not w.client.fast_inflight and not w.client._events
    [rec] = w.audit()
    assert rec["event"] == "request.injected" and rec["status"] == 200
    assert rec["method"] == "POST" and rec["path"] == "/mcp" and rec["jti"] == "jti-1"
    assert rec["token_sha256"] == "sha-of-token" and rec["jkt"] is None
    assert rec["server"] == "tools" and rec["pid"] == 100 and rec["spiffe_id"] == SID
    assert rec["latency_ms"] >= 0 and rec["node"] == "node"
    assert "header.payload.sig" not in w.audit_out.getvalue()
    w.lane.release()  # the workload connection ends:
    assert w.proxy.pool.get(w.key) is w.upstream  # back in the pool


# table: reads the fast path must leave to the full path (which strips, rejects, re-frames)
DECLINED = {
    "the workload's own credentials": request(b"Authorization: Bearer stolen"),
    "... in any case": request(b"aUtHoRiZaTiOn: Bearer stolen"),
    "a DPoP proof": request(b"DPoP: eyJ.proof"),
    "a Connection field": request(b"Connection: keep-alive, X-Secret"),
    "Keep-Alive": request(b"Keep-Alive: timeout=5"),
    "Proxy-Connection": request(b"Proxy-Connection: keep-alive"),
    "an expectation": request(b"Expect: 100-continue"),
    "an upgrade": request(b"Connection: Upgrade", b"Upgrade: websocket"),
    "TE": request(b"TE: trailers"),
    "a chunked body": (
        b"POST /mcp HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    ),
    "HTTP/1.0": request(version=b"1.0"),
    "a HEAD request": request(method=b"HEAD", body=b""),
    "two requests in one read": request() + request(),
    "half a request": request()[:25],
    "not HTTP": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    # llhttp skips empty lines before a request: the field search must not stop at them
    "blank lines, then credentials": b"\r\n\r\n" + request(b"Authorization: Bearer stolen"),
    "a blank line first": b"\r\n" + request(),
}


@pytest.mark.parametrize("read", DECLINED.values(), ids=DECLINED.keys())
@in_loop
def test_reads_that_need_the_full_path_are_declined_untouched(read):
    w = World()
    assert w.lane.offer(read) is False
    assert w.upstream.transport.out == b"" and not w.client.fast_inflight
    assert w.proxy.pool.get(w.key) is w.upstream  # not taken from the pool either


@in_loop
def test_a_field_whose_name_only_contains_authorization_is_not_mistaken_for_it():
    w = World()
    run(w, request(b"X-Authorization: kept"))
    assert b"X-Authorization: kept\r\n" in w.upstream.transport.out
    assert b"Authorization: Bearer header.payload.sig" in w.upstream.transport.out


@pytest.mark.parametrize(
    "world",
    [
        dict(token=None),  # no cached token: the coroutine awaits one
        dict(pooled=False),  # no idle upstream connection: it connects
        dict(image=(1, 6)),  # exec'd since it connected: the coroutine closes it
        dict(image=None),  # exited
        dict(policy=AllowAll()),  # a POST body to decide
    ],
)
@in_loop
def test_what_needs_awaiting_or_deciding_is_declined(world):
    w = World(**world)
    read = request()
    assert w.lane.offer(read) is False
    assert w.upstream.transport.out == b""
    if world.get("pooled", True):
        w.lane.release()
        assert w.proxy.pool.get(w.key) is w.upstream  # back in the pool once released


@in_loop
def test_a_declined_partial_read_leaves_the_next_whole_request_to_the_fast_path():
    w = World()
    run(w, request()[:25])  # the parser has begun a request: the rest goes there
    assert w.upstream.transport.out == b""
    w.client._events.clear()
    w.client._reader = type(w.client._reader)()  # as if the coroutine took that request
    run(w, request())
    assert b"Authorization: Bearer" in w.upstream.transport.out


@in_loop
def test_a_401_answer_is_parsed_so_its_challenge_is_read():
    w = World()
    answer = (
        b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer error="invalid_token"'
        b"\r\nContent-Length: 0\r\n\r\n"
    )
    run(w, request(), answer=answer)
    assert w.oauth.invalidated == [TOKEN]
    assert w.client.transport.out.startswith(b"HTTP/1.1 401")


@in_loop
def test_a_dpop_token_gets_a_fresh_proof_bound_to_this_method_and_url_without_query():
    dpop = dataclasses.replace(TOKEN, token_type="DPoP", jkt="jkt-1")
    proofs = []

    class Key:
        def proof(self, method: str, url: str, access_token: str | None = None) -> str:
            proofs.append((method, url, access_token))
            return f"proof-{len(proofs)}"

    w = World(token=dpop)
    w.oauth.key = Key()
    run(w, request())
    head = w.upstream.transport.out.split(b"\r\n\r\n")[0]
    assert head.endswith(b"\r\nAuthorization: DPoP header.payload.sig\r\nDPoP: proof-1")
    assert proofs == [("POST", "http://127.0.0.1:8080/mcp", "header.payload.sig")]
    w.upstream.transport.out = b""
    run(w, request())  # the next request: a new proof
    assert w.upstream.transport.out.split(b"\r\n\r\n")[0].endswith(b"DPoP: proof-2")


@in_loop
def test_each_token_is_recorded_as_itself_on_one_connection():
    w = World()
    run(w, request())
    w.token = NEXT  # refreshed: the cache says a token changed
    w.oauth.cache.generation += 1
    run(w, request())
    assert [(r["jti"], r["token_sha256"]) for r in w.audit()] == [
        ("jti-1", "sha-of-token"),
        ("jti-2", "sha-of-next"),
    ]


NEXT = dataclasses.replace(
    TOKEN, access_token="next.payload.sig", fingerprint="sha-of-next", jti="jti-2"
)


@in_loop
def test_the_cached_token_is_reused_only_while_no_token_changed_and_for_a_second():
    w = World()
    for _ in range(3):
        run(w, request())
    assert w.asked == 1 and w.oauth.m_hit.value == 2  # reuses still count as hits
    w.token = None  # invalidated (a 401 elsewhere): generation moves
    w.oauth.cache.generation += 1
    assert w.lane.offer(request()) is False and w.asked == 2
    w.token = TOKEN
    w.lane._memo_until = 0.0  # a second later: asked again
    run(w, request())
    assert w.asked == 3


@in_loop
def test_a_token_at_its_expiry_skew_is_not_held():
    w = World(token=dataclasses.replace(TOKEN, expires_at=time.time() + 5.0))
    run(w, request())
    run(w, request())
    assert w.asked == 2  # no validity left past the skew: asked each time


@in_loop
def test_the_upstream_connection_is_held_for_the_next_request_while_fresh():
    w = World()
    run(w, request())
    assert w.proxy.pool.get(w.key) is None  # held by the lane, not in the pool
    w.upstream.transport.out = b""
    run(w, request())
    assert b"Authorization: Bearer" in w.upstream.transport.out  # the same connection
    w.now += w.proxy.pool.max_idle + 1  # idle past the servers' timeouts
    assert w.lane.offer(request()) is False  # not reused: the pool has none
    assert w.upstream.transport.closed


@in_loop
def test_a_held_connection_idle_too_long_is_closed_on_release_not_pooled():
    w = World()
    run(w, request())
    w.now += w.proxy.pool.max_idle + 1
    w.lane.release()
    assert w.upstream.transport.closed and w.proxy.pool.get(w.key) is None


# The lane's own limits are the parser's (a head over max_head or with more fields than
# max_fields is refused 431 by the full path): a read at a limit goes, one over it is left to
# the full path, which refuses it. Measured on the read itself, not on a default.
@pytest.mark.parametrize(
    "limit,over,goes",
    [
        ("max_head", 0, True),
        ("max_head", 1, False),
        ("max_fields", 0, True),
        ("max_fields", 1, False),
    ],
)
@in_loop
def test_a_head_at_the_parsers_limits_goes_one_over_them_does_not(limit, over, goes):
    w = World()
    read = request(b"Content-Type: application/json", b"X-One: 1", b"X-Two: 2")
    end = read.index(b"\r\n\r\n")
    at_limit = {"max_head": end, "max_fields": read.count(b"\r\n", 0, end)}[limit]
    setattr(w.client, limit, at_limit - over)
    assert w.lane.offer(read) is goes
    assert (w.upstream.transport.out != b"") is goes


@pytest.mark.parametrize("method", [b"HEAD", b"CONNECT"])
@in_loop
def test_head_and_connect_are_left_to_the_full_path(method):
    w = World()
    target = b"127.0.0.1:8080" if method == b"CONNECT" else b"/mcp"
    read = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n" % (method, target)
    assert w.lane.offer(read) is False
    assert w.upstream.transport.out == b"" and w.proxy.pool.get(w.key) is w.upstream


@in_loop
def test_a_request_whose_host_credless_rewrites_is_left_to_the_full_path():
    # a workload_url server: the Host sent upstream is the https server's, which only the
    # full path writes; the lane must decline, not take the request and send nothing
    w = World()
    w.lane.up = dataclasses.replace(UP, send_host=b"localhost:8443")
    assert w.lane.offer(request()) is False
    assert w.upstream.transport.out == b"" and w.proxy.pool.get(w.key) is w.upstream


@in_loop
def test_a_dpop_proof_that_cannot_be_made_leaves_the_request_to_the_full_path():
    class Broken:
        def proof(self, method: str, url: str, access_token: str | None = None) -> str:
            raise RuntimeError("no key")

    w = World(token=dataclasses.replace(TOKEN, token_type="DPoP", jkt="jkt-1"))
    w.oauth.key = Broken()
    assert w.lane.offer(request()) is False  # declined, not swallowed
    assert w.upstream.transport.out == b"" and w.proxy.pool.get(w.key) is w.upstream


@in_loop
def test_a_passthrough_request_goes_as_read_and_its_head_request_does_not():
    # passthrough: no credential, the workload's bytes as read; a HEAD's answer has a length
    # and no body, which only the full path's parser frames
    w = World()
    w.lane.up = dataclasses.replace(UP, mode="passthrough")
    head = b"HEAD /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
    assert w.lane.offer(head) is False and w.upstream.transport.out == b""
    read = request(b"Content-Type: application/json")
    assert w.lane.offer(read) is True
    assert w.upstream.transport.out == read  # nothing spliced in


@in_loop
def test_who_wrote_is_read_from_the_record_only_when_its_counter_moved():
    w = World()
    records = w.proxy.redirect
    run(w, request())
    assert records.sender_reads == 1  # the first request: no clean answer kept yet
    run(w, request())
    assert records.sender_reads == 1  # the counter has not moved: one load, no lookup
    records.changes = 1  # another connection sharing the slot was marked
    run(w, request())
    assert records.sender_reads == 2 and len(w.audit()) == 3  # read again, still clean: served
    assert records.cookies == {INFO.cookie}  # of this connection, both


@pytest.mark.parametrize(
    "bits, named",
    [
        (1, "another process wrote on this connection, which pid 100 made"),
        (2, "another uid wrote"),
        (6, "another uid and another cgroup wrote"),
        (None, "the connection's kernel record is gone"),
        (8, "a task credless cannot name (sender bits 0x8)"),  # a bit of a later kernel side
    ],
)
@in_loop
def test_a_connection_another_task_wrote_on_is_not_served(bits, named):
    w = World()
    records = w.proxy.redirect
    run(w, request())
    sent = w.upstream.transport.out
    records.changes, records.bits = 1, bits  # the kernel marked a write by another task
    assert w.lane.offer(request()) is False  # the full path closes it
    assert w.upstream.transport.out == sent
    caller = w.proxy.caller(w.served)
    assert not caller.current and named in caller.changed
    verdict = decide.decide(
        decide.Request(b"POST", b"/mcp", {b"host": [b"127.0.0.1:8080"]}),
        UP,
        caller,
        w.proxy.cfg,
        None,
    )
    assert (verdict.action, verdict.outcome) == (decide.CLOSE, "identity_changed")
