"""agent/inject/upstreams.py's rules that its mutation run found untested: how a new
upstream connection is made (TLS or not, server name, CA, timeout), which idle connection
the pool may hand out, the Host values naming a server, the addresses of a server's URL and
its workload_url, and the errors an operator reads at start. Sans-IO: the event loop's
create_connection is replaced, clocks are injected."""

from __future__ import annotations

import asyncio
import io
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from agent.config import ServerSection
from agent.inject.upstreams import (
    Pool,
    Upstream,
    UpstreamCertificateError,
    UpstreamConflict,
    UpstreamResolver,
    _servers,
    authorities,
    connect,
    loopback_answers,
    quiet,
)
from agent.oauth.trust import ServerTls, server_tls
from agent.observe import logging as obs
from tests.tlsca import TestCA

# ------------------------------------------------------------ connect()


class Dialer:
    """Stands in for the event loop's create_connection: records each call; answers with
    a sentinel connection, or raises `fail`, or never completes (`hang`)."""

    def __init__(self, fail: BaseException | None = None, hang: bool = False) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail, self.hang = fail, hang
        self.conn = object()

    async def __call__(self, factory: Any, host: Any, port: Any, **kw: Any) -> Any:
        self.calls.append({"host": host, "port": port, **kw})
        if self.fail is not None:
            raise self.fail
        if self.hang:
            await asyncio.get_running_loop().create_future()
        return object(), self.conn


def dial(
    up: Upstream, dialer: Dialer, ctx: ssl.SSLContext | None = None, timeout: float = 10
) -> tuple[Any, list[tuple[Upstream, str]]]:
    told: list[tuple[Upstream, str]] = []

    async def run() -> Any:
        loop: Any = asyncio.get_running_loop()
        loop.create_connection = dialer
        return await connect(up, ctx or FALLBACK, timeout, lambda u, k: told.append((u, k)))

    return asyncio.run(run()), told


FALLBACK = ssl.create_default_context()


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    return str(TestCA(tmp_path).cert_path)


def handshake_failure(reason: str) -> ssl.SSLError:
    """An SSLError as the ssl module raises it (its reason set: one made in Python has none)."""
    e = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    e.reason = reason
    return e


def https_server(**kw: Any) -> ServerSection:
    return ServerSection(name="w", url="https://mcp.example:8443/mcp", **kw)


def test_an_https_server_is_dialled_with_tls_by_its_own_trust_and_named_by_sni(ca_file):
    up = _servers([https_server(ca_file=ca_file)])[0][2]
    dialer = Dialer()
    conn, told = dial(up, dialer)
    assert conn is dialer.conn
    (call,) = dialer.calls
    assert (call["host"], call["port"]) == ("mcp.example", 8443)
    assert call["ssl"] is up.tls.context and call["ssl"] is not FALLBACK  # type: ignore[union-attr]
    assert call["server_hostname"] == "mcp.example"
    assert told == [(up, "tls")]


def test_a_workload_url_is_spoken_plain_by_the_workload_and_tls_to_the_server(ca_file):
    """The mapped upstream's scheme is http (what the workload speaks); the connection to
    the server is TLS all the same: sending the request in clear would leak its token."""
    server = https_server(workload_url="http://127.0.0.1:18080/mcp", ca_file=ca_file)
    mapped = _servers([server])[1][2]
    assert mapped.scheme == "http" and mapped.tls is not None
    dialer = Dialer()
    _, told = dial(mapped, dialer)
    (call,) = dialer.calls
    assert call["ssl"] is mapped.tls.context
    assert (call["host"], call["server_hostname"]) == ("mcp.example", "mcp.example")
    assert told == [(mapped, "tls")]


def test_an_https_upstream_without_its_own_trust_is_verified_by_the_fallback_context():
    up = Upstream("w", "https", "mcp.example", 443, "https://mcp.example", "broker")
    dialer = Dialer()
    ctx = ssl.create_default_context()
    _, told = dial(up, dialer, ctx)
    (call,) = dialer.calls
    assert call["ssl"] is ctx and call["server_hostname"] == "mcp.example"
    assert told == [(up, "tls")]


def test_a_plain_http_server_is_dialled_without_tls_and_counted_as_plain():
    up = _servers([ServerSection(name="p", url="http://127.0.0.1:8080/mcp")])[0][2]
    assert up.tls is None
    dialer = Dialer()
    _, told = dial(up, dialer)
    (call,) = dialer.calls
    assert (call["host"], call["port"]) == ("127.0.0.1", 8080)
    assert call["ssl"] is None and call["server_hostname"] is None
    assert told == [(up, "plain")]


def test_a_connect_that_does_not_complete_fails_at_the_timeout():
    """A server that never answers the SYN must not hold the workload's request forever.
    Timeout 0: wait_for gives up within a few turns of the loop, no real time passes."""
    up = Upstream("w", "http", "127.0.0.1", 8080, "http://127.0.0.1:8080", "broker")
    dialer = Dialer(hang=True)

    async def run() -> BaseException | None:
        loop: Any = asyncio.get_running_loop()
        loop.create_connection = dialer
        task = asyncio.ensure_future(connect(up, FALLBACK, 0, lambda u, k: None))
        for _ in range(50):
            if task.done():
                break
            await asyncio.sleep(0)
        if not task.done():
            task.cancel()
            return None
        return task.exception()

    assert isinstance(asyncio.run(run()), TimeoutError)


def test_a_failed_handshake_names_the_origin_the_cause_and_the_ca_it_was_verified_against(
    ca_file,
):
    up = _servers([https_server(ca_file=ca_file)])[0][2]
    failure = handshake_failure("WRONG_VERSION_NUMBER")
    with pytest.raises(UpstreamCertificateError) as caught:
        dial(up, Dialer(fail=failure))
    message = str(caught.value)
    assert message.startswith("the MCP server's certificate did not verify (TLS handshake failed")
    assert "(TLS handshake failed: WRONG_VERSION_NUMBER) at https://mcp.example:8443; " in message
    assert f"it was verified against servers[w].ca_file ({ca_file}). " in message
    assert message.endswith(
        "Nothing was sent to it. If it is the right server, set its servers.ca_file to the "
        "CA bundle that issued its certificate"
    )


def test_a_failed_handshake_without_the_servers_own_trust_names_the_settings_that_apply():
    up = Upstream("w", "https", "mcp.example", 443, "https://mcp.example", "broker")
    with pytest.raises(UpstreamCertificateError) as caught:
        dial(up, Dialer(fail=handshake_failure("SSLV3_ALERT_HANDSHAKE_FAILURE")))
    assert "verified against inject.upstream_ca_file or the system store." in str(caught.value)


# ------------------------------------------------------------ the pool


class Transport:
    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True


class _Conn:
    """What the pool reads of an upstream connection: its protocol's `closed` (set by
    connection_lost) and its transport's is_closing(), which can disagree for a turn."""

    def __init__(self) -> None:
        self.closed = False
        self.transport = Transport()


def conn_() -> Any:
    """A new idle connection, as the pool takes it (its type: UpstreamSide's)."""
    return _Conn()


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("how", ["connection lost", "transport closing"])
def test_a_connection_the_server_closed_while_idle_is_never_handed_out(how):
    conn = conn_()
    pool = Pool(size=2, clock=Clock())
    pool.put("k", conn)
    if how == "connection lost":
        conn.closed = True  # connection_lost ran; the transport may not say so yet
    else:
        conn.transport.closing = True
    assert not quiet(conn)
    assert pool.get("k") is None


def test_an_open_connection_without_a_socket_is_quiet():
    assert quiet(conn_())


def test_a_connection_idle_exactly_max_idle_is_still_usable_and_one_instant_more_is_not():
    clock = Clock()
    pool = Pool(size=2, max_idle=4.0, clock=clock)
    conn = conn_()
    clock.now = 4.0
    assert pool.usable(conn, since=0.0)
    pool.put("k", conn, since=0.0)
    assert pool.get("k") is conn
    clock.now = 4.5
    assert not pool.usable(conn_(), since=0.0)


def test_putting_a_connection_back_keeps_one_idle_exactly_max_idle():
    clock = Clock()
    pool = Pool(size=4, max_idle=4.0, clock=clock)
    older, newer = conn_(), conn_()
    pool.put("k", older)
    clock.now = 4.0
    pool.put("k", newer)  # sweeps only what is idle longer than max_idle
    assert not older.transport.closing
    assert pool.get("k") is newer and pool.get("k") is older


def test_when_the_freshest_idle_connection_has_expired_every_older_one_is_closed_at_once():
    clock = Clock()
    pool = Pool(size=4, max_idle=4.0, clock=clock)
    conns = [conn_(), conn_(), conn_()]
    for i, conn in enumerate(conns):
        clock.now = float(i)
        pool.put("k", conn)
    clock.now = 10.0
    assert pool.get("k") is None
    assert all(c.transport.closing for c in conns)


def test_a_connection_given_back_out_of_order_takes_its_place_by_idle_time():
    """get() hands out the most recently idle first; a connection put back with an older
    idle start goes behind fresher ones, however many there are."""
    clock = Clock()
    pool = Pool(size=8, max_idle=4.0, clock=clock)
    at = {1.0: conn_(), 2.0: conn_(), 3.0: conn_(), 1.5: conn_(), 2.5: conn_()}
    clock.now = 3.0
    for since, conn in at.items():
        pool.put("k", conn, since=since)
    got = [pool.get("k") for _ in at]
    assert got == [at[s] for s in sorted(at, reverse=True)]


# ------------------------------------------------------------ authorities


@pytest.mark.parametrize(
    ("scheme", "netloc", "port", "expected"),
    [
        ("https", "mcp.example", None, (b"mcp.example", b"mcp.example:443")),
        ("http", "mcp.example", None, (b"mcp.example", b"mcp.example:80")),
        ("https", "mcp.example:443", 443, (b"mcp.example:443", b"mcp.example")),
        ("http", "mcp.example:80", 80, (b"mcp.example:80", b"mcp.example")),
        ("https", "mcp.example:80", 80, (b"mcp.example:80",)),
        ("http", "mcp.example:8080", 8080, (b"mcp.example:8080",)),
        ("https", "[::1]:443", 443, (b"[::1]:443", b"[::1]")),
        ("https", "User:Pw@MCP.Example:8443", 8443, (b"mcp.example:8443",)),
    ],
)
def test_the_host_values_naming_a_server_are_its_authority_with_and_without_the_default_port(
    scheme, netloc, port, expected
):
    assert authorities(scheme, netloc, port) == expected


# ------------------------------------------------------------ servers and workload_urls


def test_a_url_without_port_or_path_is_reached_at_the_schemes_port_and_path_slash():
    (host, port, up), (_, hport, hup) = _servers(
        [
            ServerSection(name="s", url="https://mcp.example"),
            ServerSection(name="p", url="http://plain.example"),
        ]
    )
    assert (host, port, up.port, up.path) == ("mcp.example", 443, 443, b"/")
    assert up.authorities == (b"mcp.example", b"mcp.example:443")
    assert (hport, hup.port, hup.tls) == (80, 80, None)


def test_a_url_naming_its_default_port_also_accepts_the_bare_host():
    up = _servers([ServerSection(name="s", url="https://mcp.example:443/mcp")])[0][2]
    assert up.authorities == (b"mcp.example:443", b"mcp.example")


def test_a_servers_trust_falls_back_to_upstream_ca_file_then_the_system_store():
    assert _servers([https_server()])[0][2].tls == ServerTls("", "the system store")
    via = _servers([https_server()], "/etc/u.pem")[0][2].tls
    assert (
        via
        == server_tls("w", "", "/etc/u.pem")
        == ServerTls("/etc/u.pem", "inject.upstream_ca_file")
    )
    dns = {"mcp.example": "10.0.0.1"}

    def resolve(host: str, port: int, type: int = 0) -> list[tuple[Any, ...]]:
        return [(2, type, 6, "", (dns[host], port))]

    default = UpstreamResolver([https_server()], resolve=resolve).refresh()
    assert default[("10.0.0.1", 8443)].tls == ServerTls("", "the system store")
    given = UpstreamResolver([https_server()], resolve=resolve, upstream_ca_file="/etc/u.pem")
    assert given.refresh()[("10.0.0.1", 8443)].tls == via


def test_a_url_naming_no_host_is_refused_naming_the_server_and_the_url():
    with pytest.raises(ValueError, match=r"^\[\[servers\]\] 'w': 'https:///mcp' names no host$"):
        _servers([ServerSection(name="w", url="https:///mcp")])


@pytest.mark.parametrize("path", ["", "/", "/mcp"])
def test_a_workload_url_may_have_no_path_slash_or_the_urls_path(path):
    (_, _, _), (host, port, mapped) = _servers(
        [https_server(workload_url=f"http://127.0.0.1:18080{path}")]
    )
    assert (host, port, mapped.path) == ("127.0.0.1", 18080, b"/mcp")


def test_a_workload_url_without_port_is_port_80_and_its_host_values_are_exactly_its_and_the_urls():
    (_, _, direct), (host, port, mapped) = _servers(
        [https_server(workload_url="http://Gateway.Local/mcp")]
    )
    assert (host, port) == ("gateway.local", 80)
    assert mapped.authorities == (b"gateway.local", b"gateway.local:80", *direct.authorities)
    (_, _, _), (_, port, mapped) = _servers([https_server(workload_url="http://gw:80/")])
    assert port == 80 and mapped.authorities[:2] == (b"gw:80", b"gw")
    (_, _, _), (_, port, mapped) = _servers([https_server(workload_url="http://gw:18080/")])
    assert port == 18080 and mapped.authorities == (b"gw:18080", *direct.authorities)


@pytest.mark.parametrize(
    ("url", "workload_url", "says"),
    [
        (
            "http://a.example/mcp",
            "http://127.0.0.1:1/mcp",
            "^\\[\\[servers\\]\\] 'w': workload_url 'http://127.0.0.1:1/mcp' is for an https "
            "url; 'http://a.example/mcp' is reached as it is$",
        ),
        (
            "https://a.example/mcp",
            "http://127.0.0.1:1/other",
            "^\\[\\[servers\\]\\] 'w': workload_url 'http://127.0.0.1:1/other': its path must "
            "be the url's \\(/mcp\\) or empty; credless does not rewrite request paths$",
        ),
    ],
)
def test_a_workload_url_refusal_names_the_server_and_says_what_to_change(url, workload_url, says):
    with pytest.raises(ValueError, match=says):
        _servers([ServerSection(name="w", url=url, workload_url=workload_url)])


def test_two_servers_on_one_address_are_told_to_take_their_own_address_or_port():
    servers = [
        ServerSection(name="a", url="https://a.example:8443/mcp"),
        ServerSection(name="b", url="https://b.example:8443/mcp"),
    ]

    def resolve(host: str, port: int, type: int = 0) -> list[tuple[Any, ...]]:
        return [(2, type, 6, "", ("10.0.0.1", port))]

    with pytest.raises(UpstreamConflict) as caught:
        UpstreamResolver(servers, resolve=resolve).refresh()
    assert str(caught.value).endswith(
        "credless tells servers apart by the address a workload dials, so each needs its own "
        "address or port"
    )


# ------------------------------------------------------------ loopback names


@pytest.mark.parametrize("host", ["localhost", "LocalHost.", "mcp.localhost", "MCP.LOCALHOST."])
def test_localhost_and_names_under_it_are_both_loopbacks_whatever_their_case_and_root_dot(host):
    assert [i[4][0] for i in loopback_answers(host, 8443)] == ["127.0.0.1", "::1"]


@pytest.mark.parametrize("host", ["notlocalhost", "localhost.example", ".localhost.example"])
def test_other_names_have_no_loopback_answers(host):
    assert loopback_answers(host, 8443) == []


def test_the_system_resolver_is_asked_for_stream_sockets():
    """The default resolver is socket.getaddrinfo: a numeric host asks no DNS server."""
    ups = UpstreamResolver([ServerSection(name="p", url="http://127.0.0.1:8080/mcp")]).refresh()
    assert set(ups) == {("127.0.0.1", 8080)}


# ------------------------------------------------------------ the resolver


class Answers:
    """getaddrinfo from a table the test changes; None: the lookup fails."""

    def __init__(self, **answers: list[str] | None) -> None:
        self.answers = {k.replace("_", "."): v for k, v in answers.items()}

    def __call__(self, host: str, port: int, type: int = 0) -> list[tuple[Any, ...]]:
        ips = self.answers[host]
        if ips is None:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, type, 6, "", (ip, port)) for ip in ips]


TWO = [
    ServerSection(name="a", url="https://a.example:8443/mcp"),
    ServerSection(name="b", url="https://b.example:8443/mcp"),
]


@pytest.fixture
def warnings() -> Iterator[list[Any]]:
    """The diagnostic events logged at info and above during the test (configured as the
    other logging tests leave it, into a buffer; then structlog's capture, which swaps
    the processors in place)."""
    obs.configure(level="info", fmt="json", stream=io.StringIO())
    with structlog.testing.capture_logs() as logged:
        yield logged


def test_an_address_another_server_holds_does_not_stop_the_others_of_its_answer():
    dns = Answers(a_example=["10.0.0.1"], b_example=["10.0.0.2"])
    r = UpstreamResolver(TWO, resolve=dns)
    r.refresh()
    dns.answers["b.example"] = ["10.0.0.1", "10.0.0.3"]  # 10.0.0.1 stays a's
    ups = r.refresh()
    assert ups[("10.0.0.1", 8443)].name == "a"
    assert ups[("10.0.0.3", 8443)].name == "b"


def test_a_later_conflict_is_a_warning_naming_the_address_and_both_servers(warnings):
    dns = Answers(a_example=["10.0.0.1"], b_example=["10.0.0.2"])
    r = UpstreamResolver(TWO, resolve=dns)
    r.refresh()
    dns.answers["b.example"] = ["10.0.0.1"]
    r.refresh()
    (event,) = [e for e in warnings if e["log_level"] == "warning"]
    assert event["event"] == "two servers resolve to one address; it stays with the first"
    assert (event["address"], event["kept"], event["ignored"]) == ("10.0.0.1:8443", "a", "b")


def test_a_server_that_fails_to_resolve_is_a_warning_naming_it_and_the_error(warnings):
    dns = Answers(a_example=["10.0.0.1"], b_example=["10.0.0.2"])
    r = UpstreamResolver(TWO, resolve=dns)
    r.refresh()
    dns.answers["b.example"] = None
    assert r.refresh()[("10.0.0.2", 8443)].name == "b"
    (event,) = [e for e in warnings if e["log_level"] == "warning"]
    assert event["event"] == "could not resolve an MCP server; keeping its addresses"
    assert (event["server"], event["host"]) == ("b", "b.example")
    assert "Temporary failure in name resolution" in event["error"]


def test_an_address_is_retained_exactly_retain_seconds_after_its_last_answer():
    clock = Clock()
    dns = Answers(a_example=["10.0.0.1"], b_example=["10.0.0.2"])
    r = UpstreamResolver(TWO, resolve=dns, retain=600, clock=clock)
    r.refresh()
    dns.answers["a.example"] = ["10.0.0.9"]
    clock.now = 600.0
    assert ("10.0.0.1", 8443) in r.refresh()
    clock.now = 600.5
    assert ("10.0.0.1", 8443) not in r.refresh()
