"""Where intercepted connections go: the configured MCP servers by the (address, port) a
workload dials, and the pool of idle upstream connections per (identity, server)."""

from __future__ import annotations

import socket
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from agent.inject.flows import UpstreamSide


@dataclass(frozen=True)
class Upstream:
    name: str           # [[servers]] name
    scheme: str
    host: str           # host in the URL (SNI, Host)
    port: int
    origin: str         # scheme://host:port, for DPoP htu
    mode: str           # broker | passthrough


class Pool:
    """Idle upstream connections per (SPIFFE ID, upstream): a TLS handshake costs
    milliseconds of CPU, so connections are reused, never across identities."""

    def __init__(self, size: int):
        self.size = size
        self._idle: dict[tuple, deque] = {}

    def get(self, key: tuple) -> UpstreamSide | None:
        q = self._idle.get(key)
        while q:
            conn = q.pop()
            if not conn.closed and not conn.transport.is_closing():
                return conn
        return None

    def put(self, key: tuple, conn: UpstreamSide) -> None:
        q = self._idle.setdefault(key, deque())
        if len(q) >= self.size:
            conn.transport.close()
            return
        q.append(conn)

    def close(self) -> None:
        for q in self._idle.values():
            for conn in q:
                conn.transport.close()
        self._idle.clear()


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
