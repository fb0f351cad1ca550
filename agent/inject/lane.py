"""The proxy's fast lane: the common MCP request sent and answered from the read callbacks.

An MCP call is one JSON-RPC POST that arrives in one read, and its answer comes back in one
read. For that request the proxy's full path (parse into a head, a coroutine deciding,
render the head again) costs several times what relaying it does. The lane takes a read
that is one whole request needing nothing awaited (token cached, upstream connection pooled,
no body to decide) and nothing changed (no credentials, connection fields, expectation or
upgrade of the workload's: http1.REQUEST_OFF_LANE), sends it upstream as read with the
credential fields spliced in after its last field, and finishes it when the upstream side
has relayed the answer (UpstreamSide._verbatim, or its parser for anything else).

Every check of the full path is made here too: the identity re-check, the token, the pool
key. Anything else declines (offer() returns False) and the read goes to the parser and the
serving coroutine, which decides it afresh: the lane never half-handles a request.

One lane per workload connection (Proxy._serve makes it once the connection's identity is
known); it holds what is the same for every request on it, and the one request in flight.
"""

from __future__ import annotations

import time
from typing import Any

from agent.inject import http1
from agent.inject.flows import ClientSide, UpstreamSide
from agent.inject.record import AuditBase
from agent.inject.redirect import RedirectInfo
from agent.inject.upstreams import Upstream
from agent.oauth.tokens import EXPIRY_SKEW_SECONDS
from agent.observe.logging import get_logger

log = get_logger("inject.lane")


class FastLane:
    __slots__ = ("proxy", "client", "info", "up", "ident", "fragment", "key", "broker",
                 "token", "started", "audit_base", "_memo", "_memo_gen", "_memo_until",
                 "_held", "_held_since")

    # how long a token from the cache is reused without asking it again, at most (while the
    # cache's generation says no token changed, and never past the token's own validity)
    TOKEN_MEMO_SECONDS = 1.0

    def __init__(self, proxy: Any, client: ClientSide, info: RedirectInfo, up: Upstream,
                 ident: Any, fragment: str, key: tuple):
        self.proxy = proxy            # agent.inject.proxy.Proxy: its decisions and records
        self.client, self.info, self.up, self.ident = client, info, up, ident
        self.fragment, self.key = fragment, key
        self.broker = up.mode != "passthrough"
        # the request in flight (one at a time: the client side offers nothing meanwhile)
        self.token = None
        self.started = 0.0
        self.audit_base: AuditBase | None = None
        # the upstream connection this workload connection last used, held for its next
        # request instead of going through the pool (release() gives it back)
        self._held: UpstreamSide | None = None
        self._held_since = 0.0
        self._memo = None                 # the token last found in the cache
        self._memo_gen = -1
        self._memo_until = 0.0

    def _token(self):
        """The cached token for this connection's identity and server, or None (then the
        coroutine awaits one). Asking the cache costs as much as relaying a request, so
        its answer is kept while no cached token has changed, for at most a second."""
        oauth = self.proxy.oauth
        now = time.monotonic()
        if self._memo_gen == oauth.cache.generation and now < self._memo_until:
            oauth.m_hit.inc()
            return self._memo
        token = oauth.cached_token(self.ident, self.up.name)
        if token is not None:
            self._memo, self._memo_gen = token, oauth.cache.generation
            self._memo_until = now + min(self.TOKEN_MEMO_SECONDS,
                                         token.expires_at - EXPIRY_SKEW_SECONDS
                                         - time.time())
        return token

    def _take(self) -> UpstreamSide | None:
        conn, self._held = self._held, None
        pool = self.proxy.pool
        if conn is not None:
            if pool.usable(conn, self._held_since):
                return conn
            conn.transport.close()   # idle too long: the server may be closing it
        return pool.get(self.key)

    def _hold(self, conn: UpstreamSide) -> None:
        self._held, self._held_since = conn, self.proxy.pool.now()

    def release(self) -> None:
        """The workload connection has ended: its held upstream connection goes back to the
        pool (as idle since it was last used), or is closed if it has been idle too long."""
        conn, self._held = self._held, None
        if conn is not None and not conn.closed:
            self.proxy.pool.put(self.key, conn, since=self._held_since)

    def offer(self, data: bytes) -> bool:
        """Send data upstream if it is one whole request the lane can take; else False,
        with nothing sent, taken or changed."""
        client, proxy = self.client, self.proxy
        whole = client.whole
        if not whole.one(data) or not whole.keep_alive or whole.method in (b"HEAD",
                                                                          b"CONNECT"):
            return False
        end = whole.head_end
        if http1.REQUEST_OFF_LANE.search(data, 0, end + 2) is not None:
            return False
        broker = self.broker
        if broker and proxy.policy is not None and whole.method == b"POST":
            return False   # the body is decided on the coroutine's path
        token = self._token() if broker else None
        if broker and token is None:
            return False
        if not proxy.image_current(self.info, client):   # the full path denies and closes
            return False
        started = time.perf_counter()
        path = whole.url.decode("latin-1")
        method = whole.method.decode()
        if broker:
            if token.token_type != "DPoP":   # the same field for every request
                fields = token.authorization_field
            else:
                try:
                    fields = b"".join([b"\r\n%s: %s" % nv for nv in
                                       proxy.credentials(token, method, self.up, path)])
                except Exception:
                    log.exception("credentials for a request failed; taking the full path")
                    return False
            data = data[:end] + fields + data[end:]
        # last: nothing declines once an upstream connection is taken (its idle time stays
        # what it was: see release())
        conn = self._take()
        if conn is None:
            return False
        self.token, self.started = token, started
        self.audit_base = AuditBase({"method": method, "path": path.split("?", 1)[0]},
                                    self.fragment)
        client.fast_inflight = True
        conn.begin(client, on_done=self.finish)
        conn.send(data)
        conn.sent()
        proxy.rec.m_added.observe(time.perf_counter() - started)
        return True

    def finish(self, conn: UpstreamSide) -> None:
        """The upstream side ended the exchange (answered, cut short, or failed)."""
        client = self.client
        client.fast_inflight = False
        try:
            if not self.proxy.exchanged(conn, True, client, self.up, self.ident, self.token,
                                        self.key, self.audit_base, self.started,
                                        hold=self._hold) or client.draining:
                client.close()
        except Exception:
            log.exception("finishing a request failed; connection closed")
            client.close()
        self.token = self.audit_base = None
        client.wake()
