"""A request body as the proxy's deciding coroutine reads it: from the workload (a
ClientSide's events) or, once read whole for a decision, replayed (Replay)."""

from __future__ import annotations

from collections import deque
from typing import Protocol

from agent.inject.http1 import BODY, END, Event


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
