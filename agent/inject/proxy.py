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
from collections import deque
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from agent.inject import http1
from agent.inject.flows import ClientSide, UpstreamSide
from agent.inject.http1 import BODY, END, HEAD, LAST_CHUNK, Head, ProtocolError, chunk
from agent.inject.redirect import RedirectInfo
from agent.inject.timeouts import SLOW_REQUEST, UPSTREAM
from agent.inject.upstreams import Pool, Upstream
from agent.oauth.errors import OAuthError
from agent.observe.logging import AuditLog, get_logger

log = get_logger("inject.proxy")
READ_SIZE = 65536


class _Replay:
    """The events of a body already read (for policy), as if read again."""

    def __init__(self, body: bytes):
        self._events = deque([(BODY, body)] if body else [])
        self._events.append((END, None))

    async def next(self):
        return self._events.popleft() if self._events else None


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
        self.audit = audit
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.policy = policy                    # agent.policy.engine.PolicyEngine
        self.max_body = max_body
        self.pool = Pool(cfg.upstream_pool_size, max_idle=cfg.upstream_idle_seconds)
        self.m_requests = Counter("credless_injected_requests", "Requests through the proxy",
                                  ["server", "mode", "outcome"], registry=registry)
        self.m_added = Histogram("credless_proxy_added_seconds", "Time credless adds before "
                                 "the request goes upstream (attest, token, proof)",
                                 buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025,
                                          .05, .1, .25, 1), registry=registry)
        self.m_upstream = Histogram("credless_upstream_seconds", "From request sent upstream "
                                    "to response head", ["server"], registry=registry)
        self._m_requests: dict[tuple[str, str, str], Any] = {}
        self._m_upstream: dict[str, Any] = {}
        self.m_active = Gauge("credless_proxy_active_connections", "Open client connections",
                              registry=registry)

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
            up, who = client.served
            if up is not None:
                self._count(up, "request_timeout")
                self._audit("request.failed", {"server": up.name, "mode": up.mode, **who},
                            reason="the request stopped arriving for "
                            f"{self.cfg.request_timeout_seconds:g} s; connection closed")
            client.write(http1.simple_response(408, b"Request Timeout", json.dumps(
                {"error": "credless: the request stopped arriving"}).encode(),
                extra=[(b"Connection", b"close")]))
        client.close()

    async def handle(self, client: ClientSide, netns: int):
        """Serve one accepted workload connection (netns: its namespace's cookie)."""
        self.m_active.inc()
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
            self._audit("connection.tls_failed", {"peer_port": peer[1]},
                        reason=f"TLS with the workload failed: {e.reason}")
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("proxy connection failed")
        finally:
            self.m_active.dec()
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
        client.served = (upstream, who)   # for the timeouts' audit events
        while True:
            ev = await client.next()
            if ev is None or client.closed:   # gone: queued requests are not sent for it
                return
            if ev[0] != HEAD:
                continue
            keep = await self._request(ev[1], client, client, info, upstream, ident, who)
            if not keep:
                return

    def _parent_identity(self, att) -> str | None:
        """The SPIFFE ID of the nearest ancestor that has one: this process is its sub-agent."""
        for tgid, exec_ns, _exe in att.lineage:
            a = self.attestor.attest_image(tgid, exec_ns, timeout=0)
            ident = self.identity.resolve(a, quiet=True) if a is not None else None
            if ident is not None:
                return str(ident.spiffe_id)
        return None

    def _image_current(self, info: RedirectInfo) -> bool:
        now = self.attestor.source.kernel_image(info.tgid)
        return now is not None and now[1] == info.exec_ns

    @staticmethod
    async def _body_event(src) -> tuple[int, object]:
        ev = await src.next()
        if ev is None:
            raise ConnectionError("the workload closed the connection inside a request")
        return ev

    async def _read_body(self, src) -> bytes | None:
        """The whole request body, or None (drained) when it exceeds max_body."""
        body = bytearray()
        while True:
            kind, data = await self._body_event(src)
            if kind == BODY:
                body += data
                if len(body) > self.max_body:
                    await self._drain_body(src)
                    return None
            elif kind == END:
                return bytes(body)

    async def _drain_body(self, src) -> None:
        while (await self._body_event(src))[0] != END:
            pass

    async def _reply(self, client: ClientSide, status: int, reason: bytes, error: str,
                     **extra) -> None:
        body = json.dumps({"error": error, **extra}).encode()
        client.write(http1.simple_response(status, reason, body))
        await client.drain()

    async def _request(self, head: Head, src, client: ClientSide, info: RedirectInfo,
                       up: Upstream, ident, who: dict) -> bool:
        started = time.perf_counter()
        method = head.method.decode()
        path = head.target.decode("latin-1")
        audit_base = {"server": up.name, "mode": up.mode, "method": method,
                      "path": path.split("?", 1)[0], **who}
        if not self._image_current(info):
            self._count(up, "image_changed")
            self._audit("request.denied", audit_base, reason="the process exec'd or exited "
                        "since it connected; connection closed")
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
            await self._drain_body(src)
            self._count(up, "workload_credentials")
            self._audit("request.denied", audit_base, reason="the workload sent its own "
                        "credentials")
            await self._reply(client, 400, b"Bad Request", "credless: this workload must not "
                              "send Authorization or DPoP headers; credless adds them")
            return head.keep_alive
        if up.mode == "assertion":
            return await self._assertion(head, src, client, up, ident, audit_base, started)
        if self.policy is not None and up.mode != "passthrough" and ident is not None \
                and head.method == b"POST":
            verdict, body = await self._enforce(head, src, client, up, who, audit_base)
            if verdict is not True:
                return verdict
            src = _Replay(body)
        token = None
        if up.mode != "passthrough":
            if ident is None:
                await self._drain_body(src)
                self._count(up, "unattested")
                self._audit("request.denied", audit_base, reason="process not attested or "
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
                await self._drain_body(src)
                self._count(up, "token_error")
                self._audit("request.failed", audit_base, reason=str(e), kind=e.kind)
                await self._reply(client, 502, b"Bad Gateway", "credless: could not obtain a "
                                  "token from the authorization server", kind=e.kind,
                                  detail=str(e))
                return head.keep_alive
            head.add(b"Authorization", token.authorization().encode())
            if token.token_type == "DPoP":
                proof = self.oauth.dpop_key(token.spiffe_id).proof(
                    method, up.origin + path.split("?", 1)[0], access_token=token.access_token)
                head.add(b"DPoP", proof.encode())
        self.m_added.observe(time.perf_counter() - started)
        return await self._exchange(head, src, client, up, ident, token, audit_base,
                                    started)

    async def _enforce(self, head: Head, src, client, up: Upstream, who: dict,
                       audit_base: dict):
        """Read the JSON-RPC body and decide every call: (True, body) to go on, else
        (keep-alive, None) once the answer has been sent."""
        from agent.policy import jsonrpc

        body = await self._read_body(src)
        if body is None:
            await self._rpc_error(client, 413, b"Payload Too Large", None, False,
                                  jsonrpc.INVALID_REQUEST, "credless: request body "
                                  f"larger than {self.max_body} bytes")
            return False, None
        try:
            calls, batch = jsonrpc.parse_calls(body)
        except jsonrpc.Malformed as e:
            self._audit("call.denied", audit_base, reason=e.message)
            await self._rpc_error(client, 400, b"Bad Request", None, False, e.code, e.message)
            return head.keep_alive, None
        mismatch = jsonrpc.header_mismatch(
            calls, (head.get(b"mcp-method") or b"").decode() or None,
            (head.get(b"mcp-name") or b"").decode() or None)
        if mismatch:
            self._audit("call.denied", audit_base, reason=mismatch)
            await self._rpc_error(client, 400, b"Bad Request", calls, batch,
                                  jsonrpc.HEADER_MISMATCH, f"credless: {mismatch}")
            return head.keep_alive, None
        denied = []
        for c in calls:
            if not c.is_request and c.method == "(response)":
                continue
            d = self.policy.decide(who["spiffe_id"], up.name, c.method, c.name,
                                   who.get("parent_spiffe_id"))
            self._audit("call.allowed" if d.allowed else "call.denied", audit_base,
                        rpc_method=c.method, tool=c.name, rpc_id=c.id, rule=d.rule_id,
                        decision="allow" if d.allowed else "deny", reason=d.reason)
            if not d.allowed:
                denied.append(f"{c.method} {c.name or ''}".strip() + f": {d.reason}")
        if denied:
            self._count(up, "policy_denied")
            await self._rpc_error(client, 403, b"Forbidden", calls, batch,
                                  jsonrpc.POLICY_DENIED, "credless: denied by policy: "
                                  + "; ".join(denied))
            return head.keep_alive, None
        head.remove(b"transfer-encoding", b"content-length")
        head.add(b"Content-Length", b"%d" % len(body))
        head.chunked = False
        return True, body

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
        body = await self._read_body(src)
        if body is None:
            await self._reply(client, 413, b"Payload Too Large", "credless: token request "
                              f"body larger than {self.max_body} bytes")
            return False
        form = dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
        if form.get("grant_type") == "client_credentials":
            if ident is None:
                self._count(up, "unattested")
                self._audit("request.denied", audit_base, reason="token request from a "
                            "process with no identity")
                await self._reply(client, 403, b"Forbidden", "credless: this process has no "
                                  "identity to authenticate with")
                return head.keep_alive
            sid = str(ident.spiffe_id)
            svid = self.identity.jwt_svid(ident, [self.upstream_issuer(up)], ttl=60, iss=sid)
            form.update(client_id=sid, client_assertion=svid.token, client_assertion_type=
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            form.pop("client_secret", None)
            self._audit("assertion.injected", audit_base, jti=svid.jti, kid=svid.kid,
                        audience=self.upstream_issuer(up))
        new_body = urlencode(form).encode()
        head.remove(b"content-length", b"transfer-encoding")
        head.add(b"Content-Length", b"%d" % len(new_body))
        head.chunked = False
        return await self._exchange(head, _Replay(new_body), client, up, ident, None,
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
        key = (str(ident.spiffe_id) if ident else None, up.host, up.port, up.scheme)
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
            await self._drain_body(src)
            self._count(up, "upstream_unreachable")
            self._audit("request.failed", audit_base, reason=f"upstream unreachable: {e}")
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
                ev = await src.next()   # inline, not _body_event: this loop runs per request
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
        resp = conn.head
        if resp is None and conn.timed_out:
            self._count(up, "upstream_timeout")
            limit = f"{self.cfg.upstream_timeout_seconds:g} s"
            self._audit("request.failed", audit_base, reason="the MCP server did not answer "
                        f"within {limit}")
            await self._reply(client, 504, b"Gateway Timeout", "credless: the MCP server did "
                              f"not answer within {limit}")
            return head.keep_alive
        if resp is None:
            conn.abort()
            self._count(up, "upstream_closed")
            self._audit("request.failed", audit_base, reason="the MCP server closed the "
                        "connection without answering")
            await self._reply(client, 502, b"Bad Gateway", "credless: the MCP server closed "
                              "the connection without answering")
            return False
        self._upstream_seconds(up.name).observe(conn.head_at - conn.sent_at)
        if resp.status == 401 and token is not None and "invalid_token" in (
                resp.get(b"www-authenticate") or b"").decode("latin-1"):
            self.oauth.invalidate(ident, up.name, token)
        keep = conn.complete and head.keep_alive and not conn.close_delimited
        if conn.reusable():
            self.pool.put(key, conn)
        else:
            conn.transport.close()
        if not conn.complete:   # cut short: closing tells the workload the answer is partial
            self._count(up, "upstream_closed")
            return False
        self._count(up, "injected" if token else "forwarded")
        self._audit("request.injected" if token else "request.forwarded", audit_base,
                    status=resp.status, token_sha256=token.fingerprint if token else None,
                    jti=token.jti if token else None, jkt=token.jkt if token else None,
                    latency_ms=round((time.perf_counter() - started) * 1000, 2))
        await client.drain()
        return keep

    def _upstream_seconds(self, server: str):
        child = self._m_upstream.get(server)
        if child is None:
            child = self._m_upstream[server] = self.m_upstream.labels(server)
        return child

    def _count(self, up: Upstream, outcome: str) -> None:
        key = (up.name, up.mode, outcome)
        child = self._m_requests.get(key)
        if child is None:   # labels() costs more than the increment: resolve once
            child = self._m_requests[key] = self.m_requests.labels(*key)
        child.inc()

    def _audit(self, event: str, base: dict, **fields) -> None:
        if self.audit:
            self.audit.emit(event, **base, **fields)
