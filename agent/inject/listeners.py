"""Where the proxy accepts: its listening sockets, in the agent's network namespace and in
workloads' (agent/inject/netns.py), and the connections accepted on them.

Each listener knows the network namespace it was bound in (SO_NETNS_COOKIE); the proxy
looks an accepted connection up by its peer address *and* that namespace, since every pod
has a 127.0.0.1 of its own. The timeouts' sweep (agent/inject/timeouts.py) runs here, over
the connections this module holds.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from agent.config import InjectSection
from agent.inject.flows import ClientSide
from agent.inject.proxy import Proxy
from agent.inject.timeouts import Timeouts
from agent.inject.tls import InjectionCA
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


class ProxyListeners:
    """The proxy's listeners and the connections accepted on them; each connection is
    served by proxy.handle() in a task of its own."""

    name = "proxy-listeners"

    def __init__(self, cfg: InjectSection, proxy: Proxy, inject_ca: InjectionCA | None = None):
        self.cfg = cfg
        self.proxy = proxy
        self.inject_ca = inject_ca  # None: no https server, no TLS listener
        self._servers: list[asyncio.Server] = []
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
        self._servers += await self.serve(bind_listeners(self.listen_specs(), optional_v6=False))
        self._sweeper = asyncio.create_task(self.timeouts.run())
        c = self.cfg
        log.info(
            "proxy listening",
            ipv4=f"{c.listen_host}:{c.listen_port}",
            ipv6=f"[::1]:{c.listen_port6}",
            tls_port=c.tls_listen_port if self.inject_ca else None,
        )

    async def serve(self, socks: list[tuple[socket.socket, ListenSpec]]) -> list[asyncio.Server]:
        """Serve bound listening sockets (of this or a workload's network namespace)."""
        loop = asyncio.get_running_loop()
        servers = []
        try:
            for sock, spec in socks:
                on_connect = functools.partial(self._accept, netns=netns_cookie(sock))
                servers.append(
                    await loop.create_server(
                        functools.partial(
                            ClientSide,
                            on_connect,
                            max_head=self.cfg.max_head_bytes,
                            max_fields=self.cfg.max_header_fields,
                        ),
                        sock=sock,
                        ssl=self._tls if spec.tls else None,
                        ssl_handshake_timeout=10 if spec.tls else None,
                    )
                )
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

    def _accept(self, client: ClientSide, netns: int) -> None:
        task = asyncio.get_running_loop().create_task(self.proxy.handle(client, netns))
        self._conns[client] = task
        task.add_done_callback(lambda _t: self._conns.pop(client, None))

    async def stop(self) -> None:
        """Drain: no new connections; idle ones closed now; the others each closed after
        the answer in flight, within inject.drain_seconds, then cut."""
        for s in self._servers:
            s.close()
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
