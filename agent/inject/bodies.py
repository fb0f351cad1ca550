"""A request body as the proxy's deciding coroutine reads it: from the workload (a
ClientSide's events) or, once read whole for a decision, replayed (Replay)."""

from __future__ import annotations

from collections import deque

from agent.inject.http1 import BODY, END


class Replay:
    """The events of a body already read (for policy), as if read again."""

    def __init__(self, body: bytes):
        self._events = deque([(BODY, body)] if body else [])
        self._events.append((END, None))

    async def next(self):
        return self._events.popleft() if self._events else None


async def body_event(src) -> tuple[int, object]:
    ev = await src.next()
    if ev is None:
        raise ConnectionError("the workload closed the connection inside a request")
    return ev


async def read_body(src, max_body: int) -> bytes | None:
    """The whole request body, or None (drained) when it exceeds max_body."""
    body = bytearray()
    while True:
        kind, data = await body_event(src)
        if kind == BODY:
            body += data
            if len(body) > max_body:
                await drain_body(src)
                return None
        elif kind == END:
            return bytes(body)


async def drain_body(src) -> None:
    while (await body_event(src))[0] != END:
        pass
