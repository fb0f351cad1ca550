"""One request's exchange with its MCP server, once the proxy has decided to forward it.

An upstream connection (an idle one of the same identity and server from the pool, or a new
one), the request sent (head and body in one write when they are at hand), the answer
streamed back to the workload as it arrives (agent/inject/flows.py), then the exchange
accounted for: the answer when the server gave none, the connection back to the pool, the
audit record and the metrics. The full path (proxy.py) awaits run(); the fast lane
(lane.py) sends its request itself and calls finished() from the upstream's callback.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from typing import Any

from agent.config import InjectSection
from agent.inject import http1
from agent.inject.bodies import EventSource, drain_body
from agent.inject.flows import ClientSide, UpstreamSide
from agent.inject.http1 import BODY, END, LAST_CHUNK, Head, chunk
from agent.inject.ports import Tokens
from agent.inject.record import AuditBase, Recorder
from agent.inject.served import Served
from agent.inject.upstreams import Pool, Upstream, connect
from agent.oauth.tokens import Token

READ_SIZE = 65536


def reply_now(client: ClientSide, status: int, reason: bytes, error: str, **extra: Any) -> None:
    """Answer the workload with a JSON error body: {"error": error, **extra}."""
    body = json.dumps({"error": error, **extra}).encode()
    client.write(http1.simple_response(status, reason, body))


async def reply(client: ClientSide, status: int, reason: bytes, error: str, **extra: Any) -> None:
    reply_now(client, status, reason, error, **extra)
    await client.drain()


class Exchanges:
    def __init__(
        self, cfg: InjectSection, rec: Recorder, oauth: Tokens, ssl_context: ssl.SSLContext
    ):
        self.cfg = cfg
        self.rec = rec
        self.oauth = oauth  # told of a token the server refused (invalid_token)
        self.ssl_context = ssl_context
        self.pool = Pool(cfg.upstream_pool_size, max_idle=cfg.upstream_idle_seconds)

    def close(self) -> None:
        self.pool.close()

    async def run(
        self,
        head: Head,
        src: EventSource,
        served: Served,
        token: Token | None,
        audit_base: AuditBase,
        started: float,
    ) -> bool:
        """Send head, and the body from src, to served's server and relay the answer;
        returns whether the workload's connection stays open. token: the credential added
        (None: forwarded without one); started: when the request's handling began."""
        client, up, key = served.client, served.up, served.key
        pooled = self.pool.get(key)
        try:
            conn = pooled if pooled is not None else await self._connect(up)
        except OSError as e:
            if isinstance(e, TimeoutError):  # asyncio's: no text of its own
                e = TimeoutError(
                    f"no connection within {self.cfg.upstream_connect_timeout_seconds:g} s"
                )
            await drain_body(src)
            self.rec.count(up, "upstream_unreachable")
            self.rec.audit_event("request.failed", audit_base, reason=f"upstream unreachable: {e}")
            await reply(
                client,
                502,
                b"Bad Gateway",
                "credless: the MCP server is unreachable",
                detail=str(e),
            )
            return head.keep_alive
        # from here the response streams to the workload as it arrives
        conn.begin(client, close_client=not head.keep_alive, bodiless=head.method == b"HEAD")
        # one write for head and body when they are at hand: a send(2) per piece costs more
        # than the proxying; large bodies still go out in 64 KiB steps
        out = bytearray(head.request_bytes())
        try:
            while True:
                ev = await src.next()  # inline, not body_event: this loop runs per request
                if ev is None:
                    raise ConnectionError("the workload closed the connection inside a request")
                if ev[0] == BODY:
                    data = ev[1]
                    out += chunk(data) if head.chunked else data
                    if len(out) >= READ_SIZE:
                        conn.send(bytes(out))
                        out.clear()
                        await conn.drain()
                elif ev[0] == END:
                    if head.chunked:
                        out += LAST_CHUNK
                    break
        except BaseException:
            conn.abort()
            raise
        conn.send(bytes(out))
        conn.sent()
        await conn.finished()
        keep = self.finished(conn, head.keep_alive, served, token, audit_base, started)
        await client.drain()
        return keep

    async def _connect(self, up: Upstream) -> UpstreamSide:
        return await connect(
            up,
            self.ssl_context,
            self.cfg.upstream_connect_timeout_seconds,
            self.rec.upstream_connected,
        )

    def finished(
        self,
        conn: UpstreamSide,
        keep_alive: bool,
        served: Served,
        token: Token | None,
        audit_base: AuditBase,
        started: float,
        hold: Callable[[UpstreamSide], None] | None = None,
    ) -> bool:
        """After an exchange: the failure answer if there was no response, the pool, the
        audit event and the metrics. keep_alive: the workload's request allows another on
        its connection; hold(conn): takes a reusable upstream connection instead of the
        pool. Returns whether the workload's connection stays open.
        Synchronous: it also runs from the upstream's callback (agent/inject/lane.py)."""
        client, up = served.client, served.up
        status = conn.status
        if conn.client_gone:  # no one to answer: the exchange was aborted for it
            self.rec.count(up, "workload_closed")
            self.rec.audit_event(
                "request.aborted",
                audit_base,
                status=status or None,
                reason="the workload closed its connection before its answer "
                "ended; the server's side was closed too",
            )
            return False
        if not status and conn.timed_out:
            self.rec.count(up, "upstream_timeout")
            limit = f"{self.cfg.upstream_timeout_seconds:g} s"
            self.rec.audit_event(
                "request.failed", audit_base, reason=f"the MCP server did not answer within {limit}"
            )
            reply_now(
                client,
                504,
                b"Gateway Timeout",
                f"credless: the MCP server did not answer within {limit}",
            )
            return keep_alive
        if not status:
            conn.abort()
            self.rec.count(up, "upstream_closed")
            self.rec.audit_event(
                "request.failed",
                audit_base,
                reason="the MCP server closed the connection without answering",
            )
            reply_now(
                client,
                502,
                b"Bad Gateway",
                "credless: the MCP server closed the connection without answering",
            )
            return False
        self.rec.m_upstream.labels(up.name).observe(conn.head_at - conn.sent_at)
        # a 401 is parsed, not relayed verbatim (UpstreamSide._verbatim): its challenge is here
        if status == 401 and token is not None and conn.head is not None:
            challenge = conn.head.get(b"www-authenticate") or b""
            if b"invalid_token" in challenge:
                self.oauth.invalidate(served.holder(), up.name, token)
        keep = conn.complete and keep_alive and not conn.close_delimited
        if conn.reusable():
            if hold is not None:
                hold(conn)
            else:
                self.pool.put(served.key, conn)
        else:
            conn.transport.close()
        if not conn.complete:  # cut short: closing tells the workload the answer is partial
            self.rec.count(up, "upstream_closed")
            return False
        self.rec.count(up, "injected" if token else "forwarded")
        self.rec.request_done(
            audit_base, status, token, round((time.perf_counter() - started) * 1000, 2)
        )
        return keep
