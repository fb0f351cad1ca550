"""Where intercepted connections go: the configured MCP servers by the (address, port) a
workload dials, and the pool of idle upstream connections per (identity, server)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from agent.config import ServerSection
from agent.inject.flows import UpstreamSide
from agent.observe.logging import get_logger

log = get_logger("inject.upstreams")


@dataclass(frozen=True)
class Upstream:
    name: str  # [[servers]] name
    scheme: str
    host: str  # host in the URL (SNI, Host)
    port: int
    origin: str  # scheme://host:port, for DPoP htu
    mode: str  # broker | assertion | passthrough
    # the URL's path (the MCP endpoint; in assertion mode the token endpoint) and the Host
    # values that name this server (the first is the one credless sends), lower case
    path: bytes = b"/"
    authorities: tuple[bytes, ...] = ()


async def connect(
    up: Upstream,
    ssl_context: ssl.SSLContext,
    timeout: float,
    connected: Callable[[Upstream, str], None],
) -> UpstreamSide:
    """A new connection to up's server (TLS for https, verified by ssl_context, SNI from the
    URL). connected(up, kind) is told of each one made ("tls" or "plain"): a TLS handshake
    costs milliseconds of CPU, and the count shows whether the pool spares them."""
    tls = up.scheme == "https"
    _, conn = await asyncio.wait_for(
        asyncio.get_running_loop().create_connection(
            UpstreamSide,
            up.host,
            up.port,
            ssl=ssl_context if tls else None,
            server_hostname=up.host if tls else None,
        ),
        timeout,
    )
    connected(up, "tls" if tls else "plain")
    return conn


def authorities(scheme: str, netloc: str, port: int | None) -> tuple[bytes, ...]:
    """The Host values naming a URL's server: as written, and with or without the scheme's
    default port."""
    hostport = netloc.rpartition("@")[2].lower()
    default = 443 if scheme == "https" else 80
    if port is None:
        return (hostport.encode(), f"{hostport}:{default}".encode())
    if port == default:
        return (hostport.encode(), hostport.rsplit(":", 1)[0].encode())
    return (hostport.encode(),)


class Pool:
    """Idle upstream connections per (SPIFFE ID, upstream): a TLS handshake costs
    milliseconds of CPU, so connections are reused, never across identities.

    A connection idle longer than max_idle is closed instead of reused: servers close idle
    keep-alive connections on their own schedule (uvicorn, which serves the MCP Python SDK,
    after 5 s), and a request sent just as the server closes gets no answer. MCP calls are
    POSTs, which a proxy must not resend, so the pool stays under the servers' timeouts
    instead of retrying.
    """

    def __init__(
        self, size: int, max_idle: float = 4.0, clock: Callable[[], float] = time.monotonic
    ):
        self.size = size
        self.max_idle = max_idle
        self._clock = clock
        # per key: (connection, idle since), oldest left
        self._idle: dict[Hashable, deque[tuple[UpstreamSide, float]]] = {}
        self._closed = False

    def get(self, key: Hashable) -> UpstreamSide | None:
        q = self._idle.get(key)
        now = self._clock()
        while q:
            conn, since = q.pop()
            if now - since > self.max_idle:  # and so is everything older, to its left
                conn.transport.close()
                self._close_all(q)
                break
            if not conn.closed and not conn.transport.is_closing():
                return conn
        return None

    def now(self) -> float:
        """The pool's clock: what put(since=) and usable() take."""
        return self._clock()

    def usable(self, conn: UpstreamSide, since: float) -> bool:
        """Whether conn, idle since then, may carry another request (open, and idle no
        longer than max_idle)."""
        return (
            not conn.closed
            and not conn.transport.is_closing()
            and self._clock() - since <= self.max_idle
        )

    def put(self, key: Hashable, conn: UpstreamSide, since: float | None = None) -> None:
        """Keep conn for reuse; since: when it became idle (now() if not given)."""
        q = self._idle.setdefault(key, deque())
        now = self._clock()
        since = now if since is None else since
        if self._closed or now - since > self.max_idle:
            conn.transport.close()
            return
        while q and now - q[0][1] > self.max_idle:
            q.popleft()[0].transport.close()
        if len(q) >= self.size:
            conn.transport.close()
            return
        i = len(q)  # kept in idle-since order, oldest left: get() relies on it
        while i and q[i - 1][1] > since:
            i -= 1
        q.insert(i, (conn, since))

    @staticmethod
    def _close_all(q: deque[tuple[UpstreamSide, float]]) -> None:
        while q:
            q.pop()[0].transport.close()

    def close(self) -> None:
        """Close every idle connection, and those given back from now on."""
        self._closed = True
        for q in self._idle.values():
            self._close_all(q)
        self._idle.clear()


def _servers(servers: Iterable[ServerSection]) -> list[tuple[str, int, Upstream]]:
    out = []
    for s in servers:
        u = urlsplit(s.url)
        if u.hostname is None:
            raise ValueError(f"[[servers]] {s.name!r}: {s.url!r} names no host")
        port = u.port or (443 if u.scheme == "https" else 80)
        out.append(
            (
                u.hostname,
                port,
                Upstream(
                    s.name,
                    u.scheme,
                    u.hostname,
                    port,
                    f"{u.scheme}://{u.netloc}",
                    s.mode,
                    (u.path or "/").encode(),
                    authorities(u.scheme, u.netloc, u.port),
                ),
            )
        )
    return out


class UpstreamConflict(ValueError):
    """Two servers share an address and port: a redirected connect could not say which."""


def _conflict(kept: Upstream, other: Upstream, key: tuple[str, int]) -> UpstreamConflict:
    return UpstreamConflict(
        f"[[servers]] {kept.name!r} and {other.name!r} both resolve to {key[0]}:{key[1]}; "
        "credless tells servers apart by the address a workload dials, so each needs "
        "its own address or port"
    )


class UpstreamResolver:
    """Keeps (IP, port) → upstream current as the servers' DNS answers change.

    refresh() resolves every server again. An address is intercepted from the first answer
    that names it until `retain` seconds after the last one did: a workload may hold an
    older answer (its own cache, round-robin records), and an address dropped too early
    would send its connects out uninjected. A server that fails to resolve keeps the
    addresses it had. getaddrinfo() does not give TTLs, so refresh() runs on an interval
    (inject.resolve_interval_seconds).
    """

    def __init__(
        self,
        servers: Iterable[ServerSection],
        resolve: Callable[..., Iterable[tuple[Any, ...]]] = socket.getaddrinfo,
        retain: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._servers = _servers(servers)
        self._resolve = resolve
        self._retain = retain
        self._clock = clock
        self._last_seen: dict[tuple[str, int], tuple[float, Upstream]] = {}
        self.failures = 0

    def refresh(self) -> dict[tuple[str, int], Upstream]:
        """Raises UpstreamConflict on the first refresh if two servers share an address;
        later, the address stays with the server that had it (and a warning says so)."""
        now = self._clock()
        first = not self._last_seen
        for host, port, up in self._servers:
            try:
                infos = self._resolve(host, port, type=socket.SOCK_STREAM)
            except OSError as e:
                self.failures += 1
                log.warning(
                    "could not resolve an MCP server; keeping its addresses",
                    server=up.name,
                    host=host,
                    error=str(e),
                )
                for key, (_, known) in list(self._last_seen.items()):
                    if known.name == up.name:
                        self._last_seen[key] = (now, known)
                continue
            for info in infos:
                key = (info[4][0], port)
                held = self._last_seen.get(key)
                if held is not None and held[1].name != up.name:
                    if first:
                        raise _conflict(held[1], up, key)
                    log.warning(
                        "two servers resolve to one address; it stays with the first",
                        address=f"{key[0]}:{key[1]}",
                        kept=held[1].name,
                        ignored=up.name,
                    )
                    continue
                self._last_seen[key] = (now, up)
        for key, (seen, _) in list(self._last_seen.items()):
            if now - seen > self._retain:
                del self._last_seen[key]
        return {key: up for key, (_, up) in self._last_seen.items()}
