"""The proxy's two sides of a connection as asyncio Protocols, with flow control.

Why Protocols and not asyncio streams: at tens of thousands of requests a second the stream
machinery (StreamReader buffers, an async generator per request, drain() after every write)
cost more CPU than the proxying. Here the workload side queues parsed request events for the
one coroutine that serves the connection (it makes the per-request decisions, which may
await a token), and the upstream side streams the response to the workload from its own
data_received callback: no coroutine is resumed per response chunk, and an SSE event goes out
in the same loop iteration that read it.

Flow control both ways: a workload that stops reading pauses reading from the upstream that
feeds it (and resumes it); request bodies queued beyond HIGH_WATER pause reading from the
workload until the serving coroutine catches up; an upstream that stops reading makes the
coroutine wait (UpstreamSide.drain) before it sends more of a request body.

A 401 answer to a request that carried credless's credential is held back (up to HOLD_MAX
bytes) instead of relayed as it arrives: the proxy reads its challenge first, and may send
the request again with a DPoP nonce the server asked for, or answer with a diagnosis of a
scheme the server wants and credless did not use (agent/inject/exchange.py).

An answer may also be relayed with one value masked (begin's `mask`; agent/inject/masking.py
says how): a credential credless put into the request, which a server may quote back.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from agent.inject import http1
from agent.inject.answered import EventStream, is_event_stream
from agent.inject.http1 import BODY, END, HEAD, LAST_CHUNK, Event, Head, ProtocolError, chunk
from agent.inject.masking import Mask

if TYPE_CHECKING:  # upstreams.py imports this module
    from agent.inject.upstreams import Upstream

HIGH_WATER = 256 << 10
LOW_WATER = 64 << 10
# a held 401 longer than this is relayed after all (challenges come with short bodies)
HOLD_MAX = 64 << 10
# a DPoP-Nonce field in a head relayed verbatim (llhttp is strict: CRLF, name, colon)
_NONCE_FIELD = re.compile(rb"\r\ndpop-nonce:[ \t]*([^\r]*)", re.IGNORECASE)


def _stream(transport: asyncio.BaseTransport) -> asyncio.Transport:
    # asyncio types connection_made for every kind of transport; a TCP (or TLS) connection's
    # is a full Transport
    return cast(asyncio.Transport, transport)


class ClientSide(asyncio.Protocol):
    """The workload's connection: request events in (next()), response bytes out (write())."""

    # set by connection_made, which asyncio calls before any other callback and before
    # anyone else is handed this side (the proxy gets it from on_connect)
    transport: asyncio.Transport
    _loop: asyncio.AbstractEventLoop

    def __init__(
        self,
        on_connect: Callable[[ClientSide], object],
        max_head: int = http1.MAX_HEAD_BYTES,
        max_fields: int = http1.MAX_HEADER_FIELDS,
    ):
        self._on_connect = on_connect
        self.upstream: UpstreamSide | None = None  # streaming a response into us
        self.max_head, self.max_fields = max_head, max_fields  # of a request head
        self._reader = http1.Reader(max_head=max_head, max_fields=max_fields)
        self._events: deque[Event] = deque()
        self._queued = 0
        self._error: ProtocolError | None = None
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self.write_paused = False
        self._writable: asyncio.Future[None] | None = None
        self.closed = False
        self.last_rx = time.monotonic()  # for the proxy's timeouts (inject/timeouts.py)
        # (Upstream, audit fragment) once the proxy knows
        self.served: tuple[Upstream | None, str] = (None, "")
        # The proxy's fast lane (agent/inject/lane.py): offered a read between requests, it
        # sends a whole request from this callback and returns True, or declines (False)
        # and the read goes to the parser and the serving coroutine. While its answer is
        # relayed (fast_inflight), the coroutine is given nothing, so answers stay in order.
        self.fast: Callable[[bytes], bool] | None = None
        self.whole = http1.WholeMessage()  # the fast lane's test of a read
        self.fast_inflight = False
        self.busy = False  # the serving coroutine is inside a request (set by the proxy)
        self.draining = False  # the agent is stopping: close after the answer in flight
        # the process image's change count when the proxy last found it current (None: ask
        # the kernel on the next request; see Proxy.image_current)
        self.image_mark: int | None = None
        self.sender_mark: int | None = None  # ... and of the sender check (proxy.py)

    # --- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = _stream(transport)
        self._loop = asyncio.get_running_loop()
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        if self._error is not None:
            return
        if (
            self.fast is not None
            and not self._events
            and not self.fast_inflight
            and not self.busy
            and self.upstream is None
            and not self.write_paused
            and not self._reader.in_message
            and self.fast(data)
        ):
            return
        try:
            events = self._reader.feed(data)
        except ProtocolError as e:
            self._error, events = e, []
        for ev in events:
            if ev[0] == BODY:
                self._queued += len(ev[1])
        self._events.extend(events)
        if self._queued > HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self.wake()

    def eof_received(self) -> bool:
        self._eof = True
        up = self.upstream
        if up is not None:
            # the workload closed while its request was with the server: it has gone (so
            # nginx takes it too: "client prematurely closed connection"), and an answer it
            # will never read, such as an MCP session's notification stream, would otherwise
            # hold both connections until the server ends it, which may be never
            up.client_gone = True
            up.abort()
        self.wake()
        return True  # between requests: what was written still goes out, then it closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self._eof = True
        self.write_paused = False  # nothing will resume it: never pause an upstream for it
        self.wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self.upstream is not None:
            # reset or closed under its answer: the workload has gone (eof_received says so
            # for a FIN; a reset comes here only)
            self.upstream.client_gone = True
            self.upstream.abort()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.upstream is not None:
            self.upstream.transport.resume_reading()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def wake(self) -> None:
        """Let the serving coroutine look again (new events, eof, an error, closed). Only
        then: after a fast answer with nothing queued, resuming it would only have it wait
        again, and a task step per request costs more than the fast path saves."""
        w = self._waiter
        if (
            w is not None
            and not w.done()
            and (
                self._events or self.closed or self._eof or self._error is not None or self.draining
            )
        ):
            w.set_result(None)

    # --- used by the serving coroutine and the proxy's timeouts
    def waiting(self) -> str | None:
        """What the serving coroutine is waiting for from the workload, if it is: "request"
        (between requests) or "more" (the rest of a request's head or body)."""
        if self._waiter is None or self._waiter.done() or self.fast_inflight:
            return None
        return "more" if self._reader.in_message else "request"

    async def next(self) -> Event | None:
        """The next request event; None once the workload has closed; raises ProtocolError
        when what it sent cannot be framed as HTTP/1.1."""
        while not self._events or self.fast_inflight:
            if self.closed:
                return None
            if self.draining and not self.fast_inflight and not self._reader.in_message:
                return None  # between requests while the agent stops: begin no other
            if not self.fast_inflight:
                if self._error is not None:
                    raise self._error
                if self._eof:
                    return None
            self._waiter = self._loop.create_future()
            await self._waiter
            self._waiter = None
        ev = self._events.popleft()
        if ev[0] == BODY:
            self._queued -= len(ev[1])
            if self._reading_paused and self._queued < LOW_WATER:
                self._reading_paused = False
                self.transport.resume_reading()
        return ev

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        while self.write_paused and not self.closed:
            self._writable = self._loop.create_future()
            await self._writable

    def drain_and_close(self) -> None:
        """The agent is stopping: no request is begun on this connection from now on (next()
        says the workload is done, the fast lane is off); the one under way, if any, is
        answered, and then the serving coroutine ends and the connection is closed."""
        self.draining = True
        self.fast = None
        self.wake()

    def close(self) -> None:
        """Close (after what was written): nothing more is read from it or served on it."""
        self.closed = True
        self.transport.close()


class UpstreamSide(asyncio.Protocol):
    """One connection to an MCP server; carries one exchange at a time and, between
    exchanges, waits in the pool. The response is relayed to the workload as it arrives."""

    # set by connection_made: the pool and the proxy get this side from create_connection,
    # after it
    transport: asyncio.Transport
    _loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        self.closed = False
        self._client: ClientSide | None = None
        # one parser for the connection's responses, in order (keep-alive); a response
        # that ends out of step (bytes after it, a parse error) closes the connection
        self._reader = http1.Reader(response=True)
        self._done: asyncio.Future[None] | None = None
        self._on_done: Callable[[UpstreamSide], object] | None = None
        self._first_read = False  # the next read starts the exchange's response
        self._write_paused = False
        self._writable: asyncio.Future[None] | None = None
        # the current (or last) exchange's outcome
        self.head: Head | None = None  # final (non-1xx) response head, if parsed
        self.status = 0  # its status (0: no final response yet)
        self._whole = http1.WholeMessage(response=True)  # the verbatim lane's test
        self.complete = False  # the response ended as HTTP frames it
        self.keep_alive = True
        self.sent_at = 0.0  # 0 until the request is sent (begin() resets it)
        self.head_at = 0.0
        self.timed_out = False  # aborted by the proxy's upstream timeout
        self.client_gone = False  # aborted: the workload closed mid-answer
        self.close_delimited = False
        self._close_client = self._bodiless = False
        self._skip_end = False  # the parser's end of an interim (1xx) response
        # the exchange carries credless's credential: a 401 answer is held (see above)
        self._hold_401 = False
        self._watch_nonce = False  # ... a DPoP-bound one: DPoP-Nonce fields are read
        self.held: bytearray | None = None  # the 401 answer held back, as it would be relayed
        self._mask: Mask | None = None  # a value never relayed (see above)
        self.dpop_nonce: bytes | None = None  # the final response's DPoP-Nonce, if watched
        # an event-stream answer's record, as relayed: did the workload have its answer when
        # it left (agent/inject/answered.py, exchange.finished)
        self.events: EventStream | None = None

    # --- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = _stream(transport)
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        client = self._client
        if client is None:  # an idle connection has nothing to say: not reusable
            self.transport.close()
            return
        if self._first_read:
            self._first_read = False
            if not (self._bodiless or self._close_client or self._mask) and self._verbatim(
                client, data
            ):
                return
        try:
            self._relay(client, self._reader.feed(data))
        except ProtocolError:
            self.abort()

    def eof_received(self) -> bool:
        if self._client is not None:
            client = self._client
            self._relay(client, self._reader.feed_eof())
            if self.close_delimited and not self.complete:
                rest = self._mask.rest() if self._mask is not None else b""
                if rest:  # a masked body's last bytes
                    client.write(rest)
                self.complete = True  # its body ends here (httptools has no end-of-input)
                self._finish()
        self.keep_alive = False
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.keep_alive = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._finish()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # --- the exchange
    def begin(
        self,
        client: ClientSide,
        close_client: bool = False,
        bodiless: bool = False,
        on_done: Callable[[UpstreamSide], object] | None = None,
        hold_401: bool = False,
        watch_nonce: bool = False,
        mask: bytes | None = None,
    ) -> None:
        """Relay the next response to client. close_client: the workload asked to close after
        it (the response says Connection: close). bodiless: the request was HEAD, whose
        response has no body whatever its Content-Length says. on_done(self): called when
        the exchange ends, instead of waking a finished() waiter. hold_401: keep a 401
        answer in `held` instead of relaying it; watch_nonce: read the answer's DPoP-Nonce
        into `dpop_nonce`; mask: a value the answer is relayed without (see above)."""
        self._client = client
        client.upstream = self
        self._on_done = on_done
        self._done = None if on_done is not None else self._loop.create_future()
        self._first_read = True
        self.head, self.status, self.complete = None, 0, False
        self.sent_at, self.timed_out, self.client_gone = 0.0, False, False
        self.close_delimited = self._skip_end = False
        self._close_client, self._bodiless = close_client, bodiless
        self._hold_401, self._watch_nonce = hold_401, watch_nonce
        self.held = self.dpop_nonce = None
        self._mask = Mask(mask) if mask else None
        self.events = None
        if client.write_paused and not client.closed:
            self.transport.pause_reading()

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def sent(self) -> None:
        self.sent_at = time.perf_counter()

    def waiting_since(self) -> float | None:
        """perf_counter() when the request went out, while its response head has not come."""
        return self.sent_at if self.sent_at and not self.status and self._client else None

    async def drain(self) -> None:
        while self._write_paused and not self.closed:
            self._writable = self._loop.create_future()
            await self._writable

    async def finished(self) -> None:
        if self._done is None:
            raise RuntimeError("finished() waits for an exchange begun without on_done")
        await self._done

    def abort(self) -> None:
        self.keep_alive = False
        self.transport.abort()
        self._finish()

    def _relay(self, client: ClientSide, events: list[Event]) -> None:
        out = bytearray()
        for i, ev in enumerate(events):
            if ev[0] == HEAD:
                item = ev[1]
                if 100 <= item.status < 200:
                    out += self._masked_head(item)
                    self._skip_end = True  # httptools ends a 1xx as a message of its own
                    continue
                self.head, self.status, self.head_at = item, item.status, time.perf_counter()
                self.keep_alive = item.keep_alive
                if self._watch_nonce:
                    self.dpop_nonce = item.get(b"dpop-nonce")
                if item.status == 401 and self._hold_401:
                    self.held = bytearray()
                http1.strip_connection_headers(item)
                # a body that ends when the server closes can only reach the workload the
                # same way: its connection is closed after it
                self.close_delimited = not (
                    self._bodiless
                    or item.chunked
                    or item.status in (204, 304)
                    or item.get(b"content-length") is not None
                )
                if self.close_delimited or self._close_client:
                    item.add(b"Connection", b"close")
                if is_event_stream(item.get(b"content-type")):
                    self.events = EventStream()
                out += self._masked_head(item)
                if self._bodiless:  # the parser would wait for Content-Length bytes
                    self.complete, self.keep_alive = True, False
                    break
            elif ev[0] == BODY:
                data = self._mask.body(ev[1]) if self._mask is not None else ev[1]
                if data:
                    out += chunk(data) if self._final_head().chunked else data
                if self.events is not None:
                    self.events.feed(ev[1])
            elif ev[0] == END:
                if self._skip_end:
                    self._skip_end = False
                    continue
                rest = self._mask.rest() if self._mask is not None else b""
                if rest:  # a masked body's last bytes
                    out += chunk(rest) if self._final_head().chunked else rest
                if self._final_head().chunked:
                    out += LAST_CHUNK
                self.complete = True
                # bytes after the response (a message begun, even one with no event yet):
                # out of step, so never reused
                if i + 1 < len(events) or self._reader.in_message:
                    self.keep_alive = False
                break
        held = self.held
        if held is not None:
            held += out
            out = bytearray()
            if len(held) > HOLD_MAX:  # not a challenge's answer: relay it after all
                out, self.held = held, None
        if out:  # what one read brought goes out at once: SSE events are not held back
            client.write(bytes(out))
        if self.complete:
            self._finish()

    def _masked_head(self, head: Head) -> bytes:
        data = head.response_bytes()
        return self._mask.head(data) if self._mask is not None else data

    def _final_head(self) -> Head:
        """The head of the response whose body is being relayed."""
        # llhttp gives a message's head before its body and end, and a 1xx head has neither
        if self.head is None:
            raise ProtocolError("a response body before its head")
        return self.head

    def _verbatim(self, client: ClientSide, data: bytes) -> bool:
        """The common answer, relayed as the server sent it: the exchange's first read
        holding exactly one whole HTTP/1.1 final response that keeps its connection open,
        with no hop-by-hop field but `Connection: keep-alive` (true of the workload's
        connection too), and not a 401 (whose challenge the proxy reads). Anything else is
        parsed and re-rendered by _relay (hop-by-hop fields removed, framing announced)."""
        whole = self._whole
        if (
            not whole.one(data)
            or whole.status < 200
            or whole.status == 401
            or whole.version != "1.1"
            or not whole.keep_alive
        ):
            return False
        for m in http1.RESPONSE_HOP_FIELDS.finditer(data, 0, whole.head_end + 2):
            if m.group(1).lower() != b"connection" or m.group(2).strip().lower() != b"keep-alive":
                return False
        self.status, self.head_at = whole.status, time.perf_counter()
        self.keep_alive = self.complete = True
        if self._watch_nonce:
            found = _NONCE_FIELD.search(data, 0, whole.head_end + 2)
            self.dpop_nonce = found.group(1).strip() if found else None
        client.write(data)
        self._finish()
        return True

    def _finish(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.last_rx = time.monotonic()  # idle from now, not from its last request
            if client.upstream is self:
                client.upstream = None
        if not self.transport.is_closing():
            self.transport.resume_reading()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(self)

    def take_held(self) -> bytes | None:
        """The held 401 answer (None: none was held), no longer held."""
        held, self.held = self.held, None
        return bytes(held) if held is not None else None

    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and not self.closed
            and not self.transport.is_closing()
        )
