"""agent/inject/flows.py without sockets: which answers go to the workload byte for byte,
and which are re-rendered (hop-by-hop headers removed, framing announced)."""

from __future__ import annotations

import asyncio

import pytest

from agent.inject.flows import ClientSide, UpstreamSide
from tests.unit.transport import Transport


def exchange(reads: list[bytes], close_client: bool = False, bodiless: bool = False):
    """Relay one response arriving as reads; returns (bytes the workload got, the side)."""

    async def run():
        client = ClientSide(lambda c: None)
        client.connection_made(Transport())
        up = UpstreamSide()
        up.connection_made(Transport())
        done = []
        up.begin(client, close_client=close_client, bodiless=bodiless, on_done=done.append)
        up.sent()
        for data in reads:
            up.data_received(data)
        return client.transport.out, up, done

    return asyncio.run(run())


BODY = b'{"jsonrpc":"2.0","id":1,"result":{}}'
# "Content-Type:application/json" without a space: legal, and re-rendered with one, so a
# relayed answer shows whether it went verbatim
PLAIN = b"HTTP/1.1 200 OK\r\nContent-Type:application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)


def with_headers(extra: bytes, version: bytes = b"1.1") -> bytes:
    return b"HTTP/%s 200 OK\r\nContent-Type:application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        version,
        extra,
        len(BODY),
        BODY,
    )


@pytest.mark.parametrize(
    "reads,verbatim",
    [
        ([PLAIN], True),
        ([with_headers(b"Connection: keep-alive\r\n")], True),  # true of our side too
        ([with_headers(b"Connection: Keep-Alive\r\n")], True),
        ([with_headers(b"Connection: close\r\n")], False),  # not the workload's business
        ([with_headers(b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n")], False),
        ([with_headers(b"Connection: keep-alive, x-hop\r\nX-Hop: 1\r\n")], False),
        ([with_headers(b"", b"1.0")], False),  # said as HTTP/1.1 to ours
        ([PLAIN[:30], PLAIN[30:]], False),  # in two reads
        ([PLAIN + b"HTTP/1.1 200 OK\r\n"], False),  # bytes after the answer
        ([b"\r\n\r\n" + with_headers(b"Keep-Alive: timeout=5\r\n")], False),  # blank lines first
    ],
)
def test_an_answer_is_relayed_verbatim_only_when_nothing_in_it_is_hop_by_hop(reads, verbatim):
    out, up, done = exchange(reads)
    assert done == [up] and up.complete and up.status == 200
    assert out.endswith(BODY)
    assert (out == b"".join(reads)) is verbatim
    head = out.split(b"\r\n\r\n")[0].lower()
    assert b"keep-alive: " not in head and b"x-hop" not in head and b"connection: close" not in head
    assert head.startswith(b"http/1.1 200")


def test_bytes_after_an_answer_make_the_connection_unusable():
    _, up, _ = exchange([PLAIN + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    assert not up.keep_alive


@pytest.mark.parametrize("close_client,bodiless", [(True, False), (False, True)])
def test_a_closing_workload_or_a_head_request_is_never_answered_verbatim(close_client, bodiless):
    out, up, _ = exchange([PLAIN], close_client=close_client, bodiless=bodiless)
    assert out != PLAIN and up.complete
    if close_client:
        assert b"Connection: close" in out
    else:
        assert not out.endswith(BODY)  # a HEAD answer ends at its head


REQUEST = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


@pytest.mark.parametrize(
    "state,fast",
    [
        ({}, True),
        ({"busy": True}, False),  # the coroutine is inside a request (awaiting a token)
        ({"fast_inflight": True}, False),  # an answer is being relayed: keep answers in order
        ({"write_paused": True}, False),  # the workload is not reading
        ({"queued": True}, False),  # an earlier request waits for the coroutine
        ({"partial": True}, False),  # the read continues a request begun earlier
    ],
)
def test_the_fast_path_is_offered_a_request_only_when_the_connection_is_idle(state, fast):
    async def run():
        offered = []
        client = ClientSide(lambda c: None)
        client.connection_made(Transport())
        client.fast = lambda data: offered.append(data) or True
        read = REQUEST
        for k, v in state.items():
            if k in ("queued", "partial"):
                client.fast = None
                client.data_received(REQUEST if k == "queued" else REQUEST[:20])
                client.fast = lambda data: offered.append(data) or True
                read = REQUEST if k == "queued" else REQUEST[20:]
            else:
                setattr(client, k, v)
        client.data_received(read)
        return offered, client

    offered, client = asyncio.run(run())
    assert offered == ([REQUEST] if fast else [])
    if not fast:  # queued for the coroutine instead, whole
        kinds = []
        while client._events:
            kinds.append(client._events.popleft()[0])
        assert kinds[-3:] == [1, 2, 3]  # HEAD, BODY, END


def test_a_closed_workload_connection_is_not_served_again():
    async def run():
        client = ClientSide(lambda c: None)
        client.connection_made(Transport())
        client.data_received(REQUEST)
        client.close()  # e.g. an answer that ended its keep-alive; a request was queued
        return client

    client = asyncio.run(run())
    assert client.closed and client.transport.closed


def test_draining_ends_an_idle_connection_but_finishes_a_request_under_way():
    async def run():
        idle = ClientSide(lambda c: None)
        idle.connection_made(Transport())
        waiting = asyncio.ensure_future(idle.next())
        await asyncio.sleep(0)
        idle.drain_and_close()
        assert await waiting is None and idle.fast is None  # no request begun after it

        busy = ClientSide(lambda c: None)
        busy.connection_made(Transport())
        busy.data_received(REQUEST[:-1])  # a request under way ...
        assert [(await busy.next())[0] for _ in range(2)] == [1, 2]  # HEAD, BODY
        busy.drain_and_close()
        rest = asyncio.ensure_future(busy.next())
        await asyncio.sleep(0)
        assert not rest.done()  # ... is read to its end
        busy.data_received(REQUEST[-1:])
        assert (await rest)[0] == 2 and (await busy.next())[0] == 3  # BODY, END
        assert await busy.next() is None  # and then it is over

    asyncio.run(run())
