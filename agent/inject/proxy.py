"""The injecting proxy: redirected MCP connections in, credentialed requests out.

Per accepted connection: the redirect record (bpf/redirect.c) names the original
destination and the process image that connected; the attestor says who that image is, the
identity manager which SPIFFE ID it holds. Per request: the image is checked again (a process
that exec'd or exited since it connected is not served with the old identity: the connection
is closed), whatever Authorization/DPoP the workload sent is removed, and a token for this
identity and server is added, with a DPoP proof bound to this request's method and URL.
Responses stream back as they arrive (SSE events reach the client at once).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

from prometheus_client import Counter, Gauge, Histogram

from agent.inject import http1
from agent.inject.http1 import BODY, END, HEAD, LAST_CHUNK, Head, ProtocolError, chunk
from agent.inject.redirect import RedirectInfo
from agent.oauth.errors import OAuthError
from agent.observe.logging import AuditLog, get_logger

log = get_logger("inject.proxy")
READ_SIZE = 65536


@dataclass(frozen=True)
class Upstream:
    name: str           # [[servers]] name
    scheme: str
    host: str           # host in the URL (SNI, Host)
    port: int
    origin: str         # scheme://host:port, for DPoP htu
    mode: str           # broker | passthrough


class _Pool:
    """Idle upstream connections per (SPIFFE ID, upstream): a TLS handshake costs
    milliseconds of CPU, so connections are reused, never across identities."""

    def __init__(self, size: int):
        self.size = size
        self._idle: dict[tuple, deque] = {}

    def get(self, key: tuple):
        q = self._idle.get(key)
        while q:
            r, w = q.pop()
            if not w.is_closing() and not r.at_eof():
                return r, w
        return None

    def put(self, key: tuple, conn) -> None:
        q = self._idle.setdefault(key, deque())
        if len(q) >= self.size:
            conn[1].close()
            return
        q.append(conn)

    def close(self) -> None:
        for q in self._idle.values():
            for _r, w in q:
                w.close()
        self._idle.clear()


async def _events(reader: asyncio.StreamReader, parser: http1.Reader) -> AsyncIterator:
    while True:
        data = await reader.read(READ_SIZE)
        events = parser.feed(data) if data else parser.feed_eof()
        for ev in events:
            yield ev
        if not data:
            return


async def _replay(body: bytes):
    """The events of a body already read (for policy), as if read again."""
    if body:
        yield BODY, body
    yield END, None


class Proxy:
    name = "proxy"

    def __init__(self, cfg: Any, upstreams: dict[tuple[str, int], Upstream], redirect: Any,
                 attestor: Any, identity: Any, oauth: Any, audit: AuditLog | None = None,
                 registry: Any = None, ssl_context: ssl.SSLContext | None = None,
                 inject_ca: Any = None, policy: Any = None, max_body: int = 1 << 20):
        self.cfg = cfg                       # agent.config.InjectSection
        self.upstreams = upstreams
        self.redirect = redirect
        self.attestor = attestor
        self.identity = identity
        self.oauth = oauth
        self.audit = audit
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.inject_ca = inject_ca              # agent.inject.tls.InjectionCA
        self.policy = policy                    # agent.policy.engine.PolicyEngine
        self.max_body = max_body
        self.pool = _Pool(cfg.upstream_pool_size)
        self._servers: list[asyncio.base_events.Server] = []
        self._conns: set[asyncio.Task] = set()
        self.m_requests = Counter("credless_injected_requests", "Requests through the proxy",
                                  ["server", "mode", "outcome"], registry=registry)
        self.m_added = Histogram("credless_proxy_added_seconds", "Time credless adds before "
                                 "the request goes upstream (attest, token, proof)",
                                 buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025,
                                          .05, .1, .25, 1), registry=registry)
        self.m_upstream = Histogram("credless_upstream_seconds", "From request sent upstream "
                                    "to response head", ["server"], registry=registry)
        self.m_active = Gauge("credless_proxy_active_connections", "Open client connections",
                              registry=registry)

    # ------------------------------------------------------------ lifecycle
    async def astart(self) -> None:
        host, port = self.cfg.listen_host, self.cfg.listen_port
        self._servers.append(await asyncio.start_server(self._handle, host, port,
                                                        reuse_address=True))
        self._servers.append(await asyncio.start_server(self._handle, "::1", self.cfg.listen_port6,
                                                        family=socket.AF_INET6,
                                                        reuse_address=True))
        if self.inject_ca is not None:
            tls = self._tls_server_context()
            for h, fam in ((host, socket.AF_INET), ("::1", socket.AF_INET6)):
                self._servers.append(await asyncio.start_server(
                    self._handle, h, self.cfg.tls_listen_port, family=fam, ssl=tls,
                    reuse_address=True, ssl_handshake_timeout=10))
        log.info("proxy listening", ipv4=f"{host}:{port}", ipv6=f"[::1]:{self.cfg.listen_port6}",
                 tls_port=self.cfg.tls_listen_port if self.inject_ca else None)

    def _tls_server_context(self) -> ssl.SSLContext:
        """Presents a leaf for whatever name the workload asked for (SNI), minted by the
        injection CA. A workload that does not trust that CA fails here: it never gets a
        plaintext fallback."""
        https = [u for u in self.upstreams.values() if u.scheme == "https"]
        default = https[0].host if https else "localhost"
        ctx = self.inject_ca.server_context(default)
        ca = self.inject_ca

        def pick(sslobj, server_name, _ctx):
            sslobj.context = ca.server_context(server_name or default)

        ctx.sni_callback = pick
        return ctx

    async def astop(self) -> None:
        for s in self._servers:
            s.close()
        for t in list(self._conns):
            t.cancel()
        for s in self._servers:
            await s.wait_closed()
        self._servers.clear()
        self.pool.close()

    # ------------------------------------------------------------ connections
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        self._conns.add(task)
        self.m_active.inc()
        peer = writer.get_extra_info("peername")
        try:
            info = self.redirect.lookup(peer[0], peer[1])
            if info is None:
                return  # not a redirected connection: someone dialled the proxy directly
            try:
                await self._serve(reader, writer, info)
            finally:
                self.redirect.forget(peer[0], peer[1], info.cookie)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except ProtocolError as e:   # not HTTP/1.1 we can frame: answer once and close
            writer.write(http1.simple_response(400, b"Bad Request", json.dumps(
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
            self._conns.discard(task)
            writer.close()

    async def _serve(self, reader, writer, info: RedirectInfo) -> None:
        upstream = self.upstreams.get((info.orig_host, info.orig_port))
        if upstream is None:
            return
        if (upstream.scheme == "https") != (writer.get_extra_info("ssl_object") is not None):
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
        events = _events(reader, http1.Reader())
        async for kind, head in events:
            if kind != HEAD:
                continue
            keep = await self._request(head, events, writer, info, upstream, ident, who)
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

    async def _read_body(self, events) -> bytes | None:
        """The whole request body, or None (drained) when it exceeds max_body."""
        body = bytearray()
        async for kind, data in events:
            if kind == BODY:
                body += data
                if len(body) > self.max_body:
                    await self._drain_body(events)
                    return None
            elif kind == END:
                break
        return bytes(body)

    async def _drain_body(self, events) -> None:
        async for kind, _ in events:
            if kind == END:
                return

    async def _reply(self, writer, status: int, reason: bytes, error: str, **extra) -> None:
        body = json.dumps({"error": error, **extra}).encode()
        writer.write(http1.simple_response(status, reason, body))
        await writer.drain()

    async def _request(self, head: Head, events, writer, info: RedirectInfo, up: Upstream,
                       ident, who: dict) -> bool:
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
        sent_auth = head.remove(b"authorization", b"dpop") if up.mode != "passthrough" else []
        if sent_auth and self.cfg.workload_authorization == "reject":
            await self._drain_body(events)
            self._count(up, "workload_credentials")
            self._audit("request.denied", audit_base, reason="the workload sent its own "
                        "credentials")
            await self._reply(writer, 400, b"Bad Request", "credless: this workload must not "
                              "send Authorization or DPoP headers; credless adds them")
            return head.keep_alive
        if up.mode == "assertion":
            return await self._assertion(head, events, writer, up, ident, audit_base, started)
        if self.policy is not None and up.mode != "passthrough" and ident is not None \
                and head.method == b"POST":
            verdict, body = await self._enforce(head, events, writer, up, who, audit_base)
            if verdict is not True:
                return verdict
            events = _replay(body)
        token = None
        if up.mode != "passthrough":
            if ident is None:
                await self._drain_body(events)
                self._count(up, "unattested")
                self._audit("request.denied", audit_base, reason="process not attested or "
                            "matching no registration entry")
                if self.cfg.unattested == "deny":
                    await self._reply(writer, 403, b"Forbidden", "credless: this process has "
                                      "no identity (not attested, or no registration entry "
                                      "matches it)")
                    return head.keep_alive
                return False
            try:
                token = await self.oauth.token(ident, up.name)
            except OAuthError as e:
                await self._drain_body(events)
                self._count(up, "token_error")
                self._audit("request.failed", audit_base, reason=str(e), kind=e.kind)
                await self._reply(writer, 502, b"Bad Gateway", "credless: could not obtain a "
                                  "token from the authorization server", kind=e.kind,
                                  detail=str(e))
                return head.keep_alive
            head.headers.append((b"Authorization", token.authorization().encode()))
            if token.token_type == "DPoP":
                proof = self.oauth.dpop_key(token.spiffe_id).proof(
                    method, up.origin + path.split("?", 1)[0], access_token=token.access_token)
                head.headers.append((b"DPoP", proof.encode()))
        if head.get(b"expect") and head.get(b"expect").lower() == b"100-continue":
            head.remove(b"expect")
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.m_added.observe(time.perf_counter() - started)
        return await self._exchange(head, events, writer, up, ident, token, audit_base,
                                    started)

    async def _enforce(self, head: Head, events, writer, up: Upstream, who: dict,
                       audit_base: dict):
        """Read the JSON-RPC body and decide every call: (True, body) to go on, else
        (keep-alive, None) once the answer has been sent."""
        from agent.policy import jsonrpc

        body = await self._read_body(events)
        if body is None:
            await self._rpc_error(writer, 413, b"Payload Too Large", None, False,
                                  jsonrpc.INVALID_REQUEST, "credless: request body "
                                  f"larger than {self.max_body} bytes")
            return False, None
        try:
            calls, batch = jsonrpc.parse_calls(body)
        except jsonrpc.Malformed as e:
            self._audit("call.denied", audit_base, reason=e.message)
            await self._rpc_error(writer, 400, b"Bad Request", None, False, e.code, e.message)
            return head.keep_alive, None
        mismatch = jsonrpc.header_mismatch(
            calls, (head.get(b"mcp-method") or b"").decode() or None,
            (head.get(b"mcp-name") or b"").decode() or None)
        if mismatch:
            self._audit("call.denied", audit_base, reason=mismatch)
            await self._rpc_error(writer, 400, b"Bad Request", calls, batch,
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
            await self._rpc_error(writer, 403, b"Forbidden", calls, batch,
                                  jsonrpc.POLICY_DENIED, "credless: denied by policy: "
                                  + "; ".join(denied))
            return head.keep_alive, None
        head.remove(b"transfer-encoding", b"content-length")
        head.headers.append((b"Content-Length", b"%d" % len(body)))
        head.chunked = False
        return True, body

    async def _assertion(self, head: Head, events, writer, up: Upstream, ident,
                         audit_base: dict, started: float) -> bool:
        """Assertion mode: the workload runs its own client_credentials request; credless
        puts the client authentication in it (a fresh JWT-SVID, aud = the issuer) in place
        of whatever placeholder it sent. Other requests to the server pass unchanged."""
        from urllib.parse import parse_qsl, urlencode

        ctype = (head.get(b"content-type") or b"").split(b";")[0].strip().lower()
        if head.method != b"POST" or ctype != b"application/x-www-form-urlencoded":
            return await self._exchange(head, events, writer, up, ident, None, audit_base,
                                        started)
        body = await self._read_body(events)
        if body is None:
            await self._reply(writer, 413, b"Payload Too Large", "credless: token request "
                              f"body larger than {self.max_body} bytes")
            return False
        form = dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
        if form.get("grant_type") == "client_credentials":
            if ident is None:
                self._count(up, "unattested")
                self._audit("request.denied", audit_base, reason="token request from a "
                            "process with no identity")
                await self._reply(writer, 403, b"Forbidden", "credless: this process has no "
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
        head.headers.append((b"Content-Length", b"%d" % len(new_body)))
        head.chunked = False
        return await self._exchange(head, _replay(new_body), writer, up, ident, None,
                                    audit_base, started)

    def upstream_issuer(self, up: Upstream) -> str:
        return self.oauth.servers[up.name].issuer

    async def _rpc_error(self, writer, status: int, reason: bytes, calls, batch: bool,
                         code: int, message: str) -> None:
        from agent.policy import jsonrpc
        writer.write(http1.simple_response(status, reason,
                                           jsonrpc.error_body(calls, batch, code, message)))
        await writer.drain()

    async def _exchange(self, head: Head, events, writer, up: Upstream, ident, token,
                        audit_base: dict, started: float) -> bool:
        key = (str(ident.spiffe_id) if ident else None, up.host, up.port, up.scheme)
        conn = self.pool.get(key)
        try:
            if conn is None:
                conn = await asyncio.open_connection(
                    up.host, up.port, ssl=self.ssl_context if up.scheme == "https" else None,
                    server_hostname=up.host if up.scheme == "https" else None)
        except OSError as e:
            await self._drain_body(events)
            self._count(up, "upstream_unreachable")
            self._audit("request.failed", audit_base, reason=f"upstream unreachable: {e}")
            await self._reply(writer, 502, b"Bad Gateway", "credless: the MCP server is "
                              "unreachable", detail=str(e))
            return head.keep_alive
        up_r, up_w = conn
        # one write for head and body when they are at hand: a send(2) per piece costs more
        # than the proxying; large bodies still go out in 64 KiB steps
        out = bytearray(head.request_bytes())
        async for kind, data in events:
            if kind == BODY:
                out += chunk(data) if head.chunked else data
                if len(out) >= READ_SIZE:
                    up_w.write(bytes(out))
                    out.clear()
                    await up_w.drain()
            elif kind == END:
                if head.chunked:
                    out += LAST_CHUNK
                break
        up_w.write(bytes(out))
        await up_w.drain()
        sent = time.perf_counter()
        resp_keep = True
        status = 0
        parser = http1.Reader(response=True)
        resp_chunked = done = False
        while not done:
            data = await up_r.read(READ_SIZE)
            out = bytearray()
            for kind, item in parser.feed(data) if data else parser.feed_eof():
                if kind == HEAD:
                    status = item.status
                    out += item.response_bytes()
                    if 100 <= status < 200:
                        continue
                    self.m_upstream.labels(up.name).observe(time.perf_counter() - sent)
                    resp_keep, resp_chunked = item.keep_alive, item.chunked
                    if status == 401 and token is not None and "invalid_token" in (
                            item.get(b"www-authenticate") or b"").decode("latin-1"):
                        self.oauth.invalidate(ident, up.name, token)
                elif kind == BODY:
                    out += chunk(item) if resp_chunked else item
                elif kind == END:
                    if resp_chunked:
                        out += LAST_CHUNK
                    done = True
                    break
            if out:   # what one read brought goes out at once: SSE events are not held back
                writer.write(bytes(out))
                await writer.drain()
            if not data:
                break
        if status == 0:
            up_w.close()
            await self._reply(writer, 502, b"Bad Gateway", "credless: the MCP server closed "
                              "the connection without answering")
            self._count(up, "upstream_closed")
            return False
        if resp_keep and head.keep_alive:
            self.pool.put(key, (up_r, up_w))
        else:
            up_w.close()
        self._count(up, "injected" if token else "forwarded")
        self._audit("request.injected" if token else "request.forwarded", audit_base,
                    status=status, token_sha256=token.fingerprint if token else None,
                    jti=token.jti if token else None, jkt=token.jkt if token else None,
                    latency_ms=round((time.perf_counter() - started) * 1000, 2))
        return resp_keep and head.keep_alive

    def _count(self, up: Upstream, outcome: str) -> None:
        self.m_requests.labels(up.name, up.mode, outcome).inc()

    def _audit(self, event: str, base: dict, **fields) -> None:
        if self.audit:
            self.audit.emit(event, **base, **fields)


def upstreams_from_config(servers) -> dict[tuple[str, int], Upstream]:
    """(IP, port) the workload dials → the upstream; hostnames resolved once here."""
    out: dict[tuple[str, int], Upstream] = {}
    for s in servers:
        u = urlsplit(s.url)
        port = u.port or (443 if u.scheme == "https" else 80)
        up = Upstream(s.name, u.scheme, u.hostname, port, f"{u.scheme}://{u.netloc}",
                      getattr(s, "mode", "broker"))
        for info in socket.getaddrinfo(u.hostname, port, type=socket.SOCK_STREAM):
            out[(info[4][0], port)] = up
    return out
