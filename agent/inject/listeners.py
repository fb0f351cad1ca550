"""Where the proxy accepts: its listening sockets, in the agent's network namespace and in
workloads' (agent/inject/netns.py), and the connections accepted on them.

Each listener knows the network namespace it was bound in (SO_NETNS_COOKIE); the proxy
looks an accepted connection up by its peer address *and* that namespace, since every pod
has a 127.0.0.1 of its own. The timeouts' sweep (agent/inject/timeouts.py) runs here, over
the connections this module holds.

A TLS listener looks at each connection's first byte before its handshake (TlsListener): a
workload that speaks plain HTTP to an https server's address is answered 400 saying so
(call https://…, or configure the server's workload_url), audited and counted, instead of
failing as a TLS handshake with no word to anyone. The answer is shaped as the proxy's own
(agent/inject/answers.py) by the request's head alone, as far as it arrived in the first
read: a JSON POST (an MCP client) gets a JSON-RPC error, id null, which the SDKs show; any
other request, or a head not whole in that read, the plain body. Both name the audit event.
The body is never read: the connection is not served, so where the request ends is unknown.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from agent.config import InjectSection
from agent.inject import answers, http1
from agent.inject.flows import ClientSide
from agent.inject.last_request import HandedOverClient
from agent.inject.proxy import Proxy
from agent.inject.redirect import RedirectInfo
from agent.inject.timeouts import Timeouts
from agent.inject.tls import InjectionCA
from agent.observe.logging import get_logger

log = get_logger("inject.listeners")

SO_NETNS_COOKIE = 71  # Linux 5.14; not in Python's socket module
TLS_HANDSHAKE = 0x16  # the content type of the record a ClientHello arrives in
HANDSHAKE_SECONDS = 10.0  # for the first byte, then again for the TLS handshake


def netns_cookie(sock: socket.socket) -> int:
    """The kernel's cookie for the socket's network namespace (bpf_get_netns_cookie)."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


@dataclass(frozen=True)
class ListenSpec:
    family: int
    host: str
    port: int
    tls: bool


def bind_listeners(
    specs: Iterable[ListenSpec], optional_v6: bool
) -> list[tuple[socket.socket, ListenSpec]]:
    """Listening sockets for specs, in the calling thread's network namespace. With
    optional_v6, an IPv6 loopback that does not exist (IPv6 disabled) is skipped."""
    out: list[tuple[socket.socket, ListenSpec]] = []
    try:
        for spec in specs:
            s = socket.socket(spec.family, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if spec.family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((spec.host, spec.port))
                s.listen(1024)
                s.setblocking(False)
            except OSError as e:
                s.close()
                if optional_v6 and spec.family == socket.AF_INET6:
                    continue
                raise OSError(
                    e.errno, f"cannot listen on {spec.host}:{spec.port}: {e.strerror}"
                ) from None
            out.append((s, spec))
    except BaseException:
        for s, _ in out:
            s.close()
        raise
    return out


class Listening(Protocol):
    """A served listener (asyncio.Server or TlsListener), as its owner stops it."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


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


async def _drain(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """Read and drop until the peer closes (after an answer with Connection: close)."""
    while await loop.sock_recv(conn, 65536):
        pass


class PodListeners(Protocol):
    """agent/inject/netns.py's NetnsListeners, as far as a handover fills it."""

    served: dict[int, list[Listening]]


class ProxyListeners:
    """The proxy's listeners and the connections accepted on them; each connection is
    served by proxy.handle() in a task of its own."""

    name = "proxy-listeners"

    def __init__(self, cfg: InjectSection, proxy: Proxy, inject_ca: InjectionCA | None = None):
        self.cfg = cfg
        self.proxy = proxy
        self.inject_ca = inject_ca  # None: no https server, no TLS listener
        self._servers: list[Listening] = []
        self._tls: ssl.SSLContext | None = None
        self._conns: dict[ClientSide, asyncio.Task[None]] = {}
        self.timeouts = Timeouts(
            cfg.client_idle_seconds,
            cfg.request_timeout_seconds,
            cfg.upstream_timeout_seconds,
            self._conns.keys,
            proxy.expired,
        )
        self._sweeper: asyncio.Task[None] | None = None
        # listening sockets a new agent took over from the old one (agent/handover.py):
        # served instead of binding anew, so connects queue on the same sockets throughout
        self.inherited: list[tuple[socket.socket, ListenSpec]] = []
        self.inherited_pods: dict[int, list[tuple[socket.socket, ListenSpec]]] = {}
        self.pods: PodListeners | None = None  # where inherited pods' listeners go
        self.handed_over = False  # stop_accepting() was called: a new agent accepts

    def listen_specs(self) -> list[ListenSpec]:
        """The listeners the redirect sends connections to, in any network namespace."""
        c = self.cfg
        specs = [
            ListenSpec(socket.AF_INET, c.listen_host, c.listen_port, False),
            ListenSpec(socket.AF_INET6, "::1", c.listen_port6, False),
        ]
        if self.inject_ca is not None:
            specs += [
                ListenSpec(socket.AF_INET, c.listen_host, c.tls_listen_port, True),
                ListenSpec(socket.AF_INET6, "::1", c.tls_listen_port, True),
            ]
        return specs

    async def start(self) -> None:
        if self.inject_ca is not None:
            self._tls = self._tls_server_context(self.inject_ca)
        self._servers += await self.serve(self._inherit_or_bind(self.listen_specs()))
        await self._serve_inherited_pods()
        self._sweeper = asyncio.create_task(self.timeouts.run())
        c = self.cfg
        log.info(
            "proxy listening",
            ipv4=f"{c.listen_host}:{c.listen_port}",
            ipv6=f"[::1]:{c.listen_port6}",
            tls_port=c.tls_listen_port if self.inject_ca else None,
        )

    def _inherit_or_bind(self, specs: list[ListenSpec]) -> list[tuple[socket.socket, ListenSpec]]:
        """Each spec's listener: the inherited socket for it, else a new one. An inherited
        socket no spec wants any more (a port changed in the configuration) is closed."""
        inherited, self.inherited = {spec: s for s, spec in self.inherited}, []
        out, wanted = [], []
        for spec in specs:
            sock = inherited.pop(spec, None)
            if sock is not None:
                out.append((sock, spec))
            else:
                wanted.append(spec)
        for sock in inherited.values():
            sock.close()
        try:
            out += bind_listeners(wanted, optional_v6=False)
        except BaseException:
            for sock, _ in out:
                sock.close()
            raise
        if len(out) > len(wanted):
            log.info("listening sockets taken over", count=len(out) - len(wanted))
        return out

    async def _serve_inherited_pods(self) -> None:
        """Pods' listeners taken over: served before the pods' scan starts, which keeps
        those of namespaces that still have a managed process and closes the others."""
        pods, self.inherited_pods = self.inherited_pods, {}
        specs = set(self.listen_specs())
        for ino, socks in pods.items():
            if self.pods is None or ino in self.pods.served or {s for _, s in socks} != specs:
                for sock, _ in socks:
                    sock.close()
                continue
            self.pods.served[ino] = await self.serve(socks)

    def listening(self) -> list[Listening]:
        """The listeners served in the agent's own network namespace."""
        return list(self._servers)

    async def serve(self, socks: list[tuple[socket.socket, ListenSpec]]) -> list[Listening]:
        """Serve bound listening sockets (of this or a workload's network namespace)."""
        loop = asyncio.get_running_loop()
        servers: list[Listening] = []
        try:
            for sock, spec in socks:
                netns = netns_cookie(sock)
                protocol = functools.partial(
                    HandedOverClient,
                    functools.partial(self._accept, netns=netns),
                    max_head=self.cfg.max_head_bytes,
                    max_fields=self.cfg.max_header_fields,
                )
                if spec.tls and self._tls is not None:
                    lookup = functools.partial(self._lookup, netns=netns)
                    servers.append(
                        TlsListener(
                            sock, protocol, self._tls, lookup, self._plain_on_tls, self._tls_failed
                        )
                    )
                else:
                    servers.append(await loop.create_server(protocol, sock=sock))
        except BaseException:  # all or nothing: no listener left that nobody tracks
            for srv in servers:
                srv.close()
            for sock, _ in socks:
                sock.close()
            raise
        return servers

    def _tls_server_context(self, ca: InjectionCA) -> ssl.SSLContext:
        """Presents a leaf for whatever name the workload asked for (SNI), minted by the
        injection CA. A workload that does not trust that CA fails here: it never gets a
        plaintext fallback."""
        https = [u for u in self.proxy.upstreams.values() if u.scheme == "https"]
        default = https[0].host if https else "localhost"
        ctx = ca.server_context(default)

        def pick(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
            sslobj.context = ca.server_context(server_name or default)

        ctx.sni_callback = pick
        return ctx

    def _lookup(self, peer: tuple, local: tuple, netns: int) -> RedirectInfo | None:
        return self.proxy.redirect.lookup(peer, local, netns)

    def _tls_failed(self, arrival: Arrival, e: BaseException) -> None:
        """A workload's TLS handshake failed (most often: it does not trust the injection
        CA): audited under the process the redirect recorded, if any."""
        info, peer = arrival.info, arrival.peer
        up = self.proxy.upstreams.get((info.orig_host, info.orig_port)) if info else None
        ca = self.inject_ca.cert_path if self.inject_ca else None
        self.proxy.rec.audit_event(
            "connection.tls_failed",
            {
                "server": up.name if up else None,
                "pid": info.tgid if info else None,
                "peer_port": peer[1],
            },
            reason=f"TLS with the workload failed ({getattr(e, 'reason', None) or e}); "
            f"a workload calling https through credless must trust the injection CA {ca} "
            "(SSL_CERT_FILE, NODE_EXTRA_CA_CERTS)",
        )

    async def _plain_on_tls(self, arrival: Arrival) -> None:
        """Plain bytes on the TLS listener: a workload calling an https server's address
        with http://. Answered 400 naming the mismatch, audited and counted; nothing is sent
        to the server (the workload meant plain HTTP, credless will not guess)."""
        loop = asyncio.get_running_loop()
        conn, peer, local, info = arrival.conn, arrival.peer, arrival.local, arrival.info
        up = self.proxy.upstreams.get((info.orig_host, info.orig_port)) if info else None
        if info is None or up is None:  # not redirected here: as the proxy does, say nothing
            self.proxy.rec.audit_event(
                "connection.refused",
                {"peer": f"{peer[0]}:{peer[1]}", "listener": f"{local[0]}:{local[1]}"},
                reason="no redirect record for this connection: it was not redirected by "
                "the kernel; closed",
            )
            return
        try:
            self.proxy.redirect.forget(peer, local, info)
        except Exception:  # the record goes with the socket anyway
            log.debug("forgetting a redirect record failed", exc_info=True)
        where = f"{info.orig_host}:{info.orig_port}"
        message = (
            f"credless: {up.name!r} at {where} is an https server and this request is plain "
            f"HTTP; call {up.origin}{up.path.decode()} (https), or have the operator set "
            "the server's workload_url to a plain http:// address credless maps onto it"
        )
        try:
            # what the workload sent first is read, so that closing does not reset the
            # connection before the answer reaches it; its head, if whole, shapes the answer
            first = conn.recv(65536)
        except OSError:
            first = b""
        asked = asked_by_head(first, self.cfg.max_head_bytes, self.cfg.max_header_fields)
        self.proxy.rec.count(up, "plain_http_to_https")
        event_id = self.proxy.rec.audit_answered(
            "request.denied",
            {"server": up.name, "mode": up.mode, "pid": info.tgid, "peer_port": peer[1]},
            status=400,
            reason=message,
        )
        answer = answers.response(
            asked,
            400,
            b"Bad Request",
            message,
            outcome="plain_http_to_https",
            event_id=event_id,
            headers=[(b"Connection", b"close")],
        )
        try:
            await loop.sock_sendall(conn, answer)
            conn.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(_drain(loop, conn), HANDSHAKE_SECONDS)
        except (OSError, TimeoutError):
            pass

    def _accept(self, client: ClientSide, netns: int) -> None:
        if self.handed_over and isinstance(client, HandedOverClient):
            client.last_request()  # accepted (a TLS handshake) as the handover happened
        task = asyncio.get_running_loop().create_task(self.proxy.handle(client, netns))
        self._conns[client] = task
        task.add_done_callback(lambda _t: self._conns.pop(client, None))

    def stop_accepting(self) -> None:
        """A new agent took the listening sockets over: accept nothing more here. What was
        accepted goes on being served (stop() drains it)."""
        for s in self._servers:
            if isinstance(s, TlsListener):
                s.stop_accepting()
            else:
                s.close()
        self.handed_over = True
        for client in self._conns:
            if isinstance(client, HandedOverClient):
                client.last_request()

    async def stop(self) -> None:
        """Drain: no new connections; idle ones closed now; the others each closed after
        the answer in flight, within inject.drain_seconds, then cut.

        Handed over (stop_accepting() first): for up to drain_seconds no connection is
        closed between requests, where a request the workload sends meanwhile would be lost;
        each connection's next request is answered here with `Connection: close` and the
        connection closed after it (HandedOverClient), and the workload's client makes its
        next one to the new agent; an answer in flight (an SSE stream) goes on. Those still
        open then are drained as above."""
        for s in self._servers:
            s.close()
        if self.handed_over and self._conns:
            log.info(
                "handed over: serving open connections out",
                connections=len(self._conns),
                seconds=self.cfg.drain_seconds,
            )
            await asyncio.wait(list(self._conns.values()), timeout=self.cfg.drain_seconds)
        for client in list(self._conns):
            client.drain_and_close()
        if self._conns:
            log.info(
                "draining proxy connections",
                connections=len(self._conns),
                seconds=self.cfg.drain_seconds,
            )
            await asyncio.wait(list(self._conns.values()), timeout=self.cfg.drain_seconds)
        if self._conns:
            log.warning(
                "drain time over: closing connections with requests in flight",
                connections=len(self._conns),
                streaming=sum(1 for c in self._conns if c.upstream is not None),
            )
        if self._sweeper is not None:
            self._sweeper.cancel()
        for t in list(self._conns.values()):
            t.cancel()
        for s in self._servers:
            await s.wait_closed()
        self._servers.clear()
