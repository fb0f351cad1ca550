"""A request body as the proxy's deciding coroutine reads it: from the workload (a
ClientSide's events) or, once read whole for a decision, replayed (Replay); and the body of
a request credless answers itself, read for what it asked (asked_of) or dropped."""

from __future__ import annotations

from collections import deque
from typing import Protocol

from agent.inject import answers
from agent.inject.http1 import BODY, END, Event, Head


class EventSource(Protocol):
    """Where a request's events come from: the workload's connection, or a Replay."""

    async def next(self) -> Event | None: ...


class Replay:
    """The events of a body already read (for policy), as if read again."""

    def __init__(self, body: bytes):
        self._events: deque[Event] = deque([(BODY, body)] if body else [])
        self._events.append((END, None))

    async def next(self) -> Event | None:
        return self._events.popleft() if self._events else None


async def body_event(src: EventSource) -> Event:
    ev = await src.next()
    if ev is None:
        raise ConnectionError("the workload closed the connection inside a request")
    return ev


async def read_body(src: EventSource, max_body: int) -> bytes | None:
    """The whole request body, or None (drained) when it exceeds max_body."""
    body = bytearray()
    while True:
        ev = await body_event(src)
        if ev[0] == BODY:
            body += ev[1]
            if len(body) > max_body:
                await drain_body(src)
                return None
        elif ev[0] == END:
            return bytes(body)


async def drain_body(src: EventSource) -> None:
    while (await body_event(src))[0] != END:
        pass


async def asked_of(
    src: EventSource, head: Head, max_body: int, *, readable: bool, drain: bool
) -> answers.Asked:
    """What a request credless answers itself asked (answers.Asked), its unread body read
    whole (up to max_body, the rest dropped) when readable and it may be JSON-RPC, for the
    ids its answer keeps; otherwise dropped when drain (the connection stays open: the next
    request must be framed where it begins) or left unread."""
    asked = answers.by_head(head.method, head.get(b"content-type"))
    if asked.rpc and readable:
        return answers.by_body(await read_body(src, max_body))
    if drain:
        await drain_body(src)
    return asked
