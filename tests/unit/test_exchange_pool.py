"""The upstream connection an exchange goes on, with real loopback sockets on the agent's
event loop (uvloop): an idle pooled connection the server has closed is never handed out,
even before the loop has run the callback that would say so, and a request whose server
closed or reset mid-way is still sent on (to nowhere) without an error escaping.

Nothing here yields to the loop between the server's close and the check: that is the
moment the agent meets when the FIN and the workload's next request arrive in one turn of
its loop, the request first (tests/integration/test_upstream_resets.py for the rest).
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from agent.inject.exchange import send
from agent.inject.flows import UpstreamSide
from agent.inject.upstreams import Pool, Upstream, connect, quiet

KEY = ("spiffe://example.org/w", "127.0.0.1", 0, "http")


def upstream(port: int) -> Upstream:
    return Upstream("up", "http", "127.0.0.1", port, f"http://127.0.0.1:{port}", "broker", b"/mcp")


def readable(conn: UpstreamSide) -> bool:
    """Whether the agent's end has something to read (the peer's FIN or reset arrived)."""
    fd = conn.transport.get_extra_info("socket").fileno()
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(5000))


def with_connection(
    body: Callable[[UpstreamSide, socket.socket], Awaitable[None]],
) -> None:
    """Run body(conn, peer) on uvloop: conn the agent's side of a fresh connection to a
    loopback server, peer the server's side."""

    async def main() -> None:
        srv = socket.create_server(("127.0.0.1", 0))
        try:
            conn = await connect(
                upstream(srv.getsockname()[1]),
                ssl.create_default_context(),
                5,
                lambda up, kind: None,
            )
            peer, _ = srv.accept()  # already queued: the handshake is done
            try:
                await body(conn, peer)
            finally:
                peer.close()
                conn.transport.abort()
        finally:
            srv.close()

    uvloop.run(main())


def test_a_quiet_idle_connection_is_reused():
    async def body(conn: UpstreamSide, peer: socket.socket) -> None:
        pool = Pool(4)
        pool.put(KEY, conn)
        assert quiet(conn)
        assert pool.get(KEY) is conn

    with_connection(body)


def test_an_idle_connection_the_server_closed_is_not_reused_before_the_loop_knows():
    async def body(conn: UpstreamSide, peer: socket.socket) -> None:
        pool = Pool(4)
        pool.put(KEY, conn)
        peer.close()  # its FIN
        assert readable(conn)  # arrived; the loop has not run since (no await)
        assert not conn.closed and not conn.transport.is_closing()
        assert pool.get(KEY) is None  # and it is closed, not left for the next one
        assert conn.transport.is_closing()

    with_connection(body)


def test_the_lanes_held_connection_the_server_reset_is_not_usable():
    async def body(conn: UpstreamSide, peer: socket.socket) -> None:
        pool = Pool(4)
        since = pool.now()
        assert pool.usable(conn, since)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # a reset
        assert readable(conn)
        assert not pool.usable(conn, since)

    with_connection(body)


def test_sending_on_a_connection_the_server_reset_raises_nothing():
    """asyncio (uvloop) refuses a write on a transport whose connection_lost has run
    (RuntimeError); exchange.send leaves the request's end to finished()."""

    async def body(conn: UpstreamSide, peer: socket.socket) -> None:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        while not conn.closed:  # the loop takes the reset: connection_lost runs
            await asyncio.sleep(0)
        with pytest.raises(RuntimeError):  # what the exchange once let escape
            conn.send(b"more of the body")
        send(conn, b"more of the body")

    with_connection(body)
