"""The injecting proxy: redirected MCP connections in, credentialed requests out.

Per accepted connection: the redirect record (bpf/redirect.c) names the original
destination and the process image that connected; the attestor says who that image is, the
identity manager which SPIFFE ID it holds. Per request: agent/inject/decide.py decides (the
caller still the image and identity it connected as, the request framed unambiguously and
addressed to the configured server, policy), and this module carries the verdict out: the
refusal answered and audited, or the request forwarded with whatever Authorization/DPoP the
workload sent removed and a token for this identity and server added, with a DPoP proof
bound to this request's method and URL. Responses stream back as they arrive (SSE events
reach the client at once).

The I/O is in agent/inject/flows.py (asyncio Protocols); the decision in decide.py; the
answers credless gives in the server's place (a refusal, a malformed or stalled request, no
token) in refusals.py; the exchange with the server, once a request goes, in exchange.py;
the fast lane (lane.py) carries out the same decisions for the common request without a
coroutine. What the proxy asks of the attestor, identities, OAuth, the redirect and policy
is in ports.py.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from agent.attest.selectors import Attestation
from agent.config import InjectSection
from agent.inject import answers, decide, http1
from agent.inject.assertion import AssertionRequests
from agent.inject.bodies import EventSource, Replay, read_body
from agent.inject.decide import FORWARD, Caller, Verdict
from agent.inject.exchange import Exchanges
from agent.inject.flows import ClientSide
from agent.inject.http1 import HEAD, Head, ProtocolError
from agent.inject.lane import FastLane
from agent.inject.phantom import PhantomVerifier
from agent.inject.ports import Attestations, Identities, Policy, RedirectRecords, Tokens
from agent.inject.record import AuditBase, Recorder
from agent.inject.redirect import SENDERS, RedirectInfo
from agent.inject.refusals import malformed, refuse, slow_request, token_failed
from agent.inject.request import Request
from agent.inject.served import Served, changed_since_attested
from agent.inject.timeouts import SLOW_REQUEST, UPSTREAM
from agent.inject.upstreams import Upstream
from agent.oauth.errors import OAuthError
from agent.oauth.tokens import Token
from agent.observe.logging import AuditLog, get_logger
from agent.policy import jsonrpc

log = get_logger("inject.proxy")


class Proxy:
    name = "proxy"

    def __init__(
        self,
        cfg: InjectSection,
        upstreams: dict[tuple[str, int], Upstream],
        redirect: RedirectRecords,
        attestor: Attestations,
        identity: Identities,
        oauth: Tokens,
        audit: AuditLog | None = None,
        registry: CollectorRegistry | None = None,
        ssl_context: ssl.SSLContext | None = None,
        policy: Policy | None = None,
        max_body: int = 1 << 20,
        phantom: PhantomVerifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """clock: the upstream pool's, for how long a connection has been idle."""
        self.cfg = cfg
        self.upstreams = upstreams
        self.redirect = redirect
        self.attestor = attestor
        self.identity = identity
        self.oauth = oauth
        self.policy = policy
        self.phantom = phantom
        self.max_body = max_body
        self.rec = Recorder(audit, registry)
        # a streamed body is kept, up to the policy's limit, for a DPoP nonce retry
        self.exchanges = Exchanges(
            cfg,
            self.rec,
            oauth,
            ssl_context or ssl.create_default_context(),
            max_body,
            clock,
            caller=self.caller,
        )
        self.pool = self.exchanges.pool  # the fast lane holds and gives back connections
        self.assertions = AssertionRequests(
            identity, self.rec, self.exchanges, self.upstream_issuer, max_body
        )

    def close(self) -> None:
        self.exchanges.close()

    # ------------------------------------------------------------ connections
    def expired(self, client: ClientSide, what: str) -> None:
        """Timeouts found client waiting too long for what (agent/inject/timeouts.py)."""
        if what == UPSTREAM:  # the serving coroutine answers 504 (Exchanges.finished)
            upstream = client.upstream
            if upstream is not None:
                upstream.timed_out = True
                upstream.abort()
            return
        if what == SLOW_REQUEST:
            slow_request(self.rec, client, self.cfg.request_timeout_seconds)
        client.close()

    async def handle(self, client: ClientSide, netns: int) -> None:
        """Serve one accepted workload connection (netns: its namespace's cookie)."""
        self.rec.m_active.inc()
        peer = client.transport.get_extra_info("peername")
        local = client.transport.get_extra_info("sockname")
        try:
            info = self.redirect.lookup(peer, local, netns)
            log.debug(
                "accepted connection",
                peer=f"{peer[0]}:{peer[1]}",
                redirected=f"{info.orig_host}:{info.orig_port}" if info else None,
                pid=info.tgid if info else None,
            )
            if info is None:
                # not a connection the kernel redirected (or whose socket is gone): someone
                # dialled the proxy directly, perhaps from a port a workload once used
                self.rec.audit_event(
                    "connection.refused",
                    {
                        "peer": f"{peer[0]}:{peer[1]}",
                        "listener": f"{local[0]}:{local[1]}",
                        "netns": netns,
                    },
                    reason="no redirect record for this connection: it was "
                    "not redirected by the kernel; closed",
                )
                return
            try:
                await self._serve(client, info)
            finally:
                self.redirect.forget(peer, local, info)
        except ConnectionError:
            pass
        except ProtocolError as e:  # not HTTP/1.1 we can frame: answer once and close
            malformed(self.rec, client, e)
        except ssl.SSLError as e:
            self.rec.audit_event(
                "connection.tls_failed",
                {"peer_port": peer[1]},
                reason=f"TLS with the workload failed: {e.reason}",
            )
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("proxy connection failed")
        finally:
            self.rec.m_active.dec()
            client.close()

    async def _serve(self, client: ClientSide, info: RedirectInfo) -> None:
        upstream = self.upstreams.get((info.orig_host, info.orig_port))
        if upstream is None:
            return
        tls = client.transport.get_extra_info("ssl_object") is not None
        if (upstream.scheme == "https") != tls:
            return  # arrived on the wrong listener: never serve https traffic in clear
        loop = asyncio.get_running_loop()
        generation = self.identity.generation
        att = (
            await loop.run_in_executor(
                None, self.attestor.attest_image, info.tgid, info.exec_ns, 1.0
            )
            if info.exec_ns
            else None
        )
        ident = self.identity.resolve(att) if att is not None else None
        parent = None
        if att is not None and ident is not None:
            self.identity.note_use(ident, att)
            parent = self.parent_identity(att)
        who: dict[str, Any] = {
            "pid": info.tgid,
            "start_ns": info.start_ns,
            "exe": att.exe if att else None,
            "cgroup": att.cgroup_path if att else None,
            "spiffe_id": str(ident.spiffe_id) if ident else None,
            "pod": f"{att.pod.namespace}/{att.pod.name}" if att and att.pod else None,
            "parent_spiffe_id": parent,
        }
        fragment = self.rec.fragment(server=upstream.name, mode=upstream.mode, **who)
        client.served = (upstream, fragment)  # for the timeouts' audit events
        selectors = att.selectors if att is not None else frozenset()
        changed = changed_since_attested(info, att) if att is not None else ""
        served = Served(
            client, info, upstream, ident, generation, who, fragment, selectors, changed
        )
        log.debug("connection served", server=upstream.name, mode=upstream.mode, **who)
        lane = None
        if upstream.mode != "assertion":
            lane = FastLane(self, served)
            client.fast = lane.offer
        try:
            await self._serve_requests(served)
        finally:
            if lane is not None:
                lane.release()

    async def _serve_requests(self, served: Served) -> None:
        client = served.client
        while True:
            ev = await client.next()
            if ev is None or client.closed:  # gone: queued requests are not sent for it
                return
            if ev[0] != HEAD:
                continue
            client.busy = True  # no fast path while this request is under way
            try:
                keep = await self._request(ev[1], served)
            finally:
                client.busy = False
            if not keep or client.draining:
                return

    def parent_identity(self, att: Attestation) -> str | None:
        """The SPIFFE ID of the nearest ancestor that has one: this process is its sub-agent
        (also what `credless explain` reports). The ancestors are the images that started
        this one as they were attested then (Attestor.ancestors), so a parent that exited,
        exec'd or double-forked since still limits what its sub-agent may do."""
        for a in self.attestor.ancestors(att):
            ident = self.identity.resolve(a, quiet=True)
            if ident is not None:
                return str(ident.spiffe_id)
        return None

    def image_current(self, info: RedirectInfo, client: ClientSide) -> bool:
        """Whether the process that connected still runs the image it connected with. The
        kernel's answer (a bpf(2) lookup) is kept while the tgid's change counter, read
        first and from mapped memory, stays the same (bpf/process_events.c)."""
        source = self.attestor.source
        mark = source.image_changes(info.tgid)
        if mark is not None and mark == client.image_mark:
            return True
        now = source.kernel_image(info.tgid)
        current = now is not None and now[1] == info.exec_ns
        client.image_mark = mark if current else None
        return current

    def other_sender(self, info: RedirectInfo, client: ClientSide) -> str:
        """What else than the process that connected has written on the connection ("": only
        it). The kernel marks the record at each write (bpf/redirect.c); the record is read
        (a bpf(2) lookup) only when the connection's change counter, read first and from
        mapped memory, has moved since the last clean answer. A record gone is not clean."""
        redirect = self.redirect
        mark = redirect.sender_changes(info.cookie)
        if mark is not None and mark == client.sender_mark:
            return ""
        bits = redirect.sender(info.cookie)
        if bits == 0:
            client.sender_mark = mark
            return ""
        if bits is None:
            return "a task credless cannot name (the connection's kernel record is gone)"
        named = " and ".join(name for bit, name in SENDERS if bits & bit)
        return named or f"a task credless cannot name (sender bits {bits:#x})"

    def caller(self, served: Served) -> Caller:
        """Who asks on this connection, as of now: the decision's first input. A process
        that changed uid or cgroup between its exec and its connect is not current
        (served.changed); the image is checked on every request (a process that exec'd or
        exited is not served with the old identity), and who wrote it (a child or another
        process writing on a connection it was handed is not served as the process that
        connected); the identity again whenever the registration entries have changed
        since it was resolved (an entry removed or changed revokes it on live connections
        too)."""
        if served.changed:
            return Caller(False, served.caller.spiffe_id, changed=served.changed)
        if not self.image_current(served.info, served.client):
            return Caller(False, served.caller.spiffe_id)
        other = self.other_sender(served.info, served.client)
        if other:
            return Caller(
                False,
                served.caller.spiffe_id,
                changed=f"{other} wrote on this connection, which pid {served.info.tgid} "
                "made: only the process that connected is served as itself; connection closed",
            )
        generation = self.identity.generation
        if generation != served.generation:
            att = self.attestor.attest_image(served.info.tgid, served.info.exec_ns, timeout=0)
            ident = self.identity.resolve(att, quiet=True) if att is not None else None
            now = str(ident.spiffe_id) if ident is not None else None
            if now != served.caller.spiffe_id:
                return Caller(
                    False,
                    served.caller.spiffe_id,
                    changed=(
                        f"the registration entries changed: the process is now {now}"
                        if now
                        else "the registration entries changed: the process has no "
                        "identity any more"
                    )
                    + "; connection closed",
                )
            served.generation = generation
        return served.caller

    def credentials(
        self, token: Token, method: str, up: Upstream, path: str
    ) -> list[tuple[bytes, bytes]]:
        """The headers that carry token for this request: Authorization, and for a DPoP
        token a proof bound to this method and URL (without its query, RFC 9449 4.2)."""
        out = [(b"Authorization", token.authorization_bytes)]
        if token.token_type == "DPoP":  # noqa: S105 — a token type, not a secret
            out.append(
                (
                    b"DPoP",
                    self.oauth.dpop_key(token.spiffe_id)
                    .proof(
                        method, up.origin + path.split("?", 1)[0], access_token=token.access_token
                    )
                    .encode(),
                )
            )
        return out

    async def _request(self, head: Head, served: Served) -> bool:
        started = time.perf_counter()
        client, up = served.client, served.up
        method = head.method.decode()
        path = head.target.decode("latin-1")
        audit_base = AuditBase({"method": method, "path": path.split("?", 1)[0]}, served.fragment)
        req = Request.from_head(head)
        caller = self.caller(served)
        verdict = decide.decide(req, up, caller, self.cfg, self.policy, self.phantom)
        log.debug(
            "request decided",
            server=up.name,
            method=method,
            path=path.split("?", 1)[0],
            action=verdict.action,
            outcome=verdict.outcome or None,
            credential=verdict.credential,
        )
        if verdict.action != FORWARD:
            return await refuse(
                self.rec, self.phantom, self.max_body, verdict, head, client, up, audit_base
            )
        # before anything is injected: a workload's Connection header must not be able to
        # name (and so strip) what credless adds
        http1.strip_connection_headers(head)
        expect = req.get(b"expect")  # as decide() read it: its surrounding whitespace aside
        if expect is not None and expect.lower() == b"100-continue":
            # every path below may read the body (policy, assertion, drains): ask for it now,
            # or a workload that waits for 100 before sending it waits forever
            head.remove(b"expect")
            client.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if verdict.strip:
            head.remove(b"authorization", b"dpop", *req.vouched)
        src: EventSource = client
        asked: answers.Asked | None = None  # what the request is, once its body is read
        if verdict.read_body:
            if up.mode == "assertion":
                return await self.assertions.handle(head, served, audit_base, started)
            decided = await self._enforce(head, req, served, caller, audit_base)
            if isinstance(decided, bool):  # answered here: keep the connection?
                return decided
            body, asked = decided
            src = Replay(body)
        token = None
        if verdict.credential:
            ident = served.holder()
            try:
                token = self.oauth.cached_token(ident, up.name) or await self.oauth.token(
                    ident, up.name
                )
            except OAuthError as e:
                await token_failed(
                    self.rec, self.max_body, e, head, client, src, asked, up, audit_base
                )
                return head.keep_alive
            for name, value in self.credentials(token, method, up, path):
                head.add(name, value)
        self.rec.m_added.observe(time.perf_counter() - started)
        audit_base.asked = asked or head  # for an answer the exchange gives (exchange.py)
        return await self.exchanges.run(head, src, served, token, audit_base, started)

    async def _enforce(
        self, head: Head, req: Request, served: Served, caller: Caller, audit_base: AuditBase
    ) -> tuple[bytes, answers.Asked] | bool:
        """Read the JSON-RPC body and have it decided: the body to go on and what it asked
        (for a later error's ids), else, once the answer has been sent, whether the
        connection stays open (bool). Two types, not a flag beside a value: a denial on a
        keep-alive connection must never read as "go on" (it once did, and the denied
        request's head went upstream with a token)."""
        policy = self.policy
        if policy is None:  # decide() has a broker request's body read only for policy
            raise RuntimeError("a body to decide without a policy")
        client, up = served.client, served.up
        body = await read_body(client, self.max_body)
        if body is None:
            return await refuse(
                self.rec,
                self.phantom,
                self.max_body,
                Verdict(
                    decide.ANSWER,
                    status=413,
                    reason=b"Payload Too Large",
                    close=True,
                    outcome="body_too_large",
                    rpc_code=jsonrpc.INVALID_REQUEST,
                    message=f"credless: request body larger than {self.max_body} bytes",
                ),
                head,
                client,
                up,
                audit_base,
                calls=[],
            )
        verdict, records, calls, batch = decide.decide_body(body, req, up, caller, policy)
        refused = verdict.action != FORWARD
        # the records of a refused request share the event_id its answer names
        named = {"event_id": answers.new_event_id()} if refused and self.rec.audit else {}
        for r in records:
            self.rec.audit_event(r.event, audit_base, **r.fields, **named)
        if refused:
            return await refuse(
                self.rec,
                self.phantom,
                self.max_body,
                verdict,
                head,
                client,
                up,
                audit_base,
                calls or [],
                batch,
                named.get("event_id"),
            )
        head.remove(b"transfer-encoding", b"content-length")
        head.add(b"Content-Length", b"%d" % len(body))
        head.chunked = False
        return body, answers.by_calls(calls, batch)

    def upstream_issuer(self, up: Upstream) -> str:
        return self.oauth.servers[up.name].issuer
