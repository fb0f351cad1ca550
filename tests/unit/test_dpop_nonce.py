"""A resource server's DPoP nonces (RFC 9449 §9) through the proxy without sockets: the
fast lane (agent/inject/lane.py) and the full path (agent/inject/exchange.py) send a request
refused with `use_dpop_nonce` once more, with a proof carrying the nonce, and never twice;
later proofs carry the newest nonce a server gave; a 401 naming a scheme credless did not
use is answered with a diagnosis, not relayed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import jwt

from agent.inject.bodies import Replay
from agent.inject.flows import UpstreamSide
from agent.inject.http1 import Head
from agent.inject.record import AuditBase
from agent.oauth.dpop import DPoPKey
from tests.unit.test_fast_path import BODY, RESPONSE, TOKEN, World, in_loop, request, run
from tests.unit.transport import Transport

DPOP = dataclasses.replace(TOKEN, token_type="DPoP", jkt="jkt-1")


def nonce_401(nonce: bytes, close: bool = False) -> bytes:
    body = b'{"error":"use_dpop_nonce"}'
    return (
        b"HTTP/1.1 401 Unauthorized\r\n"
        b'WWW-Authenticate: DPoP algs="ES256", error="use_dpop_nonce"\r\n'
        b"DPoP-Nonce: %s\r\n%sContent-Length: %d\r\n\r\n%s"
        % (nonce, b"Connection: close\r\n" if close else b"", len(body), body)
    )


def ok_with_nonce(nonce: bytes) -> bytes:
    return RESPONSE.replace(b"200 OK\r\n", b"200 OK\r\nDPoP-Nonce: %s\r\n" % nonce)


def proofs(sent: bytes) -> list[dict]:
    """The claims of each DPoP proof in what went upstream."""
    out = []
    for line in sent.split(b"\r\n"):
        if line.startswith(b"DPoP: "):
            out.append(jwt.decode(line[6:], options={"verify_signature": False}))
    return out


def dpop_world(**kw) -> tuple[World, DPoPKey]:
    w = World(token=DPOP, **kw)
    key = DPoPKey()
    w.oauth.key = key
    return w, key


def events(w: World) -> list[str]:
    return [r["event"] for r in w.audit()]


@in_loop
def test_the_lane_sends_a_request_again_once_with_the_nonce_asked_for():
    w, key = dpop_world()
    run(w, request(), answer=nonce_401(b"n-1"))
    first, second = proofs(w.upstream.transport.out)
    assert "nonce" not in first and second["nonce"] == "n-1"
    assert second["jti"] != first["jti"] and second["htu"] == first["htu"]
    assert w.upstream.transport.out.count(BODY) == 2  # the same request, both times
    assert w.client.transport.out == b""  # the workload has seen nothing yet
    assert w.client.fast_inflight
    w.upstream.data_received(RESPONSE)
    assert w.client.transport.out == RESPONSE and not w.client.fast_inflight
    assert events(w) == ["request.retried", "request.injected"]
    retried = w.audit()[0]
    assert retried["status"] == 401 and "use_dpop_nonce" in retried["reason"]
    # the nonce is kept for the server's later proofs
    w.upstream.transport.out = b""
    run(w, request())
    assert [p["nonce"] for p in proofs(w.upstream.transport.out)] == ["n-1"]
    assert key.nonce_for("http://127.0.0.1:8080") == "n-1"


@in_loop
def test_a_second_demand_is_not_retried_again_but_answered_with_the_reason():
    w, _ = dpop_world()
    run(w, request(), answer=nonce_401(b"n-1"))
    w.upstream.data_received(nonce_401(b"n-2"))
    assert len(proofs(w.upstream.transport.out)) == 2  # no third attempt
    head, body = w.client.transport.out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 502") and b"use_dpop_nonce" not in head
    assert "once only" in json.loads(body)["detail"]
    assert events(w) == ["request.retried", "request.failed"]
    assert not w.client.fast_inflight and not w.client.closed


@in_loop
def test_a_nonce_in_a_successful_answer_goes_in_the_next_proof():
    w, _ = dpop_world()
    run(w, request(), answer=ok_with_nonce(b"fresh-1"))
    assert w.client.transport.out == ok_with_nonce(b"fresh-1")  # relayed as it came
    w.upstream.transport.out = b""
    run(w, request(), answer=ok_with_nonce(b"fresh-2"))
    w.upstream.transport.out = b""
    run(w, request())
    assert [p["nonce"] for p in proofs(w.upstream.transport.out)] == ["fresh-2"]


def test_when_the_server_closes_the_lane_connects_again():
    async def body():
        w, _ = dpop_world()
        fresh = UpstreamSide()
        fresh.connection_made(Transport())

        async def connect(up):
            return fresh

        w.proxy.exchanges.connect = connect  # type: ignore[method-assign]
        run(w, request(), answer=nonce_401(b"n-1", close=True))
        assert w.upstream.transport.closed and w.client.fast_inflight
        for _ in range(100):
            if fresh.transport.out:
                break
            await asyncio.sleep(0)
        assert [p.get("nonce") for p in proofs(fresh.transport.out)] == ["n-1"]
        fresh.data_received(RESPONSE)
        assert w.client.transport.out == RESPONSE and not w.client.fast_inflight
        assert events(w) == ["request.retried", "request.injected"]

    asyncio.run(body())


@in_loop
def test_a_bearer_token_refused_for_dpop_is_diagnosed_and_dropped_not_relayed():
    w = World()  # a Bearer token
    answer = (
        b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: DPoP algs="ES256", '
        b'error="invalid_token"\r\nContent-Length: 2\r\n\r\n{}'
    )
    run(w, request(), answer=answer)
    head, body = w.client.transport.out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 502")
    assert 'dpop = "always"' in json.loads(body)["detail"]
    assert w.oauth.invalidated == [TOKEN]
    [failed] = w.audit()
    assert failed["event"] == "request.failed" and failed["status"] == 401
    assert "credless sent a Bearer token" in failed["reason"]
    assert len(w.upstream.transport.out.split(b"\r\n\r\n")) == 2  # sent once


# ---------------------------------------------------------------- the full path


def test_the_full_path_sends_a_decided_body_again_with_the_nonce():
    async def body():
        w, _ = dpop_world()
        w.client.fast = None
        keep = await _run_full(w, BODY, [nonce_401(b"n-1"), RESPONSE])
        assert keep is True
        first, second = proofs(w.upstream.transport.out)
        assert "nonce" not in first and second["nonce"] == "n-1"
        assert w.upstream.transport.out.count(BODY) == 2
        assert w.client.transport.out == RESPONSE
        assert events(w) == ["request.retried", "request.injected"]

    asyncio.run(body())


def test_a_streamed_body_longer_than_kept_gets_the_401_and_the_next_request_the_nonce():
    async def body():
        w, key = dpop_world()
        w.proxy.exchanges.retry_body_limit = len(BODY) - 1
        await _run_full(w, BODY, [nonce_401(b"n-1")])
        assert len(proofs(w.upstream.transport.out)) == 1  # not sent again
        assert w.client.transport.out.startswith(b"HTTP/1.1 401")
        assert b"use_dpop_nonce" in w.client.transport.out
        assert key.nonce_for("http://127.0.0.1:8080") == "n-1"  # for the next request
        assert events(w) == ["request.injected"]

    asyncio.run(body())


async def _run_full(w: World, body: bytes, answers: list[bytes]) -> bool:
    key = w.oauth.key
    assert isinstance(key, DPoPKey)
    url = "http://127.0.0.1:8080/mcp"
    head = Head(
        method=b"POST",
        target=b"/mcp",
        headers=[
            (b"Host", b"127.0.0.1:8080"),
            (b"Content-Length", b"%d" % len(body)),
            (b"Authorization", b"DPoP " + DPOP.access_token.encode()),
            (b"DPoP", key.proof("POST", url, access_token=DPOP.access_token).encode()),
        ],
    )
    base = AuditBase({"method": "POST", "path": "/mcp"}, w.served.fragment)
    task = asyncio.ensure_future(
        w.proxy.exchanges.run(head, Replay(body), w.served, DPOP, base, time.perf_counter())
    )
    up = w.upstream
    for i, answer in enumerate(answers):
        while up.transport.out.count(body) <= i and not task.done():
            await asyncio.sleep(0)
        up.data_received(answer)
    return await task
