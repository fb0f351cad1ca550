"""Where intercepted connections go: the configured MCP servers by the (address, port) a
workload dials, and the pool of idle upstream connections per (identity, server).

An https server is reached two ways. A workload that speaks https to its URL is intercepted
on the TLS listener (agent/inject/tls.py). A server with a `workload_url` is also reached at
that plain http:// address: the workload speaks plain HTTP there, to the plain listener, and
that address's Upstream (scheme "http": what the workload speaks; origin and tls: the
server's) originates TLS to the server's URL, sending the URL's authority as Host. Either
way the upstream connection verifies the server by its one trust decision (agent/oauth/
trust.py server_tls()), carried by the Upstream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import select
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
from agent.oauth.trust import ServerTls, certificate_failure, server_tls
from agent.observe.logging import get_logger

log = get_logger("inject.upstreams")


@dataclass(frozen=True)
class Upstream:
    name: str  # [[servers]] name
    scheme: str  # what the workload speaks at this address: http or https
    host: str  # host in the URL (SNI, Host)
    port: int
    origin: str  # scheme://host:port, for DPoP htu
    mode: str  # broker | assertion | passthrough | phantom
    # the URL's path (the MCP endpoint; in assertion mode the token endpoint) and the Host
    # values a workload may send to name this server (the first is the one errors name),
    # lower case
    path: bytes = b"/"
    authorities: tuple[bytes, ...] = ()
    # set: credless originates TLS to the server, verified as its one trust decision says
    # (an https URL: reached at it, scheme "https", or at its workload_url, scheme "http")
    tls: ServerTls | None = None
    # the Host credless sends instead of the workload's (reached at a workload_url: the
    # URL's authority); None: the workload's, which decide() checked is one of authorities
    send_host: bytes | None = None

    @property
    def workload_tls(self) -> bool:
        """Whether the workload speaks TLS to this address (then: the TLS listener)."""
        return self.scheme == "https"


class UpstreamCertificateError(ConnectionError):
    """The MCP server's certificate did not verify: the handshake failed, nothing was
    sent. An OSError, so the proxy answers it as it does any failed connection (502)."""


async def connect(
    up: Upstream,
    ssl_context: ssl.SSLContext,
    timeout: float,
    connected: Callable[[Upstream, str], None],
) -> UpstreamSide:
    """A new connection to up's server (TLS for https, verified by up's trust, else by
    ssl_context; SNI from the URL). connected(up, kind) is told of each one made ("tls" or
    "plain"): a TLS handshake costs milliseconds of CPU, and the count shows whether the
    pool spares them."""
    tls = up.tls is not None or up.scheme == "https"
    try:
        _, conn = await asyncio.wait_for(
            asyncio.get_running_loop().create_connection(
                UpstreamSide,
                up.host,
                up.port,
                ssl=(up.tls.context if up.tls else ssl_context) if tls else None,
                server_hostname=up.host if tls else None,
            ),
            timeout,
        )
    except ssl.SSLError as e:
        cause = certificate_failure(e) or str(e)
        against = up.tls.describe() if up.tls else "inject.upstream_ca_file or the system store"
        raise UpstreamCertificateError(
            f"the MCP server's certificate did not verify ({cause}) at "
            f"{up.origin}; it was verified against {against}. Nothing was sent to it. If it "
            "is the right server, set its servers.ca_file to the CA bundle that issued its "
            "certificate"
        ) from None
    connected(up, "tls" if tls else "plain")
    log.debug("upstream connected", server=up.name, origin=up.origin, tls=tls)
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


def quiet(conn: UpstreamSide) -> bool:
    """Whether an idle connection may carry a request: open, and nothing to read on it. A
    server says nothing on an idle HTTP/1.1 connection until it closes it: anything readable
    (its FIN, a reset, stray bytes) means it is done with it, whether or not the event loop
    has yet run the callback that would say so (the FIN and the workload's next request can
    arrive in one turn of the loop, the request first). One poll(2), as httpcore does."""
    if conn.closed or conn.transport.is_closing():
        return False
    extra = getattr(conn.transport, "get_extra_info", None)
    sock = extra("socket") if extra is not None else None
    if sock is None:  # not a socket (tests' fakes): its callbacks are all there is to go by
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
    return not poller.poll(0)


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
            if quiet(conn):
                log.debug("upstream connection reused", key=key, idle_s=round(now - since, 3))
                return conn
            conn.transport.close()
        return None

    def now(self) -> float:
        """The pool's clock: what put(since=) and usable() take."""
        return self._clock()

    def usable(self, conn: UpstreamSide, since: float) -> bool:
        """Whether conn, idle since then, may carry another request (open, and idle no
        longer than max_idle)."""
        return self._clock() - since <= self.max_idle and quiet(conn)

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


def _servers(
    servers: Iterable[ServerSection], upstream_ca_file: str = ""
) -> list[tuple[str, int, Upstream]]:
    """(host, port, upstream) per address a workload dials: each server's URL, and its
    workload_url if it has one."""
    out = []
    for s in servers:
        u = urlsplit(s.url)
        if u.hostname is None:
            raise ValueError(f"[[servers]] {s.name!r}: {s.url!r} names no host")
        port = u.port or (443 if u.scheme == "https" else 80)
        up = Upstream(
            s.name,
            u.scheme,
            u.hostname,
            port,
            f"{u.scheme}://{u.netloc}",
            s.mode,
            (u.path or "/").encode(),
            authorities(u.scheme, u.netloc, u.port),
            server_tls(s.name, s.ca_file, upstream_ca_file) if u.scheme == "https" else None,
        )
        out.append((u.hostname, port, up))
        if s.workload_url:
            out.append(_mapped(s, up))
    return out


def _mapped(s: ServerSection, up: Upstream) -> tuple[str, int, Upstream]:
    """The upstream reached at s.workload_url: a plain http address mapped onto up (an https
    URL). Host names are what the workload may send (the workload URL's, or the server's);
    credless sends the server's."""
    w = urlsplit(s.workload_url)
    where = f"[[servers]] {s.name!r}: workload_url {s.workload_url!r}"
    if up.scheme != "https":
        raise ValueError(f"{where} is for an https url; {s.url!r} is reached as it is")
    if w.scheme != "http" or w.hostname is None:
        raise ValueError(f"{where} must be a plain http:// URL (credless originates the TLS)")
    if w.path not in ("", "/", up.path.decode()):
        raise ValueError(
            f"{where}: its path must be the url's ({up.path.decode()}) or empty; credless "
            "does not rewrite request paths"
        )
    wport = w.port or 80
    if (w.hostname.lower(), wport) == (up.host.lower(), up.port):
        raise ValueError(f"{where} is the url's own address; choose another port")
    mapped = dataclasses.replace(
        up,
        scheme="http",
        authorities=authorities("http", w.netloc, w.port) + up.authorities,
        send_host=up.authorities[0],
    )
    return w.hostname, wport, mapped


class UpstreamConflict(ValueError):
    """Two servers share an address and port: a redirected connect could not say which."""


def _conflict(kept: Upstream, other: Upstream, key: tuple[str, int]) -> UpstreamConflict:
    return UpstreamConflict(
        f"[[servers]] {kept.name!r} and {other.name!r} both resolve to {key[0]}:{key[1]}; "
        "credless tells servers apart by the address a workload dials, so each needs "
        "its own address or port"
    )


def loopback_answers(host: str, port: int) -> list[tuple[Any, ...]]:
    """localhost and names under .localhost are the loopback addresses of both families
    (RFC 6761 §6.3), whatever this node's /etc/hosts says: a workload whose own hosts file
    (a container's, a pod's) also maps localhost to ::1 connects there first, and must be
    intercepted there too (tests/integration/test_ipv6.py)."""
    name = host.lower().rstrip(".")
    if name != "localhost" and not name.endswith(".localhost"):
        return []
    return [
        (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port)),
        (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::1", port, 0, 0)),
    ]


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
        upstream_ca_file: str = "",
    ):
        self._servers = _servers(servers, upstream_ca_file)
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
            for info in [*infos, *loopback_answers(host, port)]:
                key = (info[4][0], port)
                held = self._last_seen.get(key)
                # a server's own URL and its workload_url share a name, not an address
                if held is not None and held[1] != up:
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
