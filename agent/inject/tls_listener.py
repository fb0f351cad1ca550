"""The TLS listener: accepts on the proxy's TLS listening socket and tells, by each
connection's first byte, a TLS handshake from plain HTTP sent to an https server's address.

asyncio's own TLS server would consume and drop plain bytes as a failed handshake, with no
word to anyone; so the first byte is peeked at before the handshake. A handshake is served
as any listener's connection is (agent/inject/listeners.py). Plain bytes go to `on_plain`,
which answers 400 saying so (call https://…, or configure the server's workload_url),
audited and counted. The answer is shaped as the proxy's own (agent/inject/answers.py) by the
request's head alone, as far as it arrived in the first read (`asked_by_head`): a JSON POST
(an MCP client) gets a JSON-RPC error, id null, which the SDKs show; any other request, or a
head not whole in that read, the plain body. Both name the audit event. The body is never
read: the connection is not served, so where the request ends is unknown.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.inject import answers, http1
from agent.inject.flows import ClientSide
from agent.inject.redirect import RedirectInfo
from agent.observe.logging import get_logger

log = get_logger("inject.listeners")

TLS_HANDSHAKE = 0x16  # the content type of the record a ClientHello arrives in
HANDSHAKE_SECONDS = 10.0  # for the first byte, then again for the TLS handshake


def _settle(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _first_byte(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """The connection's first byte, left unread (b"": closed before sending any)."""
    while True:
        try:
            return conn.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(conn.fileno(), _settle, ready)
            try:
                await ready
            finally:
                loop.remove_reader(conn.fileno())


@dataclass(frozen=True)
class Arrival:
    """A connection accepted on a TLS listener, named before anything can end it: its
    redirect record is deleted when the workload's socket closes, which a workload refusing
    the certificate does at once."""

    conn: socket.socket
    peer: tuple
    local: tuple
    info: RedirectInfo | None


class TlsListener:
    """Accepts on a TLS listening socket and decides per connection, by its first byte,
    between a TLS handshake (then served as any listener's connection is) and plain bytes
    (then handed to on_plain). asyncio's own TLS server would consume and drop them."""

    def __init__(
        self,
        sock: socket.socket,
        protocol: Callable[[], ClientSide],
        context: ssl.SSLContext,
        lookup: Callable[[tuple, tuple], RedirectInfo | None],
        on_plain: Callable[[Arrival], Awaitable[None]],
        on_failed: Callable[[Arrival, BaseException], None],
    ):
        self.sock = sock
        self._protocol, self._context, self._lookup = protocol, context, lookup
        self._on_plain, self._on_failed = on_plain, on_failed
        self._pending: set[asyncio.Task[None]] = set()
        self._accepting = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(self.sock)
                conn.setblocking(False)
                local = conn.getsockname()
            except OSError as e:  # out of descriptors: the next accept may do
                log.warning("accept on the TLS listener failed", error=str(e))
                await asyncio.sleep(0.1)
                continue
            try:
                info = self._lookup(peer, local)
            except Exception:
                log.exception("looking up a redirect record failed")
                info = None
            task = loop.create_task(self._start(Arrival(conn, peer, local, info)))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _start(self, arrival: Arrival) -> None:
        loop = asyncio.get_running_loop()
        conn = arrival.conn
        try:
            if arrival.info is None:
                # not redirected by the kernel: refused (on_plain says so) before any TLS
                # work, so a process dialling the listener directly costs no handshake
                await self._on_plain(arrival)
                conn.close()
                return
            first = await asyncio.wait_for(_first_byte(loop, conn), HANDSHAKE_SECONDS)
            if first and first[0] != TLS_HANDSHAKE:
                await self._on_plain(arrival)
            elif first:
                await loop.connect_accepted_socket(
                    self._protocol,
                    conn,
                    ssl=self._context,
                    ssl_handshake_timeout=HANDSHAKE_SECONDS,
                )
                return  # the transport owns conn now
        except (OSError, TimeoutError) as e:
            # a workload that does not trust the injection CA ends here: it never gets a
            # byte in clear, and nothing was read from it
            try:
                self._on_failed(arrival, e)
            except Exception:
                log.exception("recording a failed TLS connection failed")
        except asyncio.CancelledError:
            pass
        conn.close()

    def stop_accepting(self) -> None:
        """Accept no more (a new agent accepts on this socket now); connections accepted
        and not yet handshaken go on."""
        self._accepting.cancel()
        self.sock.close()

    def close(self) -> None:
        self._accepting.cancel()
        for t in list(self._pending):
            t.cancel()
        self.sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._accepting, *self._pending, return_exceptions=True)


def asked_by_head(data: bytes, max_head: int, max_fields: int) -> answers.Asked:
    """What a request not served asked (answers.by_head), from the bytes of its first read:
    a JSON POST whose head is whole in them may be JSON-RPC (answered as such, id null);
    anything else, a head cut short or one that does not parse, is answered plainly. Only
    the head is looked at, never the body: its framing was never decided."""
    reader = http1.Reader(max_head=max_head, max_fields=max_fields)
    try:
        events = reader.feed(data)
    except http1.ProtocolError:
        return answers.PLAIN
    for ev in events:
        if ev[0] == http1.HEAD:
            head = ev[1]
            return answers.by_head(head.method, head.get(b"content-type"))
    return answers.PLAIN


async def drain_until_closed(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """Read and drop until the peer closes (after an answer with Connection: close)."""
    while await loop.sock_recv(conn, 65536):
        pass
