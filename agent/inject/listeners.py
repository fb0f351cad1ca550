"""Where the proxy accepts: its listening sockets, in the agent's network namespace and in
workloads' (agent/inject/netns.py), and the connections accepted on them.

Each listener knows the network namespace it was bound in (SO_NETNS_COOKIE); the proxy
looks an accepted connection up by its peer address *and* that namespace, since every pod
has a 127.0.0.1 of its own. The timeouts' sweep (agent/inject/timeouts.py) runs here, over
the connections this module holds.

A TLS listener (agent/inject/tls_listener.py) first tells a TLS handshake from plain HTTP
sent to an https server's address; this module answers the latter.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from agent.config import InjectSection
from agent.inject import answers
from agent.inject.flows import ClientSide
from agent.inject.last_request import HandedOverClient
from agent.inject.proxy import Proxy
from agent.inject.redirect import RedirectInfo
from agent.inject.timeouts import Timeouts
from agent.inject.tls import InjectionCA
from agent.inject.tls_listener import (
    HANDSHAKE_SECONDS,
    Arrival,
    TlsListener,
    asked_by_head,
    drain_until_closed,
)
from agent.observe.logging import get_logger

log = get_logger("inject.listeners")

SO_NETNS_COOKIE = 71  # Linux 5.14; not in Python's socket module


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
        """Presents a leaf for the name the workload asked for (SNI), minted by the
        injection CA, when it is an https server's host: any other name fails the handshake
        (unrecognized_name), so a local process sending names at random makes the agent
        mint nothing (a mint is about 20 ms on the event loop, and each is kept). A name is
        minted once and again at half its leaf's life. A workload that does not trust the
        CA fails here: it never gets a plaintext fallback."""
        https = [u for u in self.proxy.upstreams.values() if u.scheme == "https"]
        default = https[0].host if https else "localhost"
        ctx = ca.server_context(default)

        def pick(
            sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext
        ) -> int | None:
            name = (server_name or default).lower()
            hosts = {u.host.lower() for u in self.proxy.upstreams.values() if u.scheme == "https"}
            if name != default.lower() and name not in hosts:
                log.debug("TLS name asked is no https server's; refused", name=name[:255])
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            sslobj.context = ca.server_context(name)
            return None

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
        # a workload closing in the handshake without an alert (asyncio's TLS client refusing
        # the certificate) is a bare ConnectionResetError(): its type is what there is to say
        why = getattr(e, "reason", None) or str(e) or type(e).__name__
        self.proxy.rec.audit_event(
            "connection.tls_failed",
            {
                "server": up.name if up else None,
                "pid": info.tgid if info else None,
                "peer_port": peer[1],
            },
            reason=f"TLS with the workload failed ({why}); "
            f"a workload calling https through credless must trust the injection CA {ca} "
            "(SSL_CERT_FILE, NODE_EXTRA_CA_CERTS)",
        )

    async def _plain_on_tls(self, arrival: Arrival) -> None:
        """Plain bytes on the TLS listener: a workload calling an https server's address
        with http://. Answered 400 naming the mismatch, audited and counted; nothing is sent
        to the server (the workload meant plain HTTP, credless will not guess). A connection
        the kernel did not redirect is refused here too, before anything is read from it."""
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
            await asyncio.wait_for(drain_until_closed(loop, conn), HANDSHAKE_SECONDS)
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
