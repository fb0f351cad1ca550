"""One request's exchange with its MCP server (agent/inject/exchange.py Exchanges.run and
finished), found by mutation testing: the body as the workload streams it (framed as its head
says, sent in steps, kept for a DPoP retry up to the limit), each piece checked to come from
the caller its head was decided for (a piece another process wrote closes both connections,
the upstream one unfinished, and is audited), a server that cannot be reached, and an answer
the server cut short, which must never reach the workload looking whole; and how a 401 to
credless's credential is read (agent/inject/challenges.py, which the exchange asks).

Sans-IO: Exchanges.run on the proxy of tests/unit/test_fast_path.py's World (its upstream
connection a stand-in transport in the pool), the body handed out by a script. What a test
reads is what the server's stand-in received, what the workload got, the audit and the
request counter."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import time
import types
from collections import deque
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import pytest
import structlog

from agent.inject import answers
from agent.inject import exchange as exchange_module
from agent.inject.answered import EventStream
from agent.inject.decide import Caller
from agent.inject.exchange import READ_SIZE, answered, reply_now
from agent.inject.flows import HOLD_MAX, ClientSide, UpstreamSide
from agent.inject.http1 import BODY, END, Event, Head
from agent.inject.record import AuditBase
from agent.inject.served import Served
from agent.oauth.dpop import DPoPKey
from agent.observe import logging as obs
from agent.policy.jsonrpc import Call
from tests.helpers import run_async as run
from tests.unit.test_dpop_nonce import DPOP, nonce_401, proofs
from tests.unit.test_fast_path import RESPONSE, SID, TOKEN, UP, World
from tests.unit.test_full_path_forwarding import _until
from tests.unit.transport import Transport

PIECE = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}'


class Script:
    """The workload's side of the request's body, as the exchange reads it: each event in
    turn, then None (the workload closed its connection). before(i), if given, runs before the
    i-th event is handed out; `upstream_had` records how many bytes had gone upstream at
    each ask."""

    def __init__(self, w: World, *events: Event, before: Callable[[int], None] | None = None):
        self.w, self.events, self.before = w, deque(events), before
        self.asked = 0
        self.upstream_had: list[int] = []

    async def next(self) -> Event | None:
        self.upstream_had.append(len(self.w.upstream.transport.out))
        if self.before is not None:
            self.before(self.asked)
        self.asked += 1
        return self.events.popleft() if self.events else None


def body(*pieces: bytes) -> tuple[Event, ...]:
    return (*((BODY, p) for p in pieces), (END, None))


def post(length: int | None, *fields: tuple[bytes, bytes], keep_alive: bool = True) -> Head:
    """The workload's request head as the proxy forwards it (Content-Length, or chunked)."""
    headers = [(b"Host", b"127.0.0.1:8080")]
    if length is None:
        headers.append((b"Transfer-Encoding", b"chunked"))
    else:
        headers.append((b"Content-Length", b"%d" % length))
    headers += list(fields)
    return Head(
        method=b"POST",
        target=b"/mcp?session=1",
        headers=headers,
        chunked=length is None,
        keep_alive=keep_alive,
    )


def base(w: World) -> AuditBase:
    return AuditBase({"method": "POST", "path": "/mcp"}, w.served.fragment)


def events(w: World, name: str | None = None) -> list[dict]:
    return [e for e in w.audit() if name is None or e["event"] == name]


def count(w: World, outcome: str) -> float:
    return (
        w.registry.get_sample_value(
            "credless_injected_requests_total",
            {"server": UP.name, "mode": "broker", "outcome": outcome},
        )
        or 0.0
    )


@pytest.fixture
def logged() -> Iterator[list[MutableMapping[str, Any]]]:
    """The diagnostic events logged during the test, debug ones too (structlog's capture;
    configured first, so that the loggers are built again inside it)."""
    obs.configure(level="debug", fmt="json", stream=io.StringIO())
    with structlog.testing.capture_logs() as captured:
        yield captured


def said(logged: list[MutableMapping[str, Any]], level: str, component: str) -> list:
    return [e for e in logged if e["log_level"] == level and e.get("component") == component]


async def exchange(
    w: World,
    head: Head,
    src: Any,
    answers: tuple[bytes, ...] = (RESPONSE,),
    token: Any = TOKEN,
) -> bool:
    """Exchanges.run; the server's stand-in answers each request once it has it whole (as
    many as `answers`). Returns run's answer: whether the workload's connection stays open."""
    task = asyncio.ensure_future(
        w.proxy.exchanges.run(head, src, w.served, token, base(w), time.perf_counter())
    )
    up = w.upstream
    for i, answer in enumerate(answers):
        await _until(lambda i=i: task.done() or up.transport.out.count(b"HTTP/1.1\r\n") > i)
        if task.done():
            break
        await _until(lambda: task.done() or (up._done is not None and up.sent_at > 0))
        if task.done():
            break
        up.data_received(answer)
    return await asyncio.wait_for(task, 5)


async def sent(
    w: World,
    head: Head | None = None,
    token: Any = TOKEN,
    audit: AuditBase | None = None,
    started: float = 0.0,
) -> asyncio.Future:
    """Exchanges.run on a request whose body is PIECE (head: POST's by default), once its
    head has gone to the server's stand-in; the running exchange."""
    task = asyncio.ensure_future(
        w.proxy.exchanges.run(
            head or post(len(PIECE)),
            Script(w, *body(PIECE)),
            w.served,
            token,
            audit or base(w),
            started,
        )
    )
    await _until(lambda: w.upstream.sent_at > 0)
    return task


# ------------------------------------------------------------------ the body, as sent


@run
async def test_a_body_in_pieces_reaches_the_server_whole_after_the_head():
    w = World()
    pieces = (PIECE[:10], PIECE[10:30], PIECE[30:])
    keep = await exchange(w, post(len(PIECE)), Script(w, *body(*pieces)))
    sent = w.upstream.transport.out
    head, sent_body = sent.split(b"\r\n\r\n", 1)
    assert sent_body == PIECE
    assert head.startswith(b"POST /mcp?session=1 HTTP/1.1\r\n")
    assert b"Authorization: Bearer header.payload.sig" not in sent  # run adds no credential
    assert w.client.transport.out == RESPONSE and keep is True
    [done] = events(w)
    assert done["event"] == "request.injected" and done["status"] == 200
    assert count(w, "injected") == 1


@run
async def test_a_chunked_body_is_sent_as_chunks_and_ended():
    w = World()
    await exchange(w, post(None), Script(w, *body(b"abc", b"defgh")))
    sent_body = w.upstream.transport.out.split(b"\r\n\r\n", 1)[1]
    assert sent_body == b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n"


@run
async def test_a_long_body_goes_out_in_steps_as_it_arrives():
    """Once 64 KiB are at hand they go to the server before the next piece is read: a
    request body is streamed, never held whole."""
    w = World()
    head = post(3 * READ_SIZE)
    start = len(head.request_bytes())
    first = b"a" * (READ_SIZE - start)  # with the head: exactly READ_SIZE
    pieces = (first, b"b" * READ_SIZE, b"c" * (READ_SIZE + start))
    src = Script(w, *body(*pieces))
    await exchange(w, head, src)
    # before the 2nd piece: the head and the first piece had gone out; so on
    assert src.upstream_had == [0, READ_SIZE, 2 * READ_SIZE, 3 * READ_SIZE + start]
    assert w.upstream.transport.out.split(b"\r\n\r\n", 1)[1] == b"".join(pieces)


@pytest.mark.parametrize("at", ["a piece", "the end"])
@run
async def test_after_a_whole_answer_the_rest_of_the_body_never_goes_to_the_server(at):
    """The server answered whole while the body was still coming: it may read what follows
    as its next request, which credless never decided. The rest is read from the workload
    (its connection stays in step: run says it stays open) and dropped, the part gathered
    but not sent too; the connection to the server is closed, never pooled."""
    w = World()
    first = b"a" * READ_SIZE  # with the head: sent at once
    if at == "a piece":  # a whole READ_SIZE more goes up, then the answer, then a piece
        pieces = (first, b"b" * READ_SIZE, b"GET /smuggled HTTP/1.1\r\n\r\n")
        went_up = first + pieces[1]
    else:  # a short piece is gathered, then the answer, then the end
        pieces = (first, b"b" * 10)
        went_up = first
    head = post(sum(map(len, pieces)))

    def answer_before_the_third(i: int) -> None:
        if i == 2:
            w.upstream.data_received(RESPONSE)

    src = Script(w, *body(*pieces), before=answer_before_the_third)
    assert await exchange(w, head, src, answers=()) is True
    assert src.asked == len(pieces) + 1  # every piece and the end read from the workload
    assert w.upstream.transport.out == head.request_bytes() + went_up
    assert w.upstream.transport.closed and w.proxy.pool.get(w.key) is None
    assert w.client.transport.out.endswith(RESPONSE.split(b"\r\n\r\n", 1)[1])
    assert count(w, "injected") == 1


@run
async def test_a_workload_that_closes_inside_its_body_leaves_the_server_an_unfinished_request():
    w = World()
    src = Script(w, (BODY, PIECE[:10]))  # then None: the workload's connection closed
    with pytest.raises(ConnectionError):
        await exchange(w, post(len(PIECE)), src)
    assert w.upstream.transport.closed  # aborted: the server never sees the request end
    assert PIECE[:10] not in w.upstream.transport.out
    assert w.proxy.pool.get(w.key) is None and w.client.transport.out == b""


@run
async def test_a_workload_leaving_after_its_credentialed_head_went_up_is_on_the_record():
    """The head (with credless's credential) and 64 KiB of body had gone to the server when
    the workload closed its connection: before, no event said a credentialed request had
    reached the server."""
    w = World()
    big = b"x" * READ_SIZE
    src = Script(w, (BODY, big))  # then None: the workload's connection closed
    with pytest.raises(ConnectionError):
        await exchange(w, post(3 * READ_SIZE), src)
    assert w.upstream.transport.out.startswith(post(3 * READ_SIZE).request_bytes())
    assert w.upstream.transport.closed
    [aborted] = events(w)
    assert aborted["event"] == "request.aborted" and aborted["spiffe_id"] == SID
    assert aborted["token_sha256"] == TOKEN.fingerprint
    assert "inside the request's body" in aborted["reason"]
    assert count(w, "workload_closed") == 1


@run
async def test_a_workload_leaving_before_anything_went_up_leaves_no_event():
    w = World()
    with pytest.raises(ConnectionError):
        await exchange(w, post(len(PIECE)), Script(w, (BODY, PIECE[:10])))
    assert w.upstream.transport.out == b"" and events(w) == []


@run
async def test_the_host_is_the_servers_when_it_is_reached_at_another_address():
    up = dataclasses.replace(UP, send_host=b"mcp.internal:8443")
    w = World()
    w.served.up = up
    await exchange(w, post(len(PIECE)), Script(w, *body(PIECE)))
    head = w.upstream.transport.out.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    hosts = [line for line in head if line.lower().startswith(b"host:")]
    assert hosts == [b"Host: mcp.internal:8443"]


@run
async def test_the_host_is_left_as_the_workload_sent_it_otherwise():
    w = World()
    await exchange(w, post(len(PIECE)), Script(w, *body(PIECE)))
    head = w.upstream.transport.out.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert [line for line in head if line.lower().startswith(b"host:")] == [b"Host: 127.0.0.1:8080"]


# ------------------------------------------------------------------ who sends each piece


def caller_turns(w: World, at: int, changed: str = "") -> None:
    """The exchange's caller check: the connection's process stays the one served until the
    at-th event of the body is asked for; from then on another has written (changed: why)
    or, changed empty, the process exec'd."""
    state = {"current": True}
    seen: list[Served] = []

    def caller(served: Served) -> Caller:
        seen.append(served)
        assert served is w.served
        return Caller(state["current"], served.caller.spiffe_id, changed=changed)

    def before(i: int) -> None:
        if i == at:
            state["current"] = False

    w.proxy.exchanges.caller = caller  # type: ignore[assignment]
    w.before, w.seen = before, seen  # type: ignore[attr-defined]


@pytest.mark.parametrize("at", [0, 1, 2])
@run
async def test_a_body_piece_another_process_wrote_closes_both_connections_unsent(at):
    w = World()
    other = "pid 4242 wrote on this connection, which pid 100 made; connection closed"
    caller_turns(w, at, changed=other)
    big = b"x" * READ_SIZE  # each piece goes out at once: the check must come first
    src = Script(w, *body(big, big, big), before=w.before)  # type: ignore[attr-defined]
    with pytest.raises(ConnectionError, match="pid 4242 wrote"):
        await exchange(w, post(3 * READ_SIZE), src)
    # what went upstream: the pieces before the one another process wrote, nothing after
    head = post(3 * READ_SIZE).request_bytes()
    assert w.upstream.transport.out == (head + big * at if at else b"")
    assert w.upstream.transport.closed  # the server's request is never finished
    assert w.proxy.pool.get(w.key) is None
    assert w.client.transport.out == b""  # Proxy.handle closes the workload's connection
    [denied] = events(w)
    assert denied["event"] == "request.denied" and denied["reason"] == other
    assert denied["method"] == "POST" and denied["spiffe_id"] == SID
    assert count(w, "identity_changed") == 1 and count(w, "injected") == 0


@run
async def test_a_body_piece_after_the_process_execd_is_refused_as_an_image_change():
    w = World()
    caller_turns(w, 1)
    src = Script(w, *body(PIECE[:5], PIECE[5:]), before=w.before)  # type: ignore[attr-defined]
    with pytest.raises(ConnectionError, match="exec'd or exited"):
        await exchange(w, post(len(PIECE)), src)
    assert PIECE[5:] not in w.upstream.transport.out and w.upstream.transport.closed
    [denied] = events(w, "request.denied")
    assert "exec'd or exited" in denied["reason"]
    assert count(w, "image_changed") == 1


@run
async def test_each_body_piece_is_checked_and_the_sender_that_connected_is_served():
    w = World()
    caller_turns(w, 99)  # never changes
    pieces = (PIECE[:5], PIECE[5:9], PIECE[9:])
    await exchange(w, post(len(PIECE)), Script(w, *body(*pieces)))
    assert len(w.seen) == len(pieces)  # type: ignore[attr-defined]
    assert w.upstream.transport.out.endswith(PIECE) and w.client.transport.out == RESPONSE


@run
async def test_without_a_caller_check_the_body_streams_unchecked():
    w = World()
    w.proxy.exchanges.caller = None
    await exchange(w, post(len(PIECE)), Script(w, *body(PIECE)))
    assert w.upstream.transport.out.endswith(PIECE) and w.client.transport.out == RESPONSE


# ------------------------------------------------------------------ a server out of reach


@pytest.mark.parametrize(
    "error,said",
    [
        (ConnectionRefusedError(111, "Connection refused"), "Connection refused"),
        (TimeoutError(), "no connection within 5 s"),
    ],
    ids=["refused", "timeout"],
)
@pytest.mark.parametrize("keep_alive", [True, False])
@run
async def test_an_unreachable_server_is_answered_502_after_the_body_is_read(
    error, said, keep_alive
):
    w = World(pooled=False)
    w.proxy.exchanges.cfg = dataclasses.replace(
        w.proxy.exchanges.cfg, upstream_connect_timeout_seconds=5.0
    )
    asked: list[Any] = []

    async def connect(up):
        asked.append(up)
        raise error

    w.proxy.exchanges.connect = connect  # type: ignore[method-assign]
    src = Script(w, *body(PIECE[:5], PIECE[5:]))
    keep = await exchange(w, post(len(PIECE), keep_alive=keep_alive), src)
    assert asked == [UP]
    assert keep is keep_alive  # the request was read whole: the next may follow
    assert src.asked == 3  # both pieces and the end, drained
    answer = w.client.transport.out
    head, shaped = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    answered = json.loads(shaped)
    assert answered["error"] == "credless: the MCP server is unreachable"
    assert said in answered["detail"]
    [failed] = events(w)
    assert failed["event"] == "request.failed"
    assert failed["reason"] == f"upstream unreachable: {answered['detail']}"
    assert failed["event_id"] == answered["event_id"] and failed["method"] == "POST"
    assert count(w, "upstream_unreachable") == 1


@run
async def test_a_fresh_connection_is_made_when_none_is_pooled():
    w = World(pooled=False)
    made: list[Any] = []

    async def connect(up):
        made.append(up)
        return w.upstream

    w.proxy.exchanges.connect = connect  # type: ignore[method-assign]
    await exchange(w, post(len(PIECE)), Script(w, *body(PIECE)))
    assert made == [UP] and w.upstream.transport.out.endswith(PIECE)
    assert w.proxy.pool.get(w.key) is w.upstream  # back in the pool after its answer


@run
async def test_a_pooled_connection_is_used_without_connecting():
    w = World()

    async def connect(up):
        raise AssertionError("a pooled connection was at hand")

    w.proxy.exchanges.connect = connect  # type: ignore[method-assign]
    await exchange(w, post(len(PIECE)), Script(w, *body(PIECE)))
    assert w.upstream.transport.out.endswith(PIECE)


# ------------------------------------------------------------------ answers cut short


CUT = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b'{"jsonrpc":"2.0","id":1,'


@run
async def test_an_answer_the_server_cut_short_closes_the_workloads_connection():
    w = World()
    task = await sent(w)
    await _until(lambda: w.upstream.transport.out.endswith(PIECE))
    w.upstream.data_received(CUT)
    w.upstream.connection_lost(None)
    keep = await asyncio.wait_for(task, 5)
    assert keep is False  # closing is how the workload learns the answer is partial
    assert w.client.transport.out.startswith(CUT[:40])
    assert len(w.client.transport.out.split(b"\r\n\r\n", 1)[1]) < 100
    assert events(w, "request.injected") == []  # not recorded as answered
    [failed] = events(w)  # but on the record: the request reached the server
    assert failed["event"] == "request.failed" and failed["status"] == 200
    assert failed["reason"] == (
        "the MCP server closed its connection before its answer ended; the workload's "
        "connection was closed too, so that the answer reads as cut short"
    )
    assert failed["token_sha256"] == TOKEN.fingerprint and failed["latency_ms"] >= 0
    assert count(w, "upstream_closed") == 1 and count(w, "injected") == 0
    assert w.proxy.pool.get(w.key) is None


@run
async def test_a_server_that_closes_before_answering_gets_the_workload_a_502():
    w = World()
    task = await sent(w)
    await _until(lambda: w.upstream.transport.out.endswith(PIECE))
    w.upstream.connection_lost(None)
    keep = await asyncio.wait_for(task, 5)
    assert keep is True
    head, shaped = w.client.transport.out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    answered = json.loads(shaped)
    assert answered["error"] == "credless: the MCP server closed the connection without answering"
    [failed] = events(w)
    assert failed["event"] == "request.failed" and failed["event_id"] == answered["event_id"]
    assert failed["reason"] == "the MCP server closed the connection without answering"
    assert count(w, "upstream_closed") == 1


# ------------------------------------------------------------------ DPoP retries' bodies


def dpop_world(limit: int | None = None) -> World:
    w = World(token=DPOP)
    w.oauth.key = DPoPKey()
    if limit is not None:
        w.proxy.exchanges.retry_body_limit = limit
    return w


def dpop_head(w: World, length: int | None) -> Head:
    head = post(length)
    key = w.oauth.key
    assert isinstance(key, DPoPKey)
    head.add(b"Authorization", b"DPoP " + DPOP.access_token.encode())
    head.add(
        b"DPoP",
        key.proof("POST", "http://127.0.0.1:8080/mcp", access_token=DPOP.access_token).encode(),
    )
    return head


def requests_sent(w: World) -> list[bytes]:
    """Each request that went upstream, head and body."""
    out = w.upstream.transport.out
    starts = [i for i in range(len(out)) if out.startswith(b"POST /mcp", i)]
    return [out[a:b] for a, b in zip(starts, [*starts[1:], len(out)], strict=True)]


@run
async def test_a_body_exactly_at_the_retry_limit_is_kept_and_sent_again():
    w = dpop_world(limit=len(PIECE))
    keep = await exchange(
        w,
        dpop_head(w, len(PIECE)),
        Script(w, *body(PIECE[:7], PIECE[7:])),
        answers=(nonce_401(b"n-1"), RESPONSE),
        token=DPOP,
    )
    first, second = requests_sent(w)
    assert first.endswith(PIECE) and second.endswith(PIECE)
    assert [p.get("nonce") for p in proofs(w.upstream.transport.out)] == [None, "n-1"]
    assert w.client.transport.out == RESPONSE and keep is True
    assert [e["event"] for e in events(w)] == ["request.retried", "request.injected"]


@run
async def test_a_body_one_over_the_retry_limit_is_not_sent_again(logged):
    """Its 401 goes to the workload; a warning names the server and the limit, and the
    nonce is remembered all the same: the next request carries it."""
    w = dpop_world(limit=len(PIECE) - 1)
    await exchange(
        w,
        dpop_head(w, len(PIECE)),
        Script(w, *body(PIECE[:7], PIECE[7:])),
        answers=(nonce_401(b"n-1"),),
        token=DPOP,
    )
    assert len(requests_sent(w)) == 1
    assert w.client.transport.out.startswith(b"HTTP/1.1 401")
    [warned] = said(logged, "warning", "inject.challenges")
    assert "asked for a DPoP nonce" in warned["event"]
    assert warned["server"] == UP.name and warned["limit"] == len(PIECE) - 1
    assert w.oauth.key.nonce_for("http://127.0.0.1:8080") == "n-1"  # type: ignore[union-attr]


@run
async def test_a_chunked_body_is_sent_again_framed_and_ended_as_before():
    w = dpop_world()
    await exchange(
        w,
        dpop_head(w, None),
        Script(w, *body(b"abc", b"defgh")),
        answers=(nonce_401(b"n-1"), RESPONSE),
        token=DPOP,
    )
    first, second = requests_sent(w)
    framed = b"\r\n\r\n3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n"
    assert first.endswith(framed) and second.endswith(framed)
    assert w.client.transport.out == RESPONSE


@run
async def test_a_bearer_tokens_body_is_not_kept_and_its_401_relayed():
    """Only a DPoP token's 401 can ask for a nonce: a Bearer request is never sent twice."""
    w = World()
    answer = nonce_401(b"n-1")
    await exchange(w, post(len(PIECE)), Script(w, *body(PIECE)), answers=(answer,))
    assert len(requests_sent(w)) == 1


@run
async def test_a_request_without_credless_credential_has_its_401_relayed_as_is():
    w = World(token=None)
    answer = nonce_401(b"n-1")
    keep = await exchange(
        w, post(len(PIECE)), Script(w, *body(PIECE)), answers=(answer,), token=None
    )
    assert len(requests_sent(w)) == 1
    assert w.client.transport.out.startswith(b"HTTP/1.1 401") and keep is True
    [done] = events(w)
    assert done["event"] == "request.forwarded" and done["status"] == 401
    assert count(w, "forwarded") == 1


@run
async def test_a_retry_whose_connection_closed_goes_on_a_fresh_one():
    w = dpop_world()
    fresh_transport = Transport()
    fresh = UpstreamSide()
    fresh.connection_made(fresh_transport)
    made: list[Any] = []

    async def connect(up):
        made.append(up)
        return fresh

    w.proxy.exchanges.connect = connect  # type: ignore[method-assign]
    task = await sent(w, dpop_head(w, len(PIECE)), DPOP)
    await _until(lambda: w.upstream.transport.out.endswith(PIECE))
    w.upstream.data_received(nonce_401(b"n-1", close=True))
    await _until(lambda: fresh_transport.out.endswith(PIECE) and fresh.sent_at > 0)
    fresh.data_received(RESPONSE)
    keep = await asyncio.wait_for(task, 5)
    assert made == [UP] and w.upstream.transport.closed
    assert [p.get("nonce") for p in proofs(fresh_transport.out)] == ["n-1"]
    assert w.client.transport.out == RESPONSE and keep is True
    assert w.proxy.pool.get(w.key) is fresh


@run
async def test_a_retry_whose_server_cannot_be_reached_again_is_answered_502():
    w = dpop_world()

    async def connect(up):
        raise ConnectionRefusedError(111, "Connection refused")

    w.proxy.exchanges.connect = connect  # type: ignore[method-assign]
    task = await sent(w, dpop_head(w, len(PIECE)), DPOP)
    await _until(lambda: w.upstream.transport.out.endswith(PIECE))
    w.upstream.data_received(nonce_401(b"n-1", close=True))
    keep = await asyncio.wait_for(task, 5)
    assert keep is True
    assert w.client.transport.out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert [e["event"] for e in events(w)] == ["request.retried", "request.failed"]
    assert count(w, "upstream_unreachable") == 1
    detail = json.loads(w.client.transport.out.split(b"\r\n\r\n", 1)[1])["detail"]
    assert "Connection refused" in detail
    assert events(w, "request.failed")[0]["reason"] == f"upstream unreachable: {detail}"


@run
async def test_a_retry_whose_connection_closed_takes_an_idle_pooled_one_first():
    w = dpop_world()
    idle = UpstreamSide()
    idle.connection_made(Transport())

    async def connect(up):
        raise AssertionError("an idle connection was at hand")

    w.proxy.exchanges.connect = connect  # type: ignore[method-assign]
    task = await sent(w, dpop_head(w, len(PIECE)), DPOP)
    await _until(lambda: w.upstream.transport.out.endswith(PIECE))
    w.proxy.pool.put(w.key, idle)  # another request's connection, back in the pool
    w.upstream.data_received(nonce_401(b"n-1", close=True))
    await _until(lambda: idle.transport.out.endswith(PIECE) and idle.sent_at > 0)
    idle.data_received(RESPONSE)
    assert await asyncio.wait_for(task, 5) is True
    assert [p.get("nonce") for p in proofs(idle.transport.out)] == ["n-1"]
    assert w.client.transport.out == RESPONSE


@run
async def test_a_request_without_a_body_is_sent_again_without_one():
    w = dpop_world()
    await exchange(
        w,
        dpop_head(w, 0),
        Script(w, (END, None)),
        answers=(nonce_401(b"n-1"), RESPONSE),
        token=DPOP,
    )
    first, second = requests_sent(w)
    assert first.endswith(b"\r\n\r\n") and second.endswith(b"\r\n\r\n")  # nothing after
    assert w.client.transport.out == RESPONSE


# ------------------------------------------------------------------ the retry's proof


def recording_keys(w: World) -> list[str]:
    """The DPoP key is asked for by identity: each identity asked, in order."""
    asked: list[str] = []
    key = w.oauth.key

    def dpop_key(spiffe_id: str):
        asked.append(spiffe_id)
        return key

    w.oauth.dpop_key = dpop_key  # type: ignore[method-assign]
    return asked


@run
async def test_the_retrys_proof_is_the_tokens_for_the_path_without_its_query():
    w = dpop_world()
    asked = recording_keys(w)
    head = dpop_head(w, len(PIECE))
    head.target = b"/mcp?a=1?b=2"
    await exchange(
        w, head, Script(w, *body(PIECE)), answers=(nonce_401(b"n-1"), RESPONSE), token=DPOP
    )
    first, second = proofs(w.upstream.transport.out)
    assert second["htu"] == "http://127.0.0.1:8080/mcp" and second["htm"] == "POST"
    assert second["nonce"] == "n-1"
    assert second["ath"] == first["ath"]  # bound to the same access token
    assert asked and set(asked) == {DPOP.spiffe_id}  # the identity's own key, each time
    assert w.client.transport.out == RESPONSE


@run
async def test_a_second_nonce_demand_after_the_retry_is_answered_502_not_relayed():
    w = dpop_world()
    keep = await exchange(
        w,
        dpop_head(w, len(PIECE)),
        Script(w, *body(PIECE)),
        answers=(nonce_401(b"n-1"), nonce_401(b"n-2")),
        token=DPOP,
    )
    assert len(requests_sent(w)) == 2  # no third attempt
    head, shaped = w.client.transport.out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"use_dpop_nonce" not in head  # the server's 401 never reaches the workload
    detail = json.loads(shaped)["detail"]
    assert "once only" in detail
    assert detail.startswith(f"the MCP server {UP.name} asked again for a DPoP nonce")
    assert keep is True
    assert [e["event"] for e in events(w)] == ["request.retried", "request.failed"]
    assert count(w, "credential_refused") == 1


@pytest.mark.parametrize("nonce", [b"not a nonce", b"x" * 5000], ids=["space", "too-long"])
@run
async def test_a_nonce_demand_with_an_invalid_nonce_is_not_retried(nonce):
    w = dpop_world()
    keep = await exchange(
        w,
        dpop_head(w, len(PIECE)),
        Script(w, *body(PIECE)),
        answers=(nonce_401(nonce),),
        token=DPOP,
    )
    assert len(requests_sent(w)) == 1
    assert w.client.transport.out.startswith(b"HTTP/1.1 401")  # the server's answer, relayed
    assert keep is True
    assert w.oauth.key.nonce_for("http://127.0.0.1:8080") is None  # type: ignore[union-attr]
    assert [e["event"] for e in events(w)] == ["request.injected"]


@run
async def test_a_nonce_with_blanks_around_it_is_remembered_without_them():
    w = dpop_world()
    await exchange(
        w,
        dpop_head(w, len(PIECE)),
        Script(w, *body(PIECE)),
        answers=(nonce_401(b"  n-1\t"), RESPONSE),
        token=DPOP,
    )
    assert [p.get("nonce") for p in proofs(w.upstream.transport.out)] == [None, "n-1"]


# ------------------------------------------------------------------ 401s to credless's token


def refusal(challenge: bytes) -> bytes:
    return (
        b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: %s\r\nContent-Length: 2\r\n\r\n{}"
        % challenge
    )


def recording_invalidations(w: World) -> list[tuple]:
    told: list[tuple] = []

    def invalidate(ident, server_name, token, challenge=None):
        told.append((ident, server_name, token, challenge))

    w.oauth.invalidate = invalidate  # type: ignore[method-assign]
    return told


@run
async def test_a_token_the_server_calls_invalid_is_dropped_and_its_401_relayed():
    w = World()
    told = recording_invalidations(w)
    answer = refusal(b'Bearer error="invalid_token"')
    await exchange(w, post(len(PIECE)), Script(w, *body(PIECE)), answers=(answer,))
    assert w.client.transport.out.startswith(b"HTTP/1.1 401")
    assert told == [(w.served.holder(), UP.name, TOKEN, None)]


@run
async def test_a_401_that_names_the_scheme_sent_without_invalid_token_keeps_the_token():
    w = World()
    told = recording_invalidations(w)
    answer = refusal(b'Bearer realm="mcp"')
    await exchange(w, post(len(PIECE)), Script(w, *body(PIECE)), answers=(answer,))
    assert w.client.transport.out.startswith(b"HTTP/1.1 401")
    assert told == []


@run
async def test_a_401_without_a_challenge_is_relayed_and_keeps_the_token():
    w = World()
    told = recording_invalidations(w)
    answer = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n{}"
    await exchange(w, post(len(PIECE)), Script(w, *body(PIECE)), answers=(answer,))
    assert w.client.transport.out == answer
    assert told == []


@run
async def test_a_401_naming_another_scheme_names_the_server_and_hands_on_the_challenge():
    w = World()  # Bearer
    told = recording_invalidations(w)
    challenge = b'DPoP algs="ES256"'
    await exchange(w, post(len(PIECE)), Script(w, *body(PIECE)), answers=(refusal(challenge),))
    head, shaped = w.client.transport.out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 502")
    detail = json.loads(shaped)["detail"]
    assert f"the MCP server {UP.name} answered 401" in detail
    assert told == [(w.served.holder(), UP.name, TOKEN, challenge.decode())]


# ------------------------------------------------------------------ answers credless gives


@run
async def test_a_json_rpc_request_to_an_unreachable_server_gets_its_error_code_and_event():
    w = World(pooled=False)

    async def connect(up):
        raise ConnectionRefusedError(111, "Connection refused")

    w.proxy.exchanges.connect = connect  # type: ignore[method-assign]
    rpc = AuditBase({"method": "POST", "path": "/mcp"}, w.served.fragment, answers.by_body(PIECE))
    await w.proxy.exchanges.run(
        post(len(PIECE)), Script(w, *body(PIECE)), w.served, TOKEN, rpc, 0.0
    )
    shaped = json.loads(w.client.transport.out.split(b"\r\n\r\n", 1)[1])
    assert shaped["id"] == 1
    error = shaped["error"]
    assert error["code"] == answers.code_for("upstream_unreachable")
    assert error["code"] != answers.code_for("")  # not the code of a refusal
    assert error["data"]["cause"] == "upstream_unreachable"
    [failed] = events(w)
    assert error["data"]["event_id"] == failed["event_id"]


def test_an_answer_without_an_audit_base_is_the_plain_one():
    async def main():
        client = ClientSide(lambda c: None)
        client.connection_made(Transport())
        reply_now(client, 503, b"Service Unavailable", "credless: stopping")
        return client.transport.out

    out = asyncio.run(main())
    head, shaped = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert json.loads(shaped) == {"error": "credless: stopping"}


def test_a_new_connection_uses_the_proxys_tls_and_connect_timeout(monkeypatch):
    w_box: list[World] = []
    seen: list[tuple] = []

    async def connect(up, ssl_context, timeout, connected):
        seen.append((up, ssl_context, timeout, connected))
        return "conn"

    monkeypatch.setattr(exchange_module.upstreams, "connect", connect)

    async def main():
        w = World()
        w_box.append(w)
        w.proxy.exchanges.cfg = dataclasses.replace(
            w.proxy.exchanges.cfg, upstream_connect_timeout_seconds=2.5
        )
        return await w.proxy.exchanges.connect(UP)

    assert asyncio.run(main()) == "conn"
    w = w_box[0]
    [(up, ctx, timeout, connected)] = seen
    assert up is UP and ctx is w.proxy.exchanges.ssl_context
    assert timeout == 2.5 and connected == w.proxy.rec.upstream_connected


# ------------------------------------------------------------------ a workload that left


def test_a_workload_leaving_an_event_stream_is_done_only_with_a_whole_answer():
    response = b'data: {"jsonrpc":"2.0","id":7,"result":{}}\n\n'

    class Conn:
        def __init__(self, status: int, *fed: bytes):
            self.status, self.events = status, EventStream()
            for piece in fed:
                self.events.feed(piece)

    class Bare:  # an upstream side that keeps no event record
        status = 200

    asked = answers.Asked(True, (Call("tools/call", "echo", 7, True),))
    post_base = AuditBase({"method": "POST", "path": "/mcp"}, "", asked)
    assert answered(Conn(200, response), post_base)  # type: ignore[arg-type]
    # the server had not answered (no status): whatever the record says, not done
    assert not answered(Conn(0, response), post_base)  # type: ignore[arg-type]
    # inside the next event: the workload left mid-event
    assert not answered(Conn(200, response, b"data: {"), post_base)  # type: ignore[arg-type]
    assert not answered(Bare(), post_base)  # type: ignore[arg-type]
    # a request with a null id cannot be matched to its response: the others decide
    with_null = answers.Asked(
        True, (Call("tools/call", "echo", 7, True), Call("ping", None, None, True))
    )
    null_base = AuditBase({"method": "POST", "path": "/mcp"}, "", with_null)
    assert answered(Conn(200, response), null_base)  # type: ignore[arg-type]


# ------------------------------------------------------------------ how the answer is relayed


@run
async def test_the_answer_to_a_head_request_ends_at_its_head():
    """A HEAD's answer has no body whatever its Content-Length says: the exchange ends at
    the head, not waiting for bytes that never come."""
    w = World()
    head = Head(method=b"HEAD", target=b"/mcp", headers=[(b"Host", b"127.0.0.1:8080")])
    task = asyncio.ensure_future(
        w.proxy.exchanges.run(head, Script(w, (END, None)), w.served, TOKEN, base(w), 0.0)
    )
    await _until(lambda: w.upstream.sent_at > 0)
    w.upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    await _until(task.done)
    assert task.result() is True
    assert w.client.transport.out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert [e["event"] for e in events(w)] == ["request.injected"]


@run
async def test_a_workload_that_asked_to_close_is_told_so_in_the_answer():
    w = World()
    keep = await exchange(w, post(len(PIECE), keep_alive=False), Script(w, *body(PIECE)))
    assert keep is False
    head = w.client.transport.out.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\nconnection: close" in head


@run
async def test_a_dpop_token_called_invalid_is_not_retried_even_with_a_nonce():
    w = dpop_world()
    told = recording_invalidations(w)
    answer = (
        b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: DPoP error="invalid_token"\r\n'
        b"DPoP-Nonce: n-1\r\nContent-Length: 2\r\n\r\n{}"
    )
    keep = await exchange(
        w, dpop_head(w, len(PIECE)), Script(w, *body(PIECE)), answers=(answer,), token=DPOP
    )
    assert len(requests_sent(w)) == 1
    assert w.client.transport.out.startswith(b"HTTP/1.1 401") and keep is True
    assert [t[2] for t in told] == [DPOP]


@run
async def test_a_nonce_demand_the_server_cut_short_is_not_retried():
    w = dpop_world()
    made: list[Any] = []

    async def connect(up):
        made.append(up)
        raise AssertionError("not sent again")

    w.proxy.exchanges.connect = connect  # type: ignore[method-assign]
    task = await sent(w, dpop_head(w, len(PIECE)), DPOP)
    whole = nonce_401(b"n-1")
    w.upstream.data_received(whole[:-5])  # its body cut short
    w.upstream.connection_lost(None)
    keep = await asyncio.wait_for(task, 5)
    assert made == [] and len(requests_sent(w)) == 1
    assert keep is False  # the workload's connection closes: its answer was partial


@run
async def test_a_nonce_demand_too_long_to_hold_is_relayed_and_not_sent_again():
    w = dpop_world()
    filler = b"x" * (HOLD_MAX + 1)
    answer = (
        b"HTTP/1.1 401 Unauthorized\r\n"
        b'WWW-Authenticate: DPoP algs="ES256", error="use_dpop_nonce"\r\n'
        b"DPoP-Nonce: n-1\r\nContent-Length: %d\r\n\r\n%s" % (len(filler), filler)
    )
    await exchange(
        w, dpop_head(w, len(PIECE)), Script(w, *body(PIECE)), answers=(answer,), token=DPOP
    )
    assert len(requests_sent(w)) == 1  # the workload has its 401 already: never a second
    assert w.client.transport.out.startswith(b"HTTP/1.1 401")
    assert w.client.transport.out.endswith(filler)


# ------------------------------------------------------------------ event streams


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def sse(event: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(event), event)


ANSWERED = sse(b'data: {"jsonrpc":"2.0","id":1,"result":{}}\n\n')
PROGRESS = sse(b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n')


AGO = 1000.0  # the request's handling began this long (s) before the exchange


async def streamed(
    w: World, token: Any, *pieces: bytes, leave: bool, started: float | None = None
) -> bool:
    """A JSON-RPC POST (id 1) answered with an event stream of pieces; leave: the workload
    then closes its connection, else the stream ends. run's answer. The request's handling
    began AGO seconds before (its audited latency counts from there), or at `started`."""
    rpc = AuditBase({"method": "POST", "path": "/mcp"}, w.served.fragment, answers.by_body(PIECE))
    task = asyncio.ensure_future(
        w.proxy.exchanges.run(
            post(len(PIECE)),
            Script(w, *body(PIECE)),
            w.served,
            token,
            rpc,
            time.perf_counter() - AGO if started is None else started,
        )
    )
    await _until(lambda: w.upstream.sent_at > 0)
    for piece in pieces:
        w.upstream.data_received(piece)
    if leave:
        w.client.eof_received()  # the workload goes, the stream still open
    else:
        w.upstream.data_received(b"0\r\n\r\n")
    return await asyncio.wait_for(task, 5)


@pytest.mark.parametrize("token", [TOKEN, None], ids=["injected", "forwarded"])
@run
async def test_a_workload_that_leaves_a_stream_after_its_answer_was_answered(token):
    w = World(token=token)
    t0 = time.perf_counter()
    keep = await streamed(w, token, SSE_HEAD, PROGRESS, ANSWERED, leave=True)
    elapsed_ms = (time.perf_counter() - t0) * 1000
    assert keep is False
    assert w.upstream.transport.closed  # the rest of the stream is not waited for
    outcome = "injected" if token else "forwarded"
    [done] = events(w)
    assert done["event"] == f"request.{outcome}" and done["status"] == 200
    assert done["method"] == "POST" and done["spiffe_id"] == SID
    assert AGO * 1000 <= done["latency_ms"] <= AGO * 1000 + elapsed_ms  # from its start
    if token:
        assert done["jti"] == TOKEN.jti
    assert count(w, outcome) == 1 and count(w, "workload_closed") == 0


@run
async def test_a_workload_that_leaves_a_stream_before_its_answer_aborted_it():
    w = World()
    keep = await streamed(w, TOKEN, SSE_HEAD, PROGRESS, leave=True)
    assert keep is False and w.upstream.transport.closed
    [aborted] = events(w)
    assert aborted["event"] == "request.aborted" and aborted["status"] == 200
    assert "the workload closed its connection" in aborted["reason"]
    assert count(w, "workload_closed") == 1 and count(w, "injected") == 0


@run
async def test_a_stream_that_ends_with_the_workload_there_keeps_both_connections():
    w = World()
    keep = await streamed(w, TOKEN, SSE_HEAD, ANSWERED, leave=False)
    assert keep is True
    assert w.client.transport.out.endswith(b"0\r\n\r\n")  # the stream's end, relayed
    assert w.proxy.pool.get(w.key) is w.upstream
    assert [e["event"] for e in events(w)] == ["request.injected"]


# ------------------------------------------------------------------ a server too slow


@pytest.mark.parametrize("keep_alive", [True, False])
@run
async def test_a_server_that_does_not_answer_in_time_gets_the_workload_a_504(keep_alive):
    w = World()
    w.proxy.exchanges.cfg = dataclasses.replace(w.proxy.exchanges.cfg, upstream_timeout_seconds=7.5)
    rpc = AuditBase({"method": "POST", "path": "/mcp"}, w.served.fragment, answers.by_body(PIECE))
    task = asyncio.ensure_future(
        w.proxy.exchanges.run(
            post(len(PIECE), keep_alive=keep_alive),
            Script(w, *body(PIECE)),
            w.served,
            TOKEN,
            rpc,
            0.0,
        )
    )
    await _until(lambda: w.upstream.sent_at > 0)
    w.upstream.timed_out = True  # what the proxy's upstream timeout does
    w.upstream.abort()
    keep = await asyncio.wait_for(task, 5)
    assert keep is keep_alive  # the request was read whole
    head, shaped = w.client.transport.out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    error = json.loads(shaped)["error"]
    assert "within 7.5 s" in error["message"]
    assert error["code"] == answers.code_for("upstream_timeout")
    assert error["data"]["cause"] == "upstream_timeout"
    [failed] = events(w)
    assert failed["event"] == "request.failed" and failed["method"] == "POST"
    assert failed["reason"] == "the MCP server did not answer within 7.5 s"
    assert error["data"]["event_id"] == failed["event_id"]
    assert count(w, "upstream_timeout") == 1 and count(w, "upstream_closed") == 0


@run
async def test_a_server_timed_out_after_its_answer_began_is_cut_short_not_504():
    w = World()
    task = await sent(w)
    w.upstream.data_received(CUT)
    w.upstream.timed_out = True
    w.upstream.abort()
    assert await asyncio.wait_for(task, 5) is False
    assert w.client.transport.out.startswith(b"HTTP/1.1 200 OK")
    assert b"504" not in w.client.transport.out
    assert count(w, "upstream_closed") == 1 and count(w, "upstream_timeout") == 0


@run
async def test_a_refusal_too_long_to_hold_is_relayed_once_and_audited():
    """A 401 naming another scheme, too long to hold: it has reached the workload already,
    so credless adds no 502 after it, and still audits and counts the refusal."""
    w = World()  # Bearer
    told = recording_invalidations(w)
    filler = b"x" * (HOLD_MAX + 1)
    answer = (
        b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: DPoP algs="ES256"\r\n'
        b"Content-Length: %d\r\n\r\n%s" % (len(filler), filler)
    )
    keep = await exchange(w, post(len(PIECE)), Script(w, *body(PIECE)), answers=(answer,))
    out = w.client.transport.out
    assert out.startswith(b"HTTP/1.1 401") and out.endswith(filler)
    assert b"HTTP/1.1 502" not in out and keep is True
    [failed] = events(w)
    assert failed["event"] == "request.failed" and failed["status"] == 401
    assert "answered 401 naming the DPoP scheme" in failed["reason"]
    assert count(w, "credential_refused") == 1 and len(told) == 1


# ------------------------------------------------------------------ what a JSON-RPC caller reads


def rpc_base(w: World) -> AuditBase:
    return AuditBase({"method": "POST", "path": "/mcp"}, w.served.fragment, answers.by_body(PIECE))


@run
async def test_a_json_rpc_request_whose_server_closed_unanswered_gets_its_cause_and_event():
    w = World()
    task = await sent(w, audit=rpc_base(w))
    w.upstream.connection_lost(None)
    await asyncio.wait_for(task, 5)
    error = json.loads(w.client.transport.out.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == answers.code_for("upstream_closed")
    assert error["data"]["cause"] == "upstream_closed"
    assert error["data"]["event_id"] == events(w)[0]["event_id"]


@pytest.mark.parametrize("rpc", [True, False], ids=["json-rpc", "plain"])
@run
async def test_a_credential_refused_for_its_scheme_is_answered_with_the_cause_and_event(rpc):
    w = World()  # Bearer
    refused = refusal(b'DPoP algs="ES256"')
    src = Script(w, *body(PIECE))
    task = asyncio.ensure_future(
        w.proxy.exchanges.run(
            post(len(PIECE)), src, w.served, TOKEN, rpc_base(w) if rpc else base(w), 0.0
        )
    )
    await _until(lambda: w.upstream.sent_at > 0)
    w.upstream.data_received(refused)
    assert await asyncio.wait_for(task, 5) is True
    shaped = json.loads(w.client.transport.out.split(b"\r\n\r\n", 1)[1])
    [failed] = events(w)
    said = "credless: the MCP server refused the credential credless sent"
    if rpc:
        error = shaped["error"]
        assert error["code"] == answers.code_for("credential_refused")
        assert error["data"]["cause"] == "credential_refused"
        assert error["data"]["event_id"] == failed["event_id"]
        assert error["message"].startswith(said + ": ")
    else:
        assert shaped["error"] == said and shaped["event_id"] == failed["event_id"]


@run
async def test_the_servers_time_to_answer_is_measured_from_the_request_sent():
    w = World()
    t0 = time.perf_counter()
    await exchange(w, post(len(PIECE)), Script(w, *body(PIECE)))
    elapsed = time.perf_counter() - t0
    count_ = w.registry.get_sample_value("credless_upstream_seconds_count", {"server": UP.name})
    total = w.registry.get_sample_value("credless_upstream_seconds_sum", {"server": UP.name})
    assert count_ == 1 and total is not None and 0 <= total <= elapsed


@run
async def test_an_answered_requests_latency_counts_from_when_its_handling_began():
    w = World()
    t0 = time.perf_counter()
    task = await sent(w, started=t0 - AGO)
    w.upstream.data_received(RESPONSE)
    await asyncio.wait_for(task, 5)
    elapsed_ms = (time.perf_counter() - t0) * 1000
    [done] = events(w)
    assert AGO * 1000 <= done["latency_ms"] <= AGO * 1000 + elapsed_ms


# ------------------------------------------------------------------ a request without a token


@run
async def test_a_forwarded_request_left_inside_its_body_is_on_the_record_without_a_token():
    """As a credentialed one (above), a request forwarded without credless's credential
    whose workload left after its head went up is audited, naming no token."""
    w = World(token=None)
    src = Script(w, (BODY, b"x" * READ_SIZE))  # then None: the workload's connection closed
    with pytest.raises(ConnectionError):
        await exchange(w, post(3 * READ_SIZE), src, token=None)
    [aborted] = events(w)
    assert aborted["event"] == "request.aborted" and aborted.get("token_sha256") is None
    assert count(w, "workload_closed") == 1


@run
async def test_a_forwarded_answer_cut_short_is_on_the_record_without_a_token():
    w = World(token=None)
    task = await sent(w, token=None)
    await _until(lambda: w.upstream.transport.out.endswith(PIECE))
    w.upstream.data_received(CUT)
    w.upstream.connection_lost(None)
    assert await asyncio.wait_for(task, 5) is False
    [failed] = events(w)
    assert failed["event"] == "request.failed" and failed["status"] == 200
    assert failed.get("token_sha256") is None
    assert count(w, "upstream_closed") == 1


# ------------------------------------------------------------------ the latency audited

STARTED, NOW = 500.0, 500.123456  # the request's handling began 123.456 ms before NOW


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """exchange.py's perf_counter reads NOW: the latency it audits is exact."""
    monkeypatch.setattr(exchange_module, "time", types.SimpleNamespace(perf_counter=lambda: NOW))


@pytest.mark.parametrize("end", ["answered", "cut short", "a stream left once answered"])
@run
async def test_the_audited_latency_is_in_milliseconds_to_the_hundredth(fixed_clock, end):
    w = World()
    if end == "a stream left once answered":
        await streamed(w, TOKEN, SSE_HEAD, ANSWERED, leave=True, started=STARTED)
    else:
        task = await sent(w, started=STARTED)
        w.upstream.data_received(RESPONSE if end == "answered" else CUT)
        if end == "cut short":
            w.upstream.connection_lost(None)
        await asyncio.wait_for(task, 5)
    [event] = events(w)
    assert event["event"] == ("request.failed" if end == "cut short" else "request.injected")
    assert event["latency_ms"] == 123.46


# ------------------------------------------------------------------ what is logged


@run
async def test_an_invalid_nonce_is_logged_as_ignored_naming_the_server(logged):
    w = dpop_world()
    await exchange(
        w,
        dpop_head(w, len(PIECE)),
        Script(w, *body(PIECE)),
        answers=(nonce_401(b"not a nonce"),),
        token=DPOP,
    )
    warned = said(logged, "warning", "inject.challenges")
    assert warned
    for e in warned:
        assert "DPoP-Nonce from the MCP server is not a valid nonce" in e["event"]
        assert e["server"] == UP.name


@run
async def test_an_answer_before_the_body_was_sent_whole_is_logged_naming_the_server(logged):
    w = World()
    pieces = (b"a" * READ_SIZE, b"b" * 10)  # the first goes up with the head, then the answer

    def answer_before_the_end(i: int) -> None:
        if i == 2:
            w.upstream.data_received(RESPONSE)

    src = Script(w, *body(*pieces), before=answer_before_the_end)
    await exchange(w, post(sum(map(len, pieces))), src, answers=())
    [debug] = said(logged, "debug", "inject.exchange")
    assert "answered before its body was sent whole" in debug["event"]
    assert debug["server"] == UP.name
