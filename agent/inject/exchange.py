"""One request's exchange with its MCP server, once the proxy has decided to forward it.

An upstream connection (an idle one of the same identity and server from the pool, or a new
one), the request sent (head and body in one write when they are at hand), the answer
streamed back to the workload as it arrives (agent/inject/flows.py), then the exchange
accounted for: the answer when the server gave none, the connection back to the pool, the
audit record and the metrics. The full path (proxy.py) awaits run(); the fast lane
(lane.py) sends its request itself and calls finished() from the upstream's callback.

A 401 to a request that carried credless's credential is held back (flows.py) and read
(agent/inject/challenges.py); this module sends the request again when that says so:
- `DPoP error="use_dpop_nonce"` with a DPoP-Nonce (RFC 9449 §9): the nonce is remembered for
  the server and the request sent once more with a fresh proof carrying it (audited as
  request.retried), if credless still has its body: always for the fast lane (the whole read)
  and for a body read for policy, and for a streamed body up to retry_body_limit bytes, kept
  as it is sent; a longer one's 401 goes to the workload, and its next request carries the
  nonce. Never more than once: a second demand is answered as a failure;
- a challenge naming only a scheme credless did not use (DPoP when it sent Bearer, Bearer
  when it sent DPoP): not retried, answered 502 with the diagnosis (request.failed);
- anything else (invalid_token: the token is dropped from the cache) goes to the workload.
A DPoP-Nonce on any answer to a DPoP request is remembered for that server's next proofs.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from typing import Any

from agent.config import InjectSection
from agent.inject import answers, decide, upstreams
from agent.inject.answered import EventStream
from agent.inject.bodies import EventSource, drain_body
from agent.inject.challenges import Challenges
from agent.inject.decide import Caller
from agent.inject.flows import ClientSide, UpstreamSide
from agent.inject.http1 import BODY, END, LAST_CHUNK, Head, chunk
from agent.inject.ports import Tokens
from agent.inject.record import AuditBase, Recorder
from agent.inject.served import Served
from agent.inject.upstreams import Pool, Upstream
from agent.oauth.tokens import Token
from agent.observe.logging import get_logger

log = get_logger("inject.exchange")

READ_SIZE = 65536


def reply_now(
    client: ClientSide,
    status: int,
    reason: bytes,
    error: str,
    base: AuditBase | None = None,
    outcome: str = "",
    event_id: str | None = None,
    **extra: Any,
) -> None:
    """Answer the workload in the server's place: a JSON-RPC error keeping the ids of a
    JSON-RPC request (base.asked), else {"error": error, **extra}; either names the audit
    event_id (agent/inject/answers.py, docs/errors.md)."""
    asked = answers.of(base.asked) if base is not None else answers.PLAIN
    client.write(
        answers.response(asked, status, reason, error, outcome=outcome, event_id=event_id, **extra)
    )


def answered(conn: UpstreamSide, audit_base: AuditBase) -> bool:
    """Whether the event-stream answer to a POST the workload closed its connection under
    had given it its answer (agent/inject/answered.py): relayed up to the end of an event,
    with a response for each of its requests (their ids, when its body was read; else at
    least one). A GET stream (the session's notifications) answers no request: a workload
    leaving it ends it before the server did, which stays request.aborted."""
    events = getattr(conn, "events", None)  # UpstreamSide.events (flows.py), if it keeps them
    if not isinstance(events, EventStream) or not conn.status or not events.between_events:
        return False
    if audit_base.fields.get("method") != "POST":
        return False
    asked = audit_base.asked
    if isinstance(asked, answers.Asked) and asked.calls:
        wanted = {json.dumps(c.id) for c in asked.calls if c.is_request and c.id is not None}
        return bool(wanted) and wanted <= events.responses
    return bool(events.responses)


def send(conn: UpstreamSide, data: bytes) -> None:
    """Send data on conn unless the server has closed or reset it. The server may end the
    connection at any point of a request: before its body has been read, while it is
    written, or after (asyncio may already have run connection_lost, whose transport then
    refuses writes with RuntimeError, which once escaped and left the workload without an
    answer). The exchange goes on regardless: the rest of the request is still read from
    the workload, and finished() answers it (502, audited) from what the server did."""
    if not conn.closed:
        conn.send(data)


async def reply(client: ClientSide, *args: Any, **extra: Any) -> None:
    """reply_now (same arguments), then wait until the workload's side takes it."""
    reply_now(client, *args, **extra)
    await client.drain()


class Exchanges:
    def __init__(
        self,
        cfg: InjectSection,
        rec: Recorder,
        oauth: Tokens,
        ssl_context: ssl.SSLContext,
        retry_body_limit: int = 1 << 20,
        clock: Callable[[], float] = time.monotonic,
        caller: Callable[[Served], Caller] | None = None,
    ):
        self.cfg = cfg
        # who asks on a connection, as of now (Proxy.caller): asked again for each piece of
        # a body that arrives after its head was decided
        self.caller = caller
        self.rec = rec
        self.oauth = oauth
        self.ssl_context = ssl_context
        self.pool = Pool(cfg.upstream_pool_size, cfg.upstream_idle_seconds, clock)
        self.challenges = Challenges(rec, oauth, retry_body_limit)

    @property
    def retry_body_limit(self) -> int:
        """The longest streamed request body kept to send again for a DPoP nonce."""
        return self.challenges.retry_body_limit

    @retry_body_limit.setter
    def retry_body_limit(self, limit: int) -> None:
        self.challenges.retry_body_limit = limit

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
        mask: bytes | None = None,
    ) -> bool:
        """Send head, and the body from src, to served's server and relay the answer;
        returns whether the workload's connection stays open. token: the credential added
        (None: forwarded without one); started: when the request's handling began; mask: a
        value credless put into the request, never relayed back (flows.py)."""
        client, up, key = served.client, served.up, served.key
        pooled = self.pool.get(key)
        try:
            conn = pooled if pooled is not None else await self.connect(up)
        except OSError as e:
            await drain_body(src)
            await self.unreachable(e, client, up, audit_base)
            return head.keep_alive
        dpop = token is not None and token.token_type == "DPoP"  # noqa: S105 — a type name
        # from here the response streams to the workload as it arrives
        self._begin(conn, client, head, token, mask)
        # one write for head and body when they are at hand: a send(2) per piece costs more
        # than the proxying; large bodies still go out in 64 KiB steps
        if up.send_host is not None:  # reached at its workload_url: Host names the server
            head.remove(b"host")
            head.add(b"Host", up.send_host)
        out = bytearray(head.request_bytes())
        # the body as sent, to send again if the server asks for a DPoP nonce (None: too long)
        kept: bytearray | None = bytearray() if dpop else None
        limit = self.retry_body_limit
        went_up = False  # part of the request (its head first) is at the server
        answered = False  # the server answered whole before the body was sent whole
        try:
            while True:
                ev = await src.next()  # inline, not body_event: this loop runs per request
                if ev is None:
                    if went_up:  # with credless's credential: on the record, like any other
                        self.rec.count(up, "workload_closed")
                        self.rec.audit_event(
                            "request.aborted",
                            audit_base,
                            reason="the workload closed its connection inside the request's "
                            "body, after its head had gone to the server; the server's side "
                            "was closed too",
                            token_sha256=token.fingerprint if token is not None else None,
                        )
                    raise ConnectionError("the workload closed the connection inside a request")
                # the server answered whole before the body was sent whole: it may read what
                # follows as its next request, one credless never decided. The rest of the
                # body is read (the workload's connection stays in step) and dropped; the
                # connection is closed below, never pooled
                answered = answered or (went_up and conn.complete)
                if ev[0] == BODY:
                    self._still_theirs(served, audit_base)
                    if answered:
                        out, kept = bytearray(), None
                        continue
                    data = chunk(ev[1]) if head.chunked else ev[1]
                    out += data
                    if kept is not None:
                        kept += data
                        if len(kept) > limit:
                            kept = None
                    if len(out) >= READ_SIZE:
                        send(conn, bytes(out))
                        went_up = True
                        out.clear()
                        await conn.drain()
                elif ev[0] == END:
                    if answered:
                        break
                    if head.chunked:
                        out += LAST_CHUNK
                        if kept is not None:
                            kept += LAST_CHUNK
                    break
        except BaseException:
            conn.abort()
            raise
        if answered:
            log.debug("answered before its body was sent whole; the rest dropped", server=up.name)
            conn.transport.close()
        else:
            send(conn, bytes(out))
        conn.sent()
        await conn.finished()
        retried = False
        if token is not None and self.challenges.nonce_retry(
            conn, served, token, audit_base, kept is not None
        ):
            retried = True
            again = await self._again(conn, head, bytes(kept or b""), served, token, audit_base)
            if again is None:
                return head.keep_alive
            conn = again
        keep = self.finished(
            conn, head.keep_alive, served, token, audit_base, started, retried=retried
        )
        await client.drain()
        return keep

    def _still_theirs(self, served: Served, audit_base: AuditBase) -> None:
        """A body read after its head was decided was written by the caller it was decided
        for: else (another process wrote it, the image changed) the request is refused and
        audited, and ConnectionError closes both connections, the upstream one unfinished."""
        if self.caller is None:
            return
        caller = self.caller(served)
        if caller.current:
            return
        verdict = decide.stale(caller)
        self.rec.count(served.up, verdict.outcome)
        self.rec.audit_event("request.denied", audit_base, reason=verdict.message)
        raise ConnectionError(verdict.message)

    def _begin(
        self,
        conn: UpstreamSide,
        client: ClientSide,
        head: Head,
        token: Token | None,
        mask: bytes | None = None,
    ) -> None:
        conn.begin(
            client,
            close_client=not head.keep_alive,
            bodiless=head.method == b"HEAD",
            hold_401=token is not None,
            watch_nonce=token is not None and token.token_type == "DPoP",  # noqa: S105
            mask=mask,
        )

    async def _again(
        self,
        conn: UpstreamSide,
        head: Head,
        body: bytes,
        served: Served,
        token: Token,
        audit_base: AuditBase,
    ) -> UpstreamSide | None:
        """Send head and body (as framed before) again with a fresh proof, which carries the
        nonce the server just gave; the connection it went on, or None if none could be
        had (the workload has been answered)."""
        up, client = served.up, served.client
        self.challenges.retrying(conn, audit_base)
        head.remove(b"dpop")
        url = up.origin + head.target.decode("latin-1").split("?", 1)[0]
        proof = self.oauth.dpop_key(token.spiffe_id).proof(
            head.method.decode(), url, access_token=token.access_token
        )
        head.add(b"DPoP", proof.encode())
        if not conn.reusable():
            conn.transport.close()
            pooled = self.pool.get(served.key)
            try:
                conn = pooled if pooled is not None else await self.connect(up)
            except OSError as e:
                await self.unreachable(e, client, up, audit_base)
                return None
        self._begin(conn, client, head, token)
        send(conn, head.request_bytes() + body)
        conn.sent()
        await conn.finished()
        return conn

    async def unreachable(
        self, e: OSError, client: ClientSide, up: Upstream, audit_base: AuditBase
    ) -> None:
        """The MCP server could not be reached: counted, audited, and the workload answered
        (the full path and the fast lane both end here)."""
        if isinstance(e, TimeoutError):  # asyncio's: no text of its own
            e = TimeoutError(
                f"no connection within {self.cfg.upstream_connect_timeout_seconds:g} s"
            )
        self.rec.count(up, "upstream_unreachable")
        event_id = self.rec.audit_answered(
            "request.failed", audit_base, reason=f"upstream unreachable: {e}"
        )
        await reply(
            client,
            502,
            b"Bad Gateway",
            "credless: the MCP server is unreachable",
            audit_base,
            "upstream_unreachable",
            event_id,
            detail=str(e),
        )

    async def connect(self, up: Upstream) -> UpstreamSide:
        """A new connection to the MCP server, with this proxy's TLS and connect timeout."""
        return await upstreams.connect(
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
        retried: bool = False,
    ) -> bool:
        """After an exchange: the failure answer if there was no response, the held 401
        read (the module's docstring), the pool, the audit event and the metrics.
        keep_alive: the workload's request allows another on its connection; hold(conn):
        takes a reusable upstream connection instead of the pool; retried: this was the
        request sent again for a DPoP nonce. Returns whether the workload's connection
        stays open. Synchronous: it also runs from the upstream's callback (lane.py)."""
        client, up = served.client, served.up
        status = conn.status
        if conn.client_gone and answered(conn, audit_base):
            # the workload left an event stream that had given it its answer: done
            self.rec.count(up, "injected" if token else "forwarded")
            self.rec.request_done(
                audit_base, status, token, round((time.perf_counter() - started) * 1000, 2)
            )
            return False
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
            event_id = self.rec.audit_answered(
                "request.failed", audit_base, reason=f"the MCP server did not answer within {limit}"
            )
            reply_now(
                client,
                504,
                b"Gateway Timeout",
                f"credless: the MCP server did not answer within {limit}",
                audit_base,
                "upstream_timeout",
                event_id,
            )
            return keep_alive
        if not status:
            # closed or reset, at whatever point of the request: the request was read whole
            # all the same (the fast lane's in one read, the full path's to its end), so the
            # workload's connection is where its next request begins and stays open, as it
            # does for an unreachable server. Closing it after this answer (without saying
            # so) once lost the workload its next request: an SDK that sends one at once on
            # the same connection had it reset (httpx ReadError) instead of answered.
            conn.abort()
            self.rec.count(up, "upstream_closed")
            event_id = self.rec.audit_answered(
                "request.failed",
                audit_base,
                reason="the MCP server closed the connection without answering",
            )
            reply_now(
                client,
                502,
                b"Bad Gateway",
                "credless: the MCP server closed the connection without answering",
                audit_base,
                "upstream_closed",
                event_id,
            )
            return keep_alive
        self.rec.m_upstream.labels(up.name).observe(conn.head_at - conn.sent_at)
        if conn.dpop_nonce and token is not None:
            self.challenges.note_nonce(token, up, conn.dpop_nonce)
        # a 401 is parsed, not relayed verbatim (UpstreamSide._verbatim): its challenge is here
        problem = None
        if status == 401 and token is not None and conn.head is not None:
            problem = self.challenges.refused(conn, served, token, retried)
        held = conn.take_held()
        if held is not None and problem is None:
            client.write(held)
        keep = conn.complete and keep_alive and not conn.close_delimited
        if conn.reusable():
            if hold is not None:
                hold(conn)
            else:
                self.pool.put(served.key, conn)
        else:
            conn.transport.close()
        if problem is not None:
            self.rec.count(up, "credential_refused")
            event_id = self.rec.audit_answered(
                "request.failed", audit_base, status=401, reason=problem
            )
            if held is None:  # relayed already (too long to hold)
                return keep
            reply_now(
                client,
                502,
                b"Bad Gateway",
                "credless: the MCP server refused the credential credless sent",
                audit_base,
                "credential_refused",
                event_id,
                detail=problem,
            )
            return keep_alive
        if not conn.complete:  # cut short: closing tells the workload the answer is partial
            self.rec.count(up, "upstream_closed")
            # the request reached the server (with credless's token, if any): on the record
            self.rec.audit_event(
                "request.failed",
                audit_base,
                status=status,
                reason="the MCP server closed its connection before its answer ended; the "
                "workload's connection was closed too, so that the answer reads as cut short",
                token_sha256=token.fingerprint if token is not None else None,
                latency_ms=round((time.perf_counter() - started) * 1000, 2),
            )
            return False
        self.rec.count(up, "injected" if token else "forwarded")
        self.rec.request_done(
            audit_base, status, token, round((time.perf_counter() - started) * 1000, 2)
        )
        return keep
