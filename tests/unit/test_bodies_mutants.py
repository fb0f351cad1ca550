"""A request body as the proxy reads it (agent/inject/bodies.py), found by mutation testing:
a body that comes in pieces is read whole and measured whole, a body read for policy is
replayed as it was (an empty one as no piece at all: an empty piece is the end of a chunked
body), and a source that is done says so without failing."""

from __future__ import annotations

import asyncio

import pytest

from agent.inject.bodies import Replay, body_event, drain_body, read_body
from agent.inject.http1 import BODY, END, Event


class Pieces:
    """The workload's connection: these events, then the connection closes (None)."""

    def __init__(self, *events: Event):
        self.events = list(events)
        self.read = 0

    async def next(self) -> Event | None:
        if not self.events:
            return None
        self.read += 1
        return self.events.pop(0)


def run(coro):
    return asyncio.run(coro)


def test_a_body_in_pieces_is_read_whole():
    src = Pieces((BODY, b'{"jsonrpc":'), (BODY, b'"2.0"'), (BODY, b"}"), (END, None))
    assert run(read_body(src, 1 << 20)) == b'{"jsonrpc":"2.0"}'


def test_pieces_each_under_the_limit_are_over_it_together_and_are_drained():
    src = Pieces((BODY, b"a" * 6), (BODY, b"b" * 6), (BODY, b"c"), (END, None))
    assert run(read_body(src, 10)) is None
    assert src.events == []  # the rest dropped: the next request is framed where it begins
    exact = Pieces((BODY, b"a" * 6), (BODY, b"b" * 4), (END, None))
    assert run(read_body(exact, 10)) == b"a" * 6 + b"b" * 4  # at the limit: read


def test_a_workload_that_closes_inside_a_body_is_a_connection_error():
    with pytest.raises(ConnectionError):
        run(read_body(Pieces((BODY, b"ab")), 10))
    with pytest.raises(ConnectionError):
        run(drain_body(Pieces((BODY, b"ab"))))
    with pytest.raises(ConnectionError):
        run(body_event(Pieces()))


async def replayed(replay: Replay) -> list[Event | None]:
    return [await replay.next() for _ in range(4)]


def test_a_replayed_body_is_the_body_then_its_end_then_nothing():
    assert run(replayed(Replay(b"abc"))) == [(BODY, b"abc"), (END, None), None, None]


def test_an_empty_body_is_replayed_as_its_end_alone():
    """No empty piece: written to a chunked request, an empty chunk ends the body."""
    assert run(replayed(Replay(b""))) == [(END, None), None, None, None]


def test_a_replayed_body_reads_and_drains_as_the_workloads_would():
    assert run(read_body(Replay(b"x" * 5), 5)) == b"x" * 5
    assert run(read_body(Replay(b"x" * 6), 5)) is None
    assert run(read_body(Replay(b""), 0)) == b""
