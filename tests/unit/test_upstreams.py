"""UpstreamResolver: which (address, port) pairs are intercepted as DNS answers change."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from agent.config import ServerSection
from agent.inject.upstreams import UpstreamResolver

SERVERS = [
    ServerSection(name="tools", url="https://mcp.example:8443/mcp", mode="broker"),
    ServerSection(name="local", url="http://127.0.0.1/mcp", mode="passthrough"),
]


class FakeDNS:
    """Answers getaddrinfo from a table the test changes; None: the lookup fails."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str] | None] = {
            "mcp.example": ["10.0.0.1"],
            "127.0.0.1": ["127.0.0.1"],
        }

    def __call__(self, host: str, port: int, type: int = 0) -> list[tuple[Any, ...]]:
        ips = self.answers[host]
        if ips is None:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, type, 6, "", (ip, port)) for ip in ips]


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ports_default_by_scheme_and_modes_are_kept():
    ups = UpstreamResolver(SERVERS, resolve=FakeDNS()).refresh()
    assert set(ups) == {("10.0.0.1", 8443), ("127.0.0.1", 80)}
    assert ups[("10.0.0.1", 8443)].origin == "https://mcp.example:8443"
    assert ups[("127.0.0.1", 80)].mode == "passthrough"


STEPS = [
    # (seconds later, answer for mcp.example, addresses intercepted for it)
    (30, ["10.0.0.2"], {"10.0.0.1", "10.0.0.2"}),  # the old one is retained ...
    (30, ["10.0.0.2"], {"10.0.0.1", "10.0.0.2"}),
    (600, ["10.0.0.2"], {"10.0.0.2"}),  # ... until retain expires
    (30, None, {"10.0.0.2"}),  # failure keeps what was known
    (900, None, {"10.0.0.2"}),  # however long it fails
    (30, ["10.0.0.3", "10.0.0.4"], {"10.0.0.2", "10.0.0.3", "10.0.0.4"}),
]


def test_addresses_follow_dns_with_retention_and_survive_failures():
    dns, clock = FakeDNS(), Clock()
    r = UpstreamResolver(SERVERS, resolve=dns, retain=600, clock=clock)
    assert {h for h, p in r.refresh() if p == 8443} == {"10.0.0.1"}
    for later, answer, expected in STEPS:
        clock.now += later
        dns.answers["mcp.example"] = answer
        ups = r.refresh()
        assert {h for h, p in ups if p == 8443} == expected, (later, answer)
        assert ("127.0.0.1", 80) in ups
    assert r.failures == 2


@pytest.mark.parametrize("retain", [0.5, 10])
def test_unchanged_answers_never_expire(retain):
    clock = Clock()
    r = UpstreamResolver(SERVERS, resolve=FakeDNS(), retain=retain, clock=clock)
    first = r.refresh()
    clock.now += 1000
    assert r.refresh() == first


def test_two_servers_on_one_address_are_refused_naming_both():
    from agent.inject.upstreams import UpstreamConflict

    servers = [
        ServerSection(name="a", url="https://mcp.example:8443/mcp", mode="broker"),
        ServerSection(name="b", url="https://other.example:8443/mcp", mode="broker"),
    ]
    dns = FakeDNS()
    dns.answers["other.example"] = ["10.0.0.1"]  # the same ingress address as mcp.example
    with pytest.raises(UpstreamConflict, match=r"'a' and 'b' both resolve to 10.0.0.1:8443"):
        UpstreamResolver(servers, resolve=dns).refresh()
    # a conflict that appears later leaves the address with the server that had it
    dns.answers["other.example"] = ["10.0.0.9"]
    r = UpstreamResolver(servers, resolve=dns)
    r.refresh()
    dns.answers["other.example"] = ["10.0.0.1"]
    assert r.refresh()[("10.0.0.1", 8443)].name == "a"


class FakeTransport:
    def __init__(self, conn: FakeConn):
        self.conn = conn

    def is_closing(self) -> bool:
        return self.conn.closed

    def close(self) -> None:
        self.conn.closed = True


class FakeConn:
    """What the pool reads of an upstream connection: whether it is closed, and its
    transport's."""

    def __init__(self, name: str):
        self.name, self.closed = name, False
        self.transport = FakeTransport(self)


def test_pool_reuses_the_freshest_and_closes_connections_idle_too_long():
    from agent.inject.upstreams import Pool

    clock = Clock()
    pool = Pool(size=3, max_idle=4.0, clock=clock)
    a, b, c, d = (FakeConn(n) for n in "abcd")
    pool.put("k", a)
    clock.now = 2
    pool.put("k", b)
    assert pool.get("k") is b  # most recently idle first
    pool.put("k", b)
    clock.now = 5  # a: idle 5 s, b: 3 s
    assert pool.get("k") is b and not a.closed
    pool.put("k", c)  # putting sweeps what is too old
    assert a.closed and pool.get("k") is c
    assert pool.get("k") is None
    pool.put("k", b)
    clock.now = 10  # b idle 5 s: closed, never handed out
    assert pool.get("k") is None and b.closed
    for conn in (a, c, d):  # full pool: the extra one is closed
        conn.closed = False
        pool.put("j", conn)
    extra = FakeConn("e")
    pool.put("j", extra)
    assert extra.closed
    pool.close()
    assert a.closed and c.closed and d.closed


def test_a_connection_given_back_with_its_idle_start_keeps_the_pool_in_order():
    """A workload connection's held upstream connection comes back as idle since its last
    use (FastLane.release): older than what is already pooled, it must not be handed out
    first, nor take fresher connections down with it when it has expired."""
    from agent.inject.upstreams import Pool

    clock = Clock()
    pool = Pool(size=4, max_idle=4.0, clock=clock)
    fresh, held, stale = FakeConn("fresh"), FakeConn("held"), FakeConn("stale")
    clock.now = 3
    pool.put("k", fresh)
    clock.now = 3.5
    pool.put("k", held, since=0)  # idle 3.5 s already
    pool.put("k", stale, since=-1)  # idle 4.5 s: closed, not pooled
    assert stale.closed
    clock.now = 4.5  # held: 4.5 s, fresh: 1.5 s
    assert pool.get("k") is fresh and not fresh.closed
    assert pool.get("k") is None and held.closed
    pool.close()  # the agent stops: what comes back is closed
    pool.put("k", fresh)
    assert fresh.closed and pool.get("k") is None
