"""The proxy's fast lane: the common MCP request sent and answered from the read callbacks.

An MCP call is one JSON-RPC POST that arrives in one read, and its answer comes back in one
read. For that request the proxy's full path (parse into a head, a coroutine deciding,
render the head again) costs several times what relaying it does. The lane takes a read
that is one whole request, asks agent/inject/decide.py about it (the same decision the full
path asks for), and when the verdict is to forward and needs nothing the lane cannot do —
nothing awaited (token cached, upstream connection at hand), no body to decide, nothing of
the workload's to remove (no credentials, connection fields, expectation, upgrade or framing
other than Content-Length: request.LANE_CANNOT) — sends it upstream as read with the
credential fields spliced in after its last field, and finishes it when the upstream side
has relayed the answer (UpstreamSide._verbatim, or its parser for anything else).

The lane has no admission rule of its own: what it declines (offer() returns False) goes to
the parser and the serving coroutine, which asks the same decision and carries it out
(including every refusal): the lane never half-handles a request.

A 401 asking for a DPoP nonce (agent/inject/exchange.py) is answered here too: the lane still
has the whole request as read, so it sends it again once, with a fresh proof carrying the
nonce, on the same upstream connection if it stays open, else on a pooled or new one (a
task awaits the connection; the workload's connection offers nothing meanwhile).

One lane per workload connection (Proxy._serve makes it once the connection's identity is
known); it holds what is the same for every request on it, and the one request in flight.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from agent.inject import decide
from agent.inject.flows import ClientSide, UpstreamSide
from agent.inject.record import AuditBase
from agent.inject.served import Served
from agent.oauth.tokens import EXPIRY_SKEW_SECONDS, Token
from agent.observe.logging import get_logger

if TYPE_CHECKING:  # proxy.py makes the lanes: a run-time import would be circular
    from agent.inject.proxy import Proxy

log = get_logger("inject.lane")


def _canonical_request_line(data: bytes, method: bytes, target: bytes) -> bool:
    """Whether data starts with `method SP target SP HTTP/1.1 CRLF`, exactly as the full path
    renders a request line. llhttp also accepts other spellings of it (two spaces, another
    protocol name such as RTSP/1.1 read as HTTP/1.1, leading empty lines): the lane relays
    the line as read, so it takes only the one every server reads alike."""
    n = len(method)
    end = n + 1 + len(target)
    return (
        data.startswith(method)
        and data[n : n + 1] == b" "
        and data.startswith(target, n + 1)
        and data.startswith(b" HTTP/1.1\r\n", end)
    )


class FastLane:
    __slots__ = (
        "_again",
        "_held",
        "_held_since",
        "_memo",
        "_memo_gen",
        "_memo_until",
        "_sent_again",
        "audit_base",
        "client",
        "proxy",
        "request",
        "served",
        "started",
        "token",
        "up",
    )

    # how long a token from the cache is reused without asking it again, at most (while the
    # cache's generation says no token changed, and never past the token's own validity)
    TOKEN_MEMO_SECONDS = 1.0

    def __init__(self, proxy: Proxy, served: Served):
        self.proxy = proxy  # its caller check, pool and records
        self.served = served
        self.client, self.up = served.client, served.up
        # the request in flight (one at a time: the client side offers nothing meanwhile)
        self.token: Token | None = None
        self.started = 0.0
        self.audit_base = AuditBase({}, served.fragment)  # the one in flight, or the last
        # the upstream connection this workload connection last used, held for its next
        # request instead of going through the pool (release() gives it back)
        self._held: UpstreamSide | None = None
        self._held_since = 0.0
        self._memo: Token | None = None  # the token last found in the cache
        self._memo_gen = -1
        self._memo_until = 0.0
        # the DPoP request in flight as read, (bytes, head end, method, path), to send again
        # for a nonce; None: nothing to send again (not DPoP, or sent again already)
        self.request: tuple[bytes, int, str, str] | None = None
        self._again: asyncio.Task[None] | None = None  # connecting to send it again
        self._sent_again = False  # the request in flight is the one sent again

    def _token(self) -> Token | None:
        """The cached token for this connection's identity and server, or None (then the
        coroutine awaits one). Asking the cache costs as much as relaying a request, so
        its answer is kept while no cached token has changed, for at most a second."""
        oauth = self.proxy.oauth
        now = time.monotonic()
        if self._memo_gen == oauth.cache.generation and now < self._memo_until:
            oauth.m_hit.inc()
            return self._memo
        token = oauth.cached_token(self.served.holder(), self.up.name)
        if token is not None:
            self._memo, self._memo_gen = token, oauth.cache.generation
            self._memo_until = now + min(
                self.TOKEN_MEMO_SECONDS, token.expires_at - EXPIRY_SKEW_SECONDS - time.time()
            )
        return token

    def _take(self) -> UpstreamSide | None:
        conn, self._held = self._held, None
        pool = self.proxy.pool
        if conn is not None:
            if pool.usable(conn, self._held_since):
                return conn
            conn.transport.close()  # idle too long: the server may be closing it
        return pool.get(self.served.key)

    def _hold(self, conn: UpstreamSide) -> None:
        self._held, self._held_since = conn, self.proxy.pool.now()

    def release(self) -> None:
        """The workload connection has ended: its held upstream connection goes back to the
        pool (as idle since it was last used), or is closed if it has been idle too long."""
        conn, self._held = self._held, None
        if conn is not None and not conn.closed:
            self.proxy.pool.put(self.served.key, conn, since=self._held_since)

    def offer(self, data: bytes) -> bool:
        """Send data upstream if it is one whole request the lane can take; else False,
        with nothing sent, taken or changed."""
        client, proxy = self.client, self.proxy
        whole = client.whole
        if not whole.one(data) or not whole.keep_alive or whole.method in (b"HEAD", b"CONNECT"):
            return False
        if not _canonical_request_line(data, whole.method, whole.url):
            return False  # relayed as read, it must be the line the full path would write
        end = whole.head_end
        if end > client.max_head or data.count(b"\r\n", 0, end) > client.max_fields:
            return False  # the parser refuses it (431)
        req = decide.Request.from_read(data, end, whole.method, whole.url)
        if req is None:  # a field of the workload's to remove or act on: the full path
            return False
        if self.up.send_host is not None:  # Host is rewritten (workload_url): the full path
            return False
        verdict = decide.decide(
            req, self.up, proxy.caller(self.served), proxy.cfg, proxy.policy, proxy.phantom
        )
        if verdict.action != decide.FORWARD or verdict.read_body:
            return False  # the full path answers it, or reads its body to decide
        token = None
        if verdict.credential:
            token = self._token()
            if token is None:
                return False
        started = time.perf_counter()
        path = whole.url.decode("latin-1")
        method = whole.method.decode()
        request = None
        if token is not None:
            if token.token_type != "DPoP":  # noqa: S105 — the same field for every request
                fields = token.authorization_field
            else:
                request = (data, end, method, path)
                proof = self._proof_fields(token, method, path)
                if proof is None:
                    return False
                fields = proof
            data = data[:end] + fields + data[end:]
        # last: nothing declines once an upstream connection is taken (its idle time stays
        # what it was: see release())
        conn = self._take()
        if conn is None:
            return False
        self.token, self.started, self.request = token, started, request
        self._sent_again = False
        self.audit_base = AuditBase(
            {"method": method, "path": path.split("?", 1)[0]}, self.served.fragment, req
        )
        client.fast_inflight = True
        conn.begin(
            client,
            on_done=self.finish,
            hold_401=token is not None,
            watch_nonce=request is not None,
        )
        conn.send(data)
        conn.sent()
        proxy.rec.m_added.observe(time.perf_counter() - started)
        return True

    def _proof_fields(self, token: Token, method: str, path: str) -> bytes | None:
        """The credential fields of a DPoP request, spliced after its last field (None: the
        proof could not be made; the full path takes the request)."""
        try:
            return b"".join(
                [b"\r\n%s: %s" % nv for nv in self.proxy.credentials(token, method, self.up, path)]
            )
        except Exception:
            log.exception("credentials for a request failed; taking the full path")
            return None

    def _send_again(self, conn: UpstreamSide) -> bool:
        """The server asked for a DPoP nonce (Challenges.nonce_retry said so): send the request
        again, once, with a proof carrying it. False: it cannot be (nothing kept, no proof);
        the 401 then goes to the workload."""
        request, token = self.request, self.token
        self.request = None  # once only
        if request is None or token is None:
            return False
        data, end, method, path = request
        fields = self._proof_fields(token, method, path)
        if fields is None:
            return False
        data = data[:end] + fields + data[end:]
        self.proxy.exchanges.challenges.retrying(conn, self.audit_base)
        self._sent_again = True
        if conn.reusable():
            self._send(conn, data)
            return True
        conn.transport.close()
        pooled = self.proxy.pool.get(self.served.key)
        if pooled is not None:
            self._send(pooled, data)
        else:
            self._again = asyncio.get_running_loop().create_task(self._connect_and_send(data))
        return True

    def _send(self, conn: UpstreamSide, data: bytes) -> None:
        conn.begin(self.client, on_done=self.finish, hold_401=True, watch_nonce=True)
        conn.send(data)
        conn.sent()

    async def _connect_and_send(self, data: bytes) -> None:
        client, exchanges = self.client, self.proxy.exchanges
        try:
            try:
                conn = await exchanges.connect(self.up)
            except OSError as e:
                await exchanges.unreachable(e, client, self.up, self.audit_base)
                self._done(client, close=False)
                return
            if client.closed:  # the workload left meanwhile: nothing to send for
                self.proxy.pool.put(self.served.key, conn)
                self._done(client, close=True)
                return
            self._send(conn, data)
        except Exception:
            log.exception("sending a request again for a DPoP nonce failed; connection closed")
            self._done(client, close=True)
        finally:
            self._again = None

    def finish(self, conn: UpstreamSide) -> None:
        """The upstream side ended the exchange (answered, cut short, or failed)."""
        client = self.client
        exchanges = self.proxy.exchanges
        token = self.token
        try:
            retried = self._sent_again
            if (
                self.request is not None
                and token is not None
                and exchanges.challenges.nonce_retry(
                    conn, self.served, token, self.audit_base, True
                )
                and self._send_again(conn)
            ):
                return  # still in flight: finish() comes again with its answer
            keep = exchanges.finished(
                conn,
                True,
                self.served,
                token,
                self.audit_base,
                self.started,
                hold=self._hold,
                retried=retried,
            )
            self._done(client, close=not keep or client.draining)
        except Exception:
            log.exception("finishing a request failed; connection closed")
            self._done(client, close=True)

    def _done(self, client: ClientSide, close: bool) -> None:
        """The request in flight is over: the workload's connection takes the next one."""
        if close:
            client.close()
        client.fast_inflight = False
        self.token = self.request = None
        client.wake()
