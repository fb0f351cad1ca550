"""The injecting proxy: redirected MCP connections in, credentialed requests out.

Per accepted connection: the redirect record (bpf/redirect.c) names the original
destination and the process image that connected; the attestor says who that image is, the
identity manager which SPIFFE ID it holds. Per request: the image is checked again (a process
that exec'd or exited since it connected is not served with the old identity: the connection
is closed), whatever Authorization/DPoP the workload sent is removed, and a token for this
identity and server is added, with a DPoP proof bound to this request's method and URL.
Responses stream back as they arrive (SSE events reach the client at once).

The I/O is in agent/inject/flows.py (asyncio Protocols); this module decides.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from typing import Any

from agent.inject import http1
from agent.inject.bodies import Replay, drain_body, read_body
from agent.inject.flows import ClientSide, UpstreamSide
from agent.inject.http1 import BODY, END, HEAD, LAST_CHUNK, Head, ProtocolError, chunk
from agent.inject.lane import FastLane
from agent.inject.record import AuditBase, Recorder
from agent.inject.redirect import RedirectInfo
from agent.inject.timeouts import SLOW_REQUEST, UPSTREAM
from agent.inject.upstreams import Pool, Upstream
from agent.oauth.errors import OAuthError
from agent.observe.logging import AuditLog, get_logger

log = get_logger("inject.proxy")
READ_SIZE = 65536


def _pool_key(ident, up: Upstream) -> tuple:
    """Upstream connections are reused only by the same identity to the same server."""
    return (str(ident.spiffe_id) if ident else None, up.host, up.port, up.scheme)


class Proxy:
    name = "proxy"

    def __init__(self, cfg: Any, upstreams: dict[tuple[str, int], Upstream], redirect: Any,
                 attestor: Any, identity: Any, oauth: Any, audit: AuditLog | None = None,
                 registry: Any = None, ssl_context: ssl.SSLContext | None = None,
                 policy: Any = None, max_body: int = 1 << 20):
        self.cfg = cfg                       # agent.config.InjectSection
        self.upstreams = upstreams
        self.redirect = redirect
        self.attestor = attestor
        self.identity = identity
        self.oauth = oauth
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.policy = policy                    # agent.policy.engine.PolicyEngine
        self.max_body = max_body
        self.pool = Pool(cfg.upstream_pool_size, max_idle=cfg.upstream_idle_seconds)
        self.rec = Recorder(audit, registry)

    def close(self) -> None:
        self.pool.close()

    # ------------------------------------------------------------ connections
    def expired(self, client: ClientSide, what: str) -> None:
        """Timeouts found client waiting too long for what (agent/inject/timeouts.py)."""
        if what == UPSTREAM:   # the serving coroutine answers 504 (see _exchange)
            client.upstream.timed_out = True
            client.upstream.abort()
            return
        if what == SLOW_REQUEST:
            up, fragment = client.served
            if up is not None:
                self.rec.count(up, "request_timeout")
                self.rec.audit_event("request.failed", AuditBase({}, fragment),
                                     reason="the request stopped arriving for "
                                     f"{self.cfg.request_timeout_seconds:g} s; connection "
                                     "closed")
            client.write(http1.simple_response(408, b"Request Timeout", json.dumps(
                {"error": "credless: the request stopped arriving"}).encode(),
                extra=[(b"Connection", b"close")]))
        client.close()

    async def handle(self, client: ClientSide, netns: int):
        """Serve one accepted workload connection (netns: its namespace's cookie)."""
        self.rec.m_active.inc()
        peer = client.transport.get_extra_info("peername")
        try:
            info = self.redirect.lookup(peer[0], peer[1], netns)
            if info is None:
                return  # not a redirected connection: someone dialled the proxy directly
            try:
                await self._serve(client, info)
            finally:
                self.redirect.forget(peer[0], peer[1], info)
        except ConnectionError:
            pass
        except ProtocolError as e:   # not HTTP/1.1 we can frame: answer once and close
            client.write(http1.simple_response(400, b"Bad Request", json.dumps(
                {"error": f"credless: malformed HTTP: {e}"}).encode()))
        except ssl.SSLError as e:
            self.rec.audit_event("connection.tls_failed", {"peer_port": peer[1]},
                                 reason=f"TLS with the workload failed: {e.reason}")
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
        att = await loop.run_in_executor(None, self.attestor.attest_image, info.tgid,
                                         info.exec_ns, 1.0) if info.exec_ns else None
        ident = self.identity.resolve(att) if att is not None else None
        if ident is not None:
            self.identity.note_use(ident, att)
        parent = self._parent_identity(att) if ident is not None else None
        who = {"pid": info.tgid, "start_ns": info.start_ns,
               "exe": att.exe if att else None, "cgroup": att.cgroup_path if att else None,
               "spiffe_id": str(ident.spiffe_id) if ident else None,
               "pod": f"{att.pod.namespace}/{att.pod.name}" if att and att.pod else None,
               "parent_spiffe_id": parent}
        fragment = self.rec.fragment(server=upstream.name, mode=upstream.mode, **who)
        client.served = (upstream, fragment)   # for the timeouts' audit events
        lane = None
        if upstream.mode != "assertion" and (ident is not None or upstream.mode ==
                                             "passthrough"):
            key = _pool_key(ident, upstream)
            lane = FastLane(self, client, info, upstream, ident, fragment, key)
            client.fast = lane.offer
        try:
            await self._serve_requests(client, info, upstream, ident, who, fragment)
        finally:
            if lane is not None:
                lane.release()

    async def _serve_requests(self, client: ClientSide, info: RedirectInfo, upstream: Upstream,
                              ident, who: dict, fragment: str) -> None:
        while True:
            ev = await client.next()
            if ev is None or client.closed:   # gone: queued requests are not sent for it
                return
            if ev[0] != HEAD:
                continue
            client.busy = True   # no fast path while this request is under way
            try:
                keep = await self._request(ev[1], client, client, info, upstream, ident,
                                           who, fragment)
            finally:
                client.busy = False
            if not keep or client.draining:
                return

    def _parent_identity(self, att) -> str | None:
        """The SPIFFE ID of the nearest ancestor that has one: this process is its sub-agent."""
        for tgid, exec_ns, _exe in att.lineage:
            a = self.attestor.attest_image(tgid, exec_ns, timeout=0)
            ident = self.identity.resolve(a, quiet=True) if a is not None else None
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

    async def _reply(self, client: ClientSide, status: int, reason: bytes, error: str,
                     **extra) -> None:
        self._reply_now(client, status, reason, error, **extra)
        await client.drain()

    @staticmethod
    def _reply_now(client: ClientSide, status: int, reason: bytes, error: str,
                   **extra) -> None:
        body = json.dumps({"error": error, **extra}).encode()
        client.write(http1.simple_response(status, reason, body))

    def credentials(self, token, method: str, up: Upstream, path: str) -> list:
        """The headers that carry token for this request: Authorization, and for a DPoP
        token a proof bound to this method and URL (without its query, RFC 9449 4.2)."""
        out = [(b"Authorization", token.authorization_bytes)]
        if token.token_type == "DPoP":
            out.append((b"DPoP", self.oauth.dpop_key(token.spiffe_id).proof(
                method, up.origin + path.split("?", 1)[0],
                access_token=token.access_token).encode()))
        return out

    async def _request(self, head: Head, src, client: ClientSide, info: RedirectInfo,
                       up: Upstream, ident, who: dict, fragment: str) -> bool:
        started = time.perf_counter()
        method = head.method.decode()
        path = head.target.decode("latin-1")
        audit_base = AuditBase({"method": method, "path": path.split("?", 1)[0]}, fragment)
        if not self.image_current(info, client):
            self.rec.count(up, "image_changed")
            self.rec.audit_event("request.denied", audit_base,
                                 reason="the process exec'd or exited "
                                 "since it connected; connection closed")
            return False
        if head.upgrade:
            # the parser stops at an upgrade: what follows would be another protocol, which
            # credless neither inspects nor credentials (MCP over HTTP never upgrades)
            self.rec.count(up, "upgrade_refused")
            self.rec.audit_event("request.denied", audit_base, reason="protocol upgrade "
                                 f"({(head.get(b'upgrade') or b'?').decode('latin-1')}) "
                                 "refused; connection closed")
            head.keep_alive = False
            self._reply_now(client, 501, b"Not Implemented", "credless: protocol upgrades "
                            "(WebSocket, h2c) are not relayed")
            return False
        # before anything is injected: a workload's Connection header must not be able to
        # name (and so strip) what credless adds
        http1.strip_connection_headers(head)
        expect = head.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue":
            # every path below may read the body (policy, assertion, drains): ask for it now,
            # or a workload that waits for 100 before sending it waits forever
            head.remove(b"expect")
            client.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        sent_auth = head.remove(b"authorization", b"dpop") if up.mode != "passthrough" else []
        if sent_auth and self.cfg.workload_authorization == "reject":
            await drain_body(src)
            self.rec.count(up, "workload_credentials")
            self.rec.audit_event("request.denied", audit_base, reason="the workload sent its own "
                                 "credentials")
            await self._reply(client, 400, b"Bad Request", "credless: this workload must not "
                              "send Authorization or DPoP headers; credless adds them")
            return head.keep_alive
        if up.mode == "assertion":
            return await self._assertion(head, src, client, up, ident, audit_base, started)
        if self.policy is not None and up.mode != "passthrough" and ident is not None \
                and head.method == b"POST":
            decided = await self._enforce(head, src, client, up, who, audit_base)
            if not isinstance(decided, bytes):   # answered here: keep the connection?
                return decided
            src = Replay(decided)
        token = None
        if up.mode != "passthrough":
            if ident is None:
                await drain_body(src)
                self.rec.count(up, "unattested")
                self.rec.audit_event("request.denied", audit_base, reason="process not attested or "
                                     "matching no registration entry")
                if self.cfg.unattested == "deny":
                    await self._reply(client, 403, b"Forbidden", "credless: this process has "
                                      "no identity (not attested, or no registration entry "
                                      "matches it)")
                    return head.keep_alive
                return False
            try:
                token = self.oauth.cached_token(ident, up.name) \
                    or await self.oauth.token(ident, up.name)
            except OAuthError as e:
                await drain_body(src)
                self.rec.count(up, "token_error")
                self.rec.audit_event("request.failed", audit_base, reason=str(e), kind=e.kind)
                await self._reply(client, 502, b"Bad Gateway", "credless: could not obtain a "
                                  "token from the authorization server", kind=e.kind,
                                  detail=str(e))
                return head.keep_alive
            for name, value in self.credentials(token, method, up, path):
                head.add(name, value)
        self.rec.m_added.observe(time.perf_counter() - started)
        return await self._exchange(head, src, client, up, ident, token, audit_base,
                                    started)

    async def _enforce(self, head: Head, src, client, up: Upstream, who: dict,
                       audit_base: dict) -> bytes | bool:
        """Read the JSON-RPC body and decide every call: the body (bytes) to go on, else,
        once the answer has been sent, whether the connection stays open (bool). Two types,
        not a flag beside a value: a denial on a keep-alive connection must never read as
        "go on" (it once did, and the denied request's head went upstream with a token)."""
        from agent.policy import jsonrpc

        body = await read_body(src, self.max_body)
        if body is None:
            await self._rpc_error(client, 413, b"Payload Too Large", None, False,
                                  jsonrpc.INVALID_REQUEST, "credless: request body "
                                  f"larger than {self.max_body} bytes")
            return False
        try:
            calls, batch = jsonrpc.parse_calls(body)
        except jsonrpc.Malformed as e:
            self.rec.audit_event("call.denied", audit_base, reason=e.message)
            await self._rpc_error(client, 400, b"Bad Request", None, False, e.code, e.message)
            return head.keep_alive
        mismatch = jsonrpc.header_mismatch(
            calls, (head.get(b"mcp-method") or b"").decode() or None,
            (head.get(b"mcp-name") or b"").decode() or None)
        if mismatch:
            self.rec.audit_event("call.denied", audit_base, reason=mismatch)
            await self._rpc_error(client, 400, b"Bad Request", calls, batch,
                                  jsonrpc.HEADER_MISMATCH, f"credless: {mismatch}")
            return head.keep_alive
        denied = []
        for c in calls:
            if not c.is_request and c.method == "(response)":
                continue
            d = self.policy.decide(who["spiffe_id"], up.name, c.method, c.name,
                                   who.get("parent_spiffe_id"))
            self.rec.audit_event("call.allowed" if d.allowed else "call.denied", audit_base,
                                 rpc_method=c.method, tool=c.name, rpc_id=c.id, rule=d.rule_id,
                                 decision="allow" if d.allowed else "deny", reason=d.reason)
            if not d.allowed:
                denied.append(f"{c.method} {c.name or ''}".strip() + f": {d.reason}")
        if denied:
            self.rec.count(up, "policy_denied")
            await self._rpc_error(client, 403, b"Forbidden", calls, batch,
                                  jsonrpc.POLICY_DENIED, "credless: denied by policy: "
                                  + "; ".join(denied))
            return head.keep_alive
        head.remove(b"transfer-encoding", b"content-length")
        head.add(b"Content-Length", b"%d" % len(body))
        head.chunked = False
        return body

    async def _assertion(self, head: Head, src, client, up: Upstream, ident,
                         audit_base: dict, started: float) -> bool:
        """Assertion mode: the workload runs its own client_credentials request; credless
        puts the client authentication in it (a fresh JWT-SVID, aud = the issuer) in place
        of whatever placeholder it sent. Other requests to the server pass unchanged."""
        from urllib.parse import parse_qsl, urlencode

        ctype = (head.get(b"content-type") or b"").split(b";")[0].strip().lower()
        if head.method != b"POST" or ctype != b"application/x-www-form-urlencoded":
            return await self._exchange(head, src, client, up, ident, None, audit_base,
                                        started)
        body = await read_body(src, self.max_body)
        if body is None:
            await self._reply(client, 413, b"Payload Too Large", "credless: token request "
                              f"body larger than {self.max_body} bytes")
            return False
        form = dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
        if form.get("grant_type") == "client_credentials":
            if ident is None:
                self.rec.count(up, "unattested")
                self.rec.audit_event("request.denied", audit_base, reason="token request from a "
                                     "process with no identity")
                await self._reply(client, 403, b"Forbidden", "credless: this process has no "
                                  "identity to authenticate with")
                return head.keep_alive
            sid = str(ident.spiffe_id)
            svid = self.identity.jwt_svid(ident, [self.upstream_issuer(up)], ttl=60, iss=sid)
            form.update(client_id=sid, client_assertion=svid.token, client_assertion_type=
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            form.pop("client_secret", None)
            self.rec.audit_event("assertion.injected", audit_base, jti=svid.jti, kid=svid.kid,
                                 audience=self.upstream_issuer(up))
        new_body = urlencode(form).encode()
        head.remove(b"content-length", b"transfer-encoding")
        head.add(b"Content-Length", b"%d" % len(new_body))
        head.chunked = False
        return await self._exchange(head, Replay(new_body), client, up, ident, None,
                                    audit_base, started)

    def upstream_issuer(self, up: Upstream) -> str:
        return self.oauth.servers[up.name].issuer

    async def _rpc_error(self, client, status: int, reason: bytes, calls, batch: bool,
                         code: int, message: str) -> None:
        from agent.policy import jsonrpc
        client.write(http1.simple_response(status, reason,
                                           jsonrpc.error_body(calls, batch, code, message)))
        await client.drain()

    async def _exchange(self, head: Head, src, client: ClientSide, up: Upstream, ident, token,
                        audit_base: dict, started: float) -> bool:
        key = _pool_key(ident, up)
        conn = self.pool.get(key)
        try:
            if conn is None:
                tls = up.scheme == "https"
                _, conn = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                    UpstreamSide, up.host, up.port, ssl=self.ssl_context if tls else None,
                    server_hostname=up.host if tls else None),
                    self.cfg.upstream_connect_timeout_seconds)
        except OSError as e:
            if isinstance(e, TimeoutError):   # asyncio's: no text of its own
                e = TimeoutError(f"no connection within "
                                 f"{self.cfg.upstream_connect_timeout_seconds:g} s")
            await drain_body(src)
            self.rec.count(up, "upstream_unreachable")
            self.rec.audit_event("request.failed", audit_base, reason=f"upstream unreachable: {e}")
            await self._reply(client, 502, b"Bad Gateway", "credless: the MCP server is "
                              "unreachable", detail=str(e))
            return head.keep_alive
        # from here the response streams to the workload as it arrives
        conn.begin(client, close_client=not head.keep_alive, bodiless=head.method == b"HEAD")
        # one write for head and body when they are at hand: a send(2) per piece costs more
        # than the proxying; large bodies still go out in 64 KiB steps
        out = bytearray(head.request_bytes())
        try:
            while True:
                ev = await src.next()   # inline, not body_event: this loop runs per request
                if ev is None:
                    raise ConnectionError("the workload closed the connection inside a request")
                kind, data = ev
                if kind == BODY:
                    out += chunk(data) if head.chunked else data
                    if len(out) >= READ_SIZE:
                        conn.send(bytes(out))
                        out.clear()
                        await conn.drain()
                elif kind == END:
                    if head.chunked:
                        out += LAST_CHUNK
                    break
        except BaseException:
            conn.abort()
            raise
        conn.send(bytes(out))
        conn.sent()
        await conn.finished()
        keep = self.exchanged(conn, head.keep_alive, client, up, ident, token, key,
                               audit_base, started)
        await client.drain()
        return keep

    def exchanged(self, conn: UpstreamSide, keep_alive: bool, client: ClientSide,
                  up: Upstream, ident, token, key: tuple, audit_base: AuditBase,
                  started: float, hold=None) -> bool:
        """After an exchange: the failure answer if there was no response, the pool, the
        audit event and the metrics. keep_alive: the workload's request allows another on
        its connection; hold(conn): takes a reusable upstream connection instead of the
        pool. Returns whether the workload's connection stays open.
        Synchronous: it also runs from the upstream's callback (agent/inject/lane.py)."""
        status = conn.status
        if conn.client_gone:   # no one to answer: the exchange was aborted for it
            self.rec.count(up, "workload_closed")
            self.rec.audit_event("request.aborted", audit_base, status=status or None,
                                 reason="the workload closed its connection before its answer "
                                 "ended; the server's side was closed too")
            return False
        if not status and conn.timed_out:
            self.rec.count(up, "upstream_timeout")
            limit = f"{self.cfg.upstream_timeout_seconds:g} s"
            self.rec.audit_event("request.failed", audit_base,
                                 reason="the MCP server did not answer "
                                 f"within {limit}")
            self._reply_now(client, 504, b"Gateway Timeout", "credless: the MCP server did "
                            f"not answer within {limit}")
            return keep_alive
        if not status:
            conn.abort()
            self.rec.count(up, "upstream_closed")
            self.rec.audit_event("request.failed", audit_base, reason="the MCP server closed the "
                                 "connection without answering")
            self._reply_now(client, 502, b"Bad Gateway", "credless: the MCP server closed "
                            "the connection without answering")
            return False
        self.rec.m_upstream.labels(up.name).observe(conn.head_at - conn.sent_at)
        if status == 401 and token is not None and "invalid_token" in (   # parsed: see
                conn.head.get(b"www-authenticate") or b"").decode("latin-1"):  # _verbatim
            self.oauth.invalidate(ident, up.name, token)
        keep = conn.complete and keep_alive and not conn.close_delimited
        if conn.reusable():
            if hold is not None:
                hold(conn)
            else:
                self.pool.put(key, conn)
        else:
            conn.transport.close()
        if not conn.complete:   # cut short: closing tells the workload the answer is partial
            self.rec.count(up, "upstream_closed")
            return False
        self.rec.count(up, "injected" if token else "forwarded")
        self.rec.request_done(audit_base, status, token,
                              round((time.perf_counter() - started) * 1000, 2))
        return keep
