"""The fast lane (agent/inject/lane.py) without sockets, where the rest of the unit suite
reached it without checking closely: the ends of a request (finish, the DPoP-nonce retry and
its connect path) and what offer() asks for and records, as the workload, the MCP server,
the audit reader and the metrics see them: which connection carries the request sent again,
what a workload is answered when that cannot be done, when its connection stays open, what
the pool keeps, which token is taken and for how long.

Each test states one rule the mutants of those functions broke while the rest of the unit
suite passed (docs/mutation.md, "Triage")."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import time
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, cast

import pytest
import structlog.testing

from agent.inject import lane
from agent.inject.flows import ClientSide, UpstreamSide
from agent.inject.lane import FastLane
from agent.inject.served import Served
from agent.inject.upstreams import Upstream
from agent.oauth.dpop import DPoPKey
from agent.oauth.tokens import EXPIRY_SKEW_SECONDS
from agent.observe import logging as obs
from tests.unit.test_dpop_nonce import dpop_world, events, nonce_401, ok_with_nonce, proofs
from tests.unit.test_fast_path import (
    BODY,
    INFO,
    RESPONSE,
    SID,
    TOKEN,
    UP,
    World,
    in_loop,
    request,
    run,
)
from tests.unit.transport import Transport


@pytest.fixture
def logged() -> Iterator[list[MutableMapping[str, Any]]]:
    """The diagnostic events logged during the test (structlog's capture; configured first,
    as the other logging tests leave it, into a buffer)."""
    obs.configure(level="info", fmt="json", stream=io.StringIO())
    with structlog.testing.capture_logs() as captured:
        yield captured


def errors(logged: list[MutableMapping[str, Any]]) -> list[str]:
    return [e["event"] for e in logged if e["log_level"] in ("error", "critical")]


def outcomes(w: World) -> dict[str, float]:
    """credless_injected_requests by outcome, as the metrics endpoint would show them."""
    out: dict[str, float] = {}
    for metric in w.proxy.rec.m_requests.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                out[s.labels["outcome"]] = s.value
    return out


def connection(transport: Transport | None = None) -> UpstreamSide:
    conn = UpstreamSide()
    conn.connection_made(cast(asyncio.BaseTransport, transport or Transport()))
    return conn


def fake(side: ClientSide | UpstreamSide) -> Transport:
    """The stand-in transport of a side (tests/unit/transport.py): what it was written, and
    whether it was closed."""
    transport = side.transport
    assert isinstance(transport, Transport)
    return transport


class Connects:
    """Stands for Exchanges.connect: records which server it was asked for, then runs
    `then` (what happens meanwhile) and returns `conn` or raises `error`."""

    def __init__(
        self,
        conn: UpstreamSide | None = None,
        error: OSError | None = None,
        then: Callable[[], None] | None = None,
    ):
        self.conn, self.error, self.then = conn, error, then
        self.asked: list[Upstream] = []

    async def __call__(self, up: Upstream) -> UpstreamSide:
        self.asked.append(up)
        if self.then is not None:
            self.then()
        if self.error is not None:
            raise self.error
        assert self.conn is not None
        return self.conn


async def refused_on_a_closed_connection(w: World, connects: Connects) -> None:
    """The first request answered with a nonce demand and `Connection: close`: the lane
    connects again (a task), which the test lets run to its end."""
    w.proxy.exchanges.connect = connects  # type: ignore[method-assign]
    run(w, request(), answer=nonce_401(b"n-1", close=True))
    assert fake(w.upstream).closed
    others = asyncio.all_tasks() - {asyncio.current_task()}
    await asyncio.gather(*others)  # the lane's, if it made one


# ------------------------------------------------------------ the request sent again


@in_loop
def test_the_request_sent_again_is_the_same_request_with_only_its_proof_renewed():
    # RFC 9449 §9: the retry is the request as the workload sent it, with a new proof bound
    # to the same method and URL, carrying the nonce; nothing else of it changes
    w, _ = dpop_world()
    run(w, request(b"Content-Type: application/json"), answer=nonce_401(b"n-1"))
    sent = fake(w.upstream).out
    first, second = proofs(sent)
    assert (
        (second["htm"], second["htu"])
        == (first["htm"], first["htu"])
        == (
            "POST",
            "http://127.0.0.1:8080/mcp",
        )
    )
    assert second["ath"] == first["ath"] and second["nonce"] == "n-1"
    one, again = (
        b"\r\n".join(line for line in part.split(b"\r\n") if not line.startswith(b"DPoP: "))
        for part in sent.split(BODY)[:2]
    )
    assert one == again  # but for the proof, the same bytes


@in_loop
def test_a_proof_that_cannot_be_made_for_the_retry_leaves_the_401_to_the_workload():
    # _send_again returns False: the server's 401 goes to the workload as it came, and the
    # workload's connection takes its next request; nothing is left in flight
    class OnceOnly(DPoPKey):
        """Keeps the server's nonce, but makes no proof after the first."""

        made = 0

        def proof(self, *args: Any, **kwargs: Any) -> str:
            self.made += 1
            if self.made > 1:
                raise RuntimeError("the key is gone")
            return super().proof(*args, **kwargs)

    w, _ = dpop_world()
    w.oauth.key = key = OnceOnly()
    run(w, request(), answer=nonce_401(b"n-1"))
    assert key.made == 2  # the retry's proof was asked for, and failed
    assert fake(w.upstream).out.count(BODY) == 1  # not sent again
    assert fake(w.client).out == nonce_401(b"n-1")
    assert not w.client.fast_inflight and not w.client.closed
    assert events(w) == ["request.injected"]


@in_loop
def test_a_dpop_request_answered_otherwise_is_sent_once():
    # only a 401 asking for a nonce is sent again: a 200, or a 401 for another reason, is
    # the workload's answer
    for answer in (
        RESPONSE,
        b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: DPoP error="invalid_token"\r\n'
        b"Content-Length: 0\r\n\r\n",
    ):
        w, _ = dpop_world()
        run(w, request(), answer=answer)
        assert fake(w.upstream).out.count(BODY) == 1
        assert fake(w.client).out.split(b"\r\n", 1)[0] == answer.split(b"\r\n", 1)[0]
        assert not w.client.fast_inflight


def test_when_the_server_closes_a_pooled_connection_carries_the_retry():
    # an idle connection to the same server is at hand: the request goes again on it, and
    # no new connection is made
    async def body() -> None:
        w, _ = dpop_world()
        spare = connection()
        w.proxy.pool.put(w.key, spare, since=w.now - 1)  # older: the lane takes w.upstream
        connects = Connects(conn=connection())
        await refused_on_a_closed_connection(w, connects)
        assert connects.asked == []
        assert [p.get("nonce") for p in proofs(fake(spare).out)] == ["n-1"]
        assert fake(w.client).out == b"" and w.client.fast_inflight
        spare.data_received(RESPONSE)
        assert fake(w.client).out == RESPONSE and not w.client.fast_inflight
        assert events(w) == ["request.retried", "request.injected"]

    asyncio.run(body())


# ------------------------------------------------------------ the retry's own connection


def test_the_retry_connects_to_the_requests_server_and_sends_it_there():
    async def body() -> None:
        w, _ = dpop_world()
        fresh = connection()
        connects = Connects(conn=fresh)
        await refused_on_a_closed_connection(w, connects)
        assert connects.asked == [UP]
        assert [p.get("nonce") for p in proofs(fake(fresh).out)] == ["n-1"]
        fresh.data_received(RESPONSE)
        assert fake(w.client).out == RESPONSE and not w.client.closed

    asyncio.run(body())


def test_a_server_unreachable_for_the_retry_is_a_502_on_a_connection_kept_open(logged):
    # as for the full path (Exchanges.unreachable): answered, audited and counted; the
    # workload's connection takes its next request (through the lane again)
    async def body() -> None:
        w, _ = dpop_world()
        connects = Connects(error=ConnectionRefusedError("refused by the test"))
        await refused_on_a_closed_connection(w, connects)
        assert connects.asked == [UP]
        head, answer = fake(w.client).out.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 502 ")
        assert b"refused by the test" in answer
        assert events(w) == ["request.retried", "request.failed"]
        failed = w.audit()[1]
        assert failed["reason"] == "upstream unreachable: refused by the test"
        assert (failed["server"], failed["method"], failed["path"]) == ("tools", "POST", "/mcp")
        assert outcomes(w).get("upstream_unreachable") == 1
        assert not w.client.closed and not fake(w.client).closed
        assert not w.client.fast_inflight
        assert errors(logged) == []
        # the next request goes the lane's way, on a connection of its own
        fake(w.client).out = b""
        nxt = connection()
        w.proxy.pool.put(w.key, nxt)
        w.client.data_received(request())
        assert fake(nxt).out.count(BODY) == 1

    asyncio.run(body())


def test_a_workload_gone_before_the_retry_connects_leaves_the_connection_pooled(logged):
    # nothing to send for: the new connection, unused, is kept for the next workload of the
    # same identity and server; the lane is done with the request, and no error is logged
    async def body() -> None:
        w, _ = dpop_world()
        fresh = connection()
        connects = Connects(conn=fresh, then=lambda: w.client.connection_lost(None))
        await refused_on_a_closed_connection(w, connects)
        assert fake(fresh).out == b"" and not fake(fresh).closed
        assert w.proxy.pool.get(w.key) is fresh
        assert w.client.closed and not w.client.fast_inflight
        assert errors(logged) == []

    asyncio.run(body())


class Broken(Transport):
    """A connection whose first write fails (the server reset it as it was made)."""

    def write(self, data: bytes) -> None:
        raise RuntimeError("the transport refuses the write")


def test_a_retry_that_fails_to_go_out_closes_the_workloads_connection(logged):
    # the request is neither answered nor in flight: the workload's connection is closed
    # (it sees its request unanswered), and the lane takes no more on it
    async def body() -> None:
        w, _ = dpop_world()
        connects = Connects(conn=connection(Broken()))
        await refused_on_a_closed_connection(w, connects)
        assert w.client.closed and fake(w.client).closed
        assert not w.client.fast_inflight
        assert len(errors(logged)) == 1

    asyncio.run(body())


# ------------------------------------------------------------ finish


@in_loop
def test_the_workloads_connection_stays_open_after_an_answer():
    w = World()
    run(w, request())
    assert fake(w.client).out == RESPONSE
    assert not w.client.closed and not fake(w.client).closed
    assert not w.client.fast_inflight
    fake(w.upstream).out = b""
    run(w, request())  # and takes the next request the lane's way
    assert fake(w.upstream).out.count(BODY) == 1


@in_loop
def test_an_answer_the_server_ends_by_closing_is_ended_the_same_way_to_the_workload():
    # no Content-Length and not chunked: the body ends at the server's close, so the only
    # way the workload can tell its end is its own connection closing after it
    w = World()
    run(w, request(), answer=b"HTTP/1.1 200 OK\r\n\r\n" + BODY)
    assert not w.client.closed  # the body goes on until the server closes
    w.upstream.eof_received()
    assert fake(w.client).out.endswith(BODY)
    assert b"Connection: close" in fake(w.client).out
    assert w.client.closed and fake(w.client).closed and not w.client.fast_inflight
    assert events(w) == ["request.injected"]


@in_loop
def test_a_connection_draining_for_the_agents_stop_is_closed_after_its_answer():
    w = World()
    w.client.data_received(request())
    w.client.drain_and_close()  # the agent stops while the request is with the server
    w.upstream.data_received(RESPONSE)
    assert fake(w.client).out == RESPONSE  # answered first
    assert w.client.closed and fake(w.client).closed and not w.client.fast_inflight


@in_loop
def test_a_failure_finishing_a_request_closes_the_workloads_connection(logged):
    # whatever fails once the answer came, the workload's connection is not left waiting
    # with the lane's request in flight: it is closed, and the failure logged
    def fails(*args: object, **kwargs: object) -> bool:
        raise RuntimeError("finishing failed in the test")

    w = World()
    w.proxy.exchanges.finished = fails  # type: ignore[method-assign]
    run(w, request())
    assert w.client.closed and fake(w.client).closed
    assert not w.client.fast_inflight
    assert len(errors(logged)) == 1


# ------------------------------------------------------------ the retried request's answer


@in_loop
def test_a_nonce_in_the_retried_requests_answer_goes_in_the_next_proof():
    # the answer to the request sent again is watched for a DPoP-Nonce like any other
    w, _ = dpop_world()
    run(w, request(), answer=nonce_401(b"n-1"))
    w.upstream.data_received(ok_with_nonce(b"n-2"))
    assert fake(w.client).out == ok_with_nonce(b"n-2")
    fake(w.upstream).out = b""
    run(w, request())
    assert [p["nonce"] for p in proofs(fake(w.upstream).out)] == ["n-2"]


@in_loop
def test_a_nonce_demand_without_a_nonce_goes_to_the_workload_as_the_server_gave_it():
    # nothing to send again with (no DPoP-Nonce field): the first request's 401 is relayed,
    # not taken for a demand repeated after a retry (a 502 naming credless's once-only rule)
    w, _ = dpop_world()
    no_nonce = (
        b"HTTP/1.1 401 Unauthorized\r\n"
        b'WWW-Authenticate: DPoP algs="ES256", error="use_dpop_nonce"\r\n'
        b"Content-Length: 0\r\n\r\n"
    )
    run(w, request(), answer=no_nonce)
    assert fake(w.upstream).out.count(BODY) == 1
    assert fake(w.client).out == no_nonce
    assert events(w) == ["request.injected"]
    assert not w.client.fast_inflight and not w.client.closed


@in_loop
def test_a_bearer_requests_answer_is_not_read_for_dpop_nonces():
    # a DPoP-Nonce is noted for the server's DPoP proofs only: a Bearer request's answer
    # carrying one asks for no DPoP key (none exists for a Bearer identity)
    asked: list[str] = []
    w = World()

    def dpop_key(spiffe_id: str) -> object:
        asked.append(spiffe_id)
        raise AssertionError("no DPoP key for a Bearer token")

    w.oauth.dpop_key = dpop_key  # type: ignore[method-assign,assignment]
    run(w, request(), answer=ok_with_nonce(b"n-1"))
    assert fake(w.client).out == ok_with_nonce(b"n-1")
    assert asked == [] and not w.client.closed
    assert events(w) == ["request.injected"]


# ------------------------------------------------------------ offer: what it asks, records


@in_loop
def test_the_token_is_asked_for_this_connections_identity_and_server():
    # a token is never taken across identities or servers
    asked: list[tuple[str, str]] = []
    w = World()

    def cached_token(ident: Any, server_name: str) -> Any:
        asked.append((str(ident.spiffe_id), server_name))
        return TOKEN

    w.oauth.cached_token = cached_token  # type: ignore[method-assign]
    run(w, request())
    assert asked == [(SID, UP.name)]


class Clocks:
    """Stands for the `time` module in lane.py: its two clocks set by the test."""

    perf_counter = staticmethod(time.perf_counter)  # the request's own timing, as it is

    def __init__(self, monotonic: float, wall: float):
        self.mono, self.wall = monotonic, wall

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall


@pytest.mark.parametrize("left", [0.5, 5.0])  # validity left past the skew, under/over 1 s
@in_loop
def test_a_remembered_token_is_asked_for_again_when_its_memo_ends_not_after(monkeypatch, left):
    # at most TOKEN_MEMO_SECONDS, and never at or past the token's expiry less the skew,
    # where the cache itself (Token.valid: now < expires_at - skew) no longer gives it
    clocks = Clocks(monotonic=500.0, wall=10_000.0)
    monkeypatch.setattr(lane, "time", clocks)
    w = World(token=dataclasses.replace(TOKEN, expires_at=10_000.0 + EXPIRY_SKEW_SECONDS + left))
    run(w, request())
    end = min(FastLane.TOKEN_MEMO_SECONDS, left)
    clocks.mono += end / 2
    run(w, request())
    assert w.asked == 1  # remembered
    clocks.mono = 500.0 + end  # exactly at the memo's end
    run(w, request())
    assert w.asked == 2


@in_loop
def test_the_audit_path_is_the_target_up_to_its_first_question_mark():
    w = World()
    read = request().replace(b"/mcp?session=1 ", b"/mcp?session=1?x=2 ")
    run(w, read)
    assert fake(w.upstream).out.startswith(b"POST /mcp?session=1?x=2 ")
    assert [r["path"] for r in w.audit()] == ["/mcp"]


@in_loop
def test_credless_answers_a_json_request_it_failed_as_json_rpc():
    # the server closed without answering: the 502 credless gives in its place keeps the
    # shape of what was asked, a JSON-RPC error for a JSON POST (docs/errors.md)
    w = World()
    w.client.data_received(request(b"Content-Type: application/json"))
    w.upstream.connection_lost(None)
    head, answer = fake(w.client).out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 502 ")
    rpc = json.loads(answer)
    assert rpc["jsonrpc"] == "2.0" and rpc["id"] is None and "error" in rpc
    assert not w.client.closed


@in_loop
def test_the_time_credless_adds_is_a_duration_within_the_requests_own():
    w = World()
    before = time.perf_counter()
    w.client.data_received(request())
    took = time.perf_counter() - before
    [hist] = w.proxy.rec.m_added.collect()
    [added] = [s.value for s in hist.samples if s.name.endswith("_sum")]
    assert 0 <= added <= took


def unattested(w: World) -> FastLane:
    """The lane of a connection whose process has no identity."""
    fragment = w.proxy.rec.fragment(server=UP.name, pid=INFO.tgid, spiffe_id=None)
    served = Served(w.client, INFO, UP, None, 0, {"spiffe_id": None}, fragment)
    return FastLane(w.proxy, served)


@in_loop
def test_an_unattested_process_is_left_to_the_full_path_or_passed_through_as_configured():
    # unattested = "deny": the full path refuses it (403); "passthrough": it goes as read,
    # with no credential (agent/inject/decide.py, settings.unattested)
    w = World()
    read = request()
    assert unattested(w).offer(read) is False
    assert fake(w.upstream).out == b""
    w.proxy.cfg = dataclasses.replace(w.proxy.cfg, unattested="passthrough")
    anon = connection()  # the pool's connections are per identity: none here
    w.proxy.pool.put((None, UP.host, UP.port, UP.scheme), anon, since=w.now)
    assert unattested(w).offer(read) is True
    assert fake(anon).out == read and fake(w.upstream).out == b""
