"""The proxy's listeners (agent/inject/listeners.py), found by mutation testing: how a
listening socket is bound (and what is given back when one cannot be), which listeners the
proxy serves and in which network namespace a connection was accepted, the listening
sockets a new agent takes over from the old one (its own and pods'), the TLS listener's
certificate, audit and plain-HTTP answer, the limits and timeouts each connection is served
with, and how stopping drains, alone or after a handover.

In-process on 127.0.0.1 and ::1: real listeners, real workload connections; the kernel's
redirect records are faked (every connection "was redirected" from one address, or none
was), and the MCP server is a loopback peer behind a passthrough server, so no identity,
token or policy is involved."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import io
import json
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry

from agent.config import InjectSection
from agent.inject.listeners import (
    Listening,
    ListenSpec,
    ProxyListeners,
    bind_listeners,
    netns_cookie,
)
from agent.inject.proxy import Proxy
from agent.inject.redirect import RedirectInfo
from agent.inject.tls import InjectionCA
from agent.inject.upstreams import Upstream
from agent.observe.logging import AuditLog
from tests.helpers import free_port
from tests.unit import test_tokens_mutants
from tests.unit.test_fast_path import FakeAttestor, FakeIdentities, FakeOAuth, NoRedirect, World

debug_lines = test_tokens_mutants.debug_lines  # the diagnostic stream at debug, parsed

# the MCP servers are reached in clear here: no CA store to load (a tenth of a second)
UPSTREAM_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
WAIT = 5.0  # bound on any one wait here: far above what each takes, far below the 10 s
# a workload would otherwise wait for the TLS listener to give up on it (HANDSHAKE_SECONDS)

ORIG = ("127.0.0.1", 8080)  # where every redirected workload connection was headed
INFO = RedirectInfo(ORIG[0], ORIG[1], 4242, 4242, 0, 1, 1, 5, 1)
HTTPS_INFO = RedirectInfo("127.0.0.1", 8443, 4343, 4343, 0, 1, 1, 5, 1)


def v4(port: int, tls: bool = False) -> ListenSpec:
    return ListenSpec(socket.AF_INET, "127.0.0.1", port, tls)


def v6(port: int, tls: bool = False) -> ListenSpec:
    return ListenSpec(socket.AF_INET6, "::1", port, tls)


def connects(family: int, host: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        return s.connect_ex((host, port)) == 0


# ------------------------------------------------------------------ the fakes and peers
class Records(NoRedirect):
    """The kernel's redirect records: every connection was redirected from `info` (None:
    from nowhere, dialled directly), and only the process that connected writes on it.
    Each lookup and forget is kept."""

    def __init__(self, info: RedirectInfo | None):
        super().__init__()
        self.info = info
        self.looked_up: list[tuple[tuple, tuple, int]] = []
        self.forgotten: list[tuple[tuple, tuple, RedirectInfo]] = []
        self.forget_fails = False
        self.seen = asyncio.Event()  # a lookup was made

    def lookup(self, peer: tuple, local: tuple, netns: int) -> RedirectInfo | None:
        self.looked_up.append((peer, local, netns))
        self.seen.set()
        return self.info

    def forget(self, peer: tuple, local: tuple, info: RedirectInfo) -> None:
        self.forgotten.append((peer, local, info))
        if self.forget_fails:
            raise OSError("the record went with the socket")


class AuditStream(io.StringIO):
    """The audit log's stream; a test waits on it for an event to be written."""

    def __init__(self) -> None:
        super().__init__()
        self.written = asyncio.Event()

    def write(self, s: str) -> int:
        self.written.set()
        return super().write(s)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.getvalue().splitlines()]

    async def event(self, name: str) -> dict[str, Any]:
        async def seen() -> dict[str, Any]:
            while True:
                self.written.clear()
                found = [e for e in self.events() if e["event"] == name]
                if found:
                    return found[0]
                await self.written.wait()

        return await asyncio.wait_for(seen(), WAIT)


class McpServer:
    """The MCP server behind a passthrough server: it answers each request (a head, no
    body) once the test lets it, with 200 "ok"."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.got = asyncio.Event()
        self.answer = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> McpServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                self.heads.append(await r.readuntil(b"\r\n\r\n"))
                self.got.set()
                await self.answer.wait()
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()


def passthrough(port: int) -> Upstream:
    return Upstream(
        "tools",
        "http",
        "127.0.0.1",
        port,
        f"http://127.0.0.1:{port}",
        "passthrough",
        b"/mcp",
        (b"127.0.0.1:8080",),
    )


def https_server(name: str, host: str) -> Upstream:
    return Upstream(
        name,
        "https",
        host,
        8443,
        f"https://{host}:8443",
        "broker",
        b"/mcp",
        (b"%s" % host.encode(),),
    )


HTTPS = https_server("weather", "mcp.example")
GET = b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"


@dataclass
class Agent:
    cfg: InjectSection
    proxy: Proxy
    listeners: ProxyListeners
    records: Records
    audit: AuditStream
    registry: CollectorRegistry
    ca: InjectionCA | None
    extra: dict[str, Any] = field(default_factory=dict)

    async def open(
        self, port: int | None = None, host: str = "127.0.0.1"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(host, port or self.cfg.listen_port)


@contextlib.asynccontextmanager
async def agent(
    *,
    info: RedirectInfo | None = INFO,
    upstreams: dict[tuple[str, int], Upstream] | None = None,
    ca: InjectionCA | None = None,
    start: bool = True,
    before_start: Callable[[ProxyListeners], None] | None = None,
    **settings: Any,
) -> AsyncIterator[Agent]:
    audit = AuditStream()
    registry = CollectorRegistry()
    records = Records(info)
    cfg = InjectSection(
        **{
            "listen_host": "127.0.0.1",
            "listen_port": free_port(),
            "listen_port6": free_port(),
            "tls_listen_port": free_port(),
            **settings,
        }
    )
    proxy = Proxy(
        cfg,
        upstreams if upstreams is not None else {},
        records,
        FakeAttestor((1, 5)),
        FakeIdentities(),
        FakeOAuth(cast(World, SimpleNamespace(token=None, asked=0))),  # never asked here
        audit=AuditLog("node", stream=audit),
        registry=registry,
        ssl_context=UPSTREAM_TLS,
    )
    listeners = ProxyListeners(cfg, proxy, ca)
    if before_start is not None:
        before_start(listeners)
    started = False
    try:
        if start:
            await listeners.start()
            started = True
        yield Agent(cfg, proxy, listeners, records, audit, registry, ca)
    finally:
        if started:
            await asyncio.wait_for(listeners.stop(), WAIT + cfg.drain_seconds)
        proxy.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> InjectionCA:
    return InjectionCA(tmp_path_factory.mktemp("inject-ca"))


def trusting(ca: InjectionCA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.cert_path))


async def closed_unanswered(reader: asyncio.StreamReader) -> bool:
    """The listener closed the connection without a byte of answer (what the workload
    sent unread, the close may come as a reset)."""
    try:
        return await read_to_end(reader) == b""
    except ConnectionResetError:
        return True


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """All the listener sends until it closes (bounded: a listener that does not close
    fails the test)."""
    return await asyncio.wait_for(reader.read(), WAIT)


# ------------------------------------------------------------------ bind_listeners
def test_listeners_are_bound_as_asked_nonblocking_reusable_and_v6_only():
    specs = [v4(free_port()), v6(free_port())]
    bound = bind_listeners(specs, optional_v6=False)
    try:
        assert [spec for _, spec in bound] == specs
        for sock, spec in bound:
            assert sock.family == spec.family and sock.type == socket.SOCK_STREAM
            assert sock.getsockname()[:2] == (spec.host, spec.port)
            assert sock.getblocking() is False  # served by the event loop
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            assert connects(spec.family, spec.host, spec.port)  # listening
        v6_sock = bound[1][0]
        assert v6_sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    finally:
        for sock, _ in bound:
            sock.close()


@pytest.mark.parametrize("optional_v6", [True, False])
def test_an_ipv6_loopback_that_cannot_be_had_is_skipped_only_when_optional(optional_v6):
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as taken:
        taken_port = taken.getsockname()[1]
        specs = [v4(free_port()), v6(taken_port), v4(free_port())]
        if optional_v6:
            bound = bind_listeners(specs, optional_v6=True)
            try:
                assert [spec for _, spec in bound] == [specs[0], specs[2]]
            finally:
                for sock, _ in bound:
                    sock.close()
            return
        with pytest.raises(OSError) as refused:
            bind_listeners(specs, optional_v6=False)
        assert refused.value.errno == errno.EADDRINUSE
        assert refused.value.strerror == (
            f"cannot listen on ::1:{taken_port}: {os.strerror(errno.EADDRINUSE)}"
        )
        with socket.create_server((specs[0].host, specs[0].port)):  # bound before: released
            pass


def test_an_ipv4_listener_that_cannot_be_had_is_never_optional():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as refused:
            bind_listeners([v6(free_port()), v4(port)], optional_v6=True)
        assert refused.value.errno == errno.EADDRINUSE
        assert refused.value.strerror == (
            f"cannot listen on 127.0.0.1:{port}: {os.strerror(errno.EADDRINUSE)}"
        )


# ------------------------------------------------------------------ network namespaces
def test_the_netns_cookie_is_the_kernels_counter_and_one_per_namespace():
    with socket.socket() as a, socket.socket(socket.AF_INET6) as b:
        cookie = netns_cookie(a)
        assert cookie == netns_cookie(b)
        # the kernel's 64-bit counter of namespaces made since boot, as BPF reads it in host
        # order: a small number (a read in the wrong byte order is 2**56 times larger)
        assert 0 < cookie < 1 << 32


def test_each_connection_is_looked_up_by_peer_listener_and_namespace(ca):
    async def go():
        async with agent(ca=ca, info=None) as a:
            here = socket.socket()
            cookie = netns_cookie(here)
            here.close()
            for _family, host, port in [
                (socket.AF_INET, "127.0.0.1", a.cfg.listen_port),
                (socket.AF_INET6, "::1", a.cfg.listen_port6),
                (socket.AF_INET, "127.0.0.1", a.cfg.tls_listen_port),
                (socket.AF_INET6, "::1", a.cfg.tls_listen_port),
            ]:
                reader, writer = await asyncio.open_connection(host, port)
                mine = writer.get_extra_info("sockname")
                writer.write_eof()
                assert await closed_unanswered(reader)  # not redirected: closed, no answer
                writer.close()
                [(_peer, local, netns)] = [x for x in a.records.looked_up if x[0] == mine]
                assert local[:2] == (host, port) and netns == cookie

    asyncio.run(go())


# ------------------------------------------------------------------ which listeners
@pytest.mark.parametrize("with_ca", [False, True], ids=["plain-only", "with-tls"])
def test_the_proxy_listens_where_the_redirect_sends(ca, with_ca, debug_lines):
    tls_port: list[int] = []

    async def go():
        async with agent(ca=ca if with_ca else None) as a:
            c = a.cfg
            plain = [v4(c.listen_port), v6(c.listen_port6)]
            tls = [v4(c.tls_listen_port, True), v6(c.tls_listen_port, True)]
            specs = a.listeners.listen_specs()
            tls_port.append(c.tls_listen_port)
            assert specs == (plain + tls if with_ca else plain)
            assert len(a.listeners.listening()) == len(specs)
            for spec in plain + tls:
                assert connects(spec.family, spec.host, spec.port) is (spec in specs)
        assert a.listeners.listening() == []
        for spec in specs:  # stopped: nothing listens
            assert not connects(spec.family, spec.host, spec.port)

    asyncio.run(go())
    [up] = [x for x in debug_lines() if x["event"] == "proxy listening"]
    assert up["tls_port"] == (tls_port[0] if with_ca else None)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_plain_http_on_the_tls_port_is_answered_and_on_the_plain_port_served(ca, host):
    async def go():
        async with McpServer() as mcp:
            ups = {ORIG: passthrough(mcp.port), (HTTPS_INFO.orig_host, 8443): HTTPS}
            mcp.answer.set()
            async with agent(ca=ca, upstreams=ups, info=HTTPS_INFO) as a:
                plain_port = a.cfg.listen_port6 if host == "::1" else a.cfg.listen_port
                # the TLS listener: plain HTTP to an https server's address, answered 400
                reader, writer = await a.open(a.cfg.tls_listen_port, host)
                writer.write(GET)
                answer = await read_to_end(reader)
                writer.close()
                assert answer.startswith(b"HTTP/1.1 400 ")
                assert b"is an https server and this request is plain HTTP" in answer
                # the plain listener never treats plain HTTP as https's
                a.records.info = INFO
                reader, writer = await a.open(plain_port, host)
                writer.write(GET)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
                writer.close()
                assert head.startswith(b"HTTP/1.1 200 ")
                assert len(mcp.heads) == 1

    asyncio.run(go())


# ------------------------------------------------------------------ taking listeners over
def test_listening_sockets_taken_over_are_served_as_they_are_and_others_closed(debug_lines):
    async def go():
        c: dict[str, Any] = {"listen_port": free_port(), "listen_port6": free_port()}
        mine = bind_listeners([v4(c["listen_port"])], optional_v6=False)
        stale = bind_listeners([v4(free_port())], optional_v6=False)  # a port since changed
        (sock, _), (old, old_spec) = mine[0], stale[0]
        # a workload's connect queued on the old agent's socket before the new one serves it
        early = socket.create_connection(("127.0.0.1", c["listen_port"]))

        def inherit(listeners: ProxyListeners) -> None:
            listeners.inherited = mine + stale

        async with agent(info=None, before_start=inherit, **c) as a:
            assert a.listeners.inherited == []
            assert old.fileno() == -1  # closed: no spec wants it
            assert not connects(socket.AF_INET, "127.0.0.1", old_spec.port)
            loop = asyncio.get_running_loop()
            early.setblocking(False)
            assert await asyncio.wait_for(loop.sock_recv(early, 1), WAIT) == b""  # served
            assert any(peer == early.getsockname() for peer, _, _ in a.records.looked_up)
            early.close()
            assert sock.fileno() != -1
        [line] = [x for x in debug_lines() if x["event"] == "listening sockets taken over"]
        assert line["count"] == 1
        [up] = [x for x in debug_lines() if x["event"] == "proxy listening"]
        assert up["ipv4"] == f"127.0.0.1:{c['listen_port']}"
        assert up["ipv6"] == f"[::1]:{c['listen_port6']}"
        assert up["tls_port"] is None

    asyncio.run(go())


def test_no_line_about_sockets_taken_over_when_none_were(debug_lines):
    async def go():
        async with agent(info=None):
            pass

    asyncio.run(go())
    assert not [x for x in debug_lines() if x["event"] == "listening sockets taken over"]


def test_a_listener_that_cannot_be_bound_closes_those_taken_over():
    async def go():
        with socket.create_server(("::1", 0), family=socket.AF_INET6) as taken6:
            port = free_port()
            mine = bind_listeners([v4(port)], optional_v6=False)

            def inherit(listeners: ProxyListeners) -> None:
                listeners.inherited = list(mine)

            async with agent(
                info=None,
                start=False,
                before_start=inherit,
                listen_port=port,
                listen_port6=taken6.getsockname()[1],
            ) as a:
                with pytest.raises(OSError, match="cannot listen on ::1"):
                    await a.listeners.start()
            assert mine[0][0].fileno() == -1  # the socket taken over: closed with the rest
            assert not connects(socket.AF_INET, "127.0.0.1", port)

    asyncio.run(go())


@dataclass
class Pods:
    """NetnsListeners as a handover fills it."""

    served: dict[int, list[Listening]] = field(default_factory=dict)


@pytest.mark.parametrize(
    "case",
    ["served", "no-pods", "already-served", "other-specs", "after-an-unfit-one"],
    ids=lambda c: c,
)
def test_a_pods_listeners_taken_over_are_served_only_where_they_still_fit(case):
    async def go():
        c: dict[str, Any] = {"listen_port": free_port(), "listen_port6": free_port()}
        pods = Pods()
        if case == "already-served":
            pods.served[7] = []
        # the pod's listeners, bound here (the test's network stands in for the pod's)
        theirs = bind_listeners([v4(free_port()), v6(free_port())], optional_v6=False)
        specs = [v4(c["listen_port"]), v6(c["listen_port6"])]
        if case == "other-specs":
            specs[1] = v6(c["listen_port6"] + 1)
        socks = [(sock, spec) for (sock, _), spec in zip(theirs, specs, strict=True)]
        ports = [sock.getsockname()[1] for sock, _ in socks]

        unfit = bind_listeners([v4(free_port())], optional_v6=False)  # a spec since dropped

        def inherit(listeners: ProxyListeners) -> None:
            listeners.inherited_pods = {7: socks}
            if case == "after-an-unfit-one":  # taken over first, closed; the next still served
                listeners.inherited_pods = {6: unfit, 7: socks}
            listeners.pods = None if case == "no-pods" else pods

        async with agent(info=None, before_start=inherit, **c) as a:
            assert a.listeners.inherited_pods == {}
            assert 6 not in pods.served
            if case == "after-an-unfit-one":
                assert unfit[0][0].fileno() == -1
            else:
                unfit[0][0].close()
            if case in ("served", "after-an-unfit-one"):
                assert len(pods.served[7]) == 2
                for _family, host, port in [
                    (socket.AF_INET, "127.0.0.1", ports[0]),
                    (socket.AF_INET6, "::1", ports[1]),
                ]:
                    reader, writer = await asyncio.open_connection(host, port)
                    assert await read_to_end(reader) == b""  # served: looked up, refused
                    writer.close()
                    assert any(local[1] == port for _, local, _ in a.records.looked_up)
                for srv in pods.served[7]:  # NetnsListeners', not the listeners', to stop
                    srv.close()
                return
            assert pods.served.get(7, []) == []
            for sock, _ in socks:
                assert sock.fileno() == -1

    asyncio.run(go())


def test_serving_is_all_or_nothing():
    async def go():
        async with agent(info=None, start=False) as a:
            good = bind_listeners([v4(free_port())], optional_v6=False)[0]
            port = good[0].getsockname()[1]
            bad = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # no stream listener
            with pytest.raises(ValueError):
                await a.listeners.serve([good, (bad, v4(0))])
            assert good[0].fileno() == -1 and bad.fileno() == -1
            assert not connects(socket.AF_INET, "127.0.0.1", port)

    asyncio.run(go())


# ------------------------------------------------------------------ what each connection gets
@pytest.mark.parametrize(
    "settings,head",
    [
        ({"max_head_bytes": 1024}, GET[:-2] + b"X-Pad: " + b"a" * 1100 + b"\r\n\r\n"),
        (
            {"max_header_fields": 8},
            GET[:-2] + b"".join(b"X-%d: 1\r\n" % i for i in range(9)) + b"\r\n",
        ),
    ],
    ids=["head-bytes", "header-fields"],
)
def test_each_connection_is_parsed_within_the_configured_limits(settings, head):
    async def go():
        async with agent(upstreams={ORIG: passthrough(1)}, **settings) as a:
            reader, writer = await a.open()
            writer.write(head)
            answer = await read_to_end(reader)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 431 ")

    asyncio.run(go())


def test_an_idle_connection_is_closed_after_the_configured_idle_time():
    async def go():
        async with agent(upstreams={ORIG: passthrough(1)}, client_idle_seconds=0.2) as a:
            reader, writer = await a.open()
            assert await read_to_end(reader) == b""
            writer.close()

    asyncio.run(go())


def test_a_request_that_stops_arriving_is_answered_408_after_the_configured_time():
    async def go():
        async with agent(upstreams={ORIG: passthrough(1)}, request_timeout_seconds=0.2) as a:
            reader, writer = await a.open()
            writer.write(GET[:20])
            answer = await read_to_end(reader)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 408 ")

    asyncio.run(go())


# ------------------------------------------------------------------ the TLS listener
def _names(cert: dict) -> list[str]:
    return [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]


@pytest.mark.parametrize(
    "upstreams,sni,name",
    [
        (
            {ORIG: passthrough(1), ("a", 1): HTTPS, ("b", 1): https_server("w2", "two.example")},
            None,
            "mcp.example",
        ),
        (
            {ORIG: passthrough(1), ("a", 1): HTTPS, ("b", 1): https_server("w2", "Two.Example")},
            "two.example",
            "two.example",
        ),
        ({ORIG: passthrough(1)}, None, "localhost"),
    ],
    ids=["no-sni-first-https-server", "sni", "no-https-server"],
)
def test_the_tls_listener_presents_a_leaf_for_the_name_asked(ca, upstreams, sni, name):
    async def go():
        async with agent(ca=ca, upstreams=upstreams, info=HTTPS_INFO) as a:
            ctx = trusting(ca)
            ctx.check_hostname = False  # the name is checked below, with or without SNI
            _reader, writer = await asyncio.open_connection(
                "127.0.0.1", a.cfg.tls_listen_port, ssl=ctx, server_hostname=sni or ""
            )
            cert = writer.get_extra_info("peercert")
            writer.close()
            assert _names(cert) == [name]

    asyncio.run(go())


@pytest.mark.parametrize("sni", ["asked.example", "mcp.example.evil", "a." * 100 + "example"])
def test_a_name_no_https_server_has_fails_the_handshake_and_mints_nothing(ca, sni):
    """Any local process may dial the TLS listener: a leaf minted for every name it sends
    cost about 20 ms of the event loop each, and each was kept for good (found by review,
    stop 33). A name that is no https server's host is refused (unrecognized_name)."""

    async def go():
        ups = {ORIG: passthrough(1), ("a", 1): HTTPS}
        async with agent(ca=ca, upstreams=ups, info=HTTPS_INFO) as a:
            minted = set(ca._contexts)
            with pytest.raises(OSError):  # the alert (ssl.SSLError), or a reset after it
                await asyncio.open_connection(
                    "127.0.0.1", a.cfg.tls_listen_port, ssl=trusting(ca), server_hostname=sni
                )
            assert set(ca._contexts) == minted and sni not in minted

    asyncio.run(go())


def test_a_tls_connection_the_kernel_did_not_redirect_is_refused_before_its_handshake(ca):
    """A process dialling the TLS listener directly (no redirect record) is refused as on
    the plain listener, before any TLS work: no handshake, no leaf, nothing read."""

    async def go():
        async with agent(ca=ca, upstreams={(HTTPS_INFO.orig_host, 8443): HTTPS}, info=None) as a:
            sock = socket.create_connection(("127.0.0.1", a.cfg.tls_listen_port))
            port = sock.getsockname()[1]

            def hello() -> None:
                with sock, pytest.raises((ssl.SSLError, OSError)):
                    trusting(ca).wrap_socket(sock, server_hostname="mcp.example")

            await asyncio.get_running_loop().run_in_executor(None, hello)
            event = await a.audit.event("connection.refused")
            assert event["peer"] == f"127.0.0.1:{port}"
            assert event["reason"].startswith("no redirect record for this connection")
            assert [e for e in a.audit.events() if e["event"] == "connection.tls_failed"] == []

    asyncio.run(go())


def refuse_certificate(sock: socket.socket) -> None:
    """A workload that trusts only the system's CAs: OpenSSL's client, which tells the
    server why it gives up (an alert) before it closes."""
    with sock, pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(sock, server_hostname="mcp.example")


@pytest.mark.parametrize(
    "info,server,pid",
    [
        (HTTPS_INFO, "weather", HTTPS_INFO.tgid),
        (RedirectInfo("127.0.0.1", 9999, 77, 77, 0, 1, 1, 5, 1), None, 77),
    ],
    ids=["redirected", "no-such-server"],
)
def test_a_workload_refusing_the_certificate_is_audited_naming_the_ca(ca, info, server, pid):
    async def go():
        ups = {(HTTPS_INFO.orig_host, 8443): HTTPS}
        async with agent(ca=ca, upstreams=ups, info=info) as a:
            sock = socket.create_connection(("127.0.0.1", a.cfg.tls_listen_port))
            port = sock.getsockname()[1]
            await asyncio.get_running_loop().run_in_executor(None, refuse_certificate, sock)
            event = await a.audit.event("connection.tls_failed")
            assert event["server"] == server and event["pid"] == pid
            assert event["peer_port"] == port
            reason = event["reason"]
            assert re.match(r"TLS with the workload failed \([A-Z0-9_]+\); ", reason)
            assert reason.endswith(
                f"must trust the injection CA {ca.cert_path} (SSL_CERT_FILE, NODE_EXTRA_CA_CERTS)"
            )

    asyncio.run(go())


def test_a_connection_closed_before_its_first_byte_is_neither_answered_nor_audited(ca):
    async def go():
        async with agent(ca=ca, upstreams={(HTTPS_INFO.orig_host, 8443): HTTPS}) as a:
            reader, writer = await a.open(a.cfg.tls_listen_port)
            writer.write_eof()
            assert await read_to_end(reader) == b""
            writer.close()
            assert a.audit.events() == []

    asyncio.run(go())


JSON_POST = (
    b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:8443\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)


@pytest.mark.parametrize(
    "info,upstreams",
    [
        (None, {(HTTPS_INFO.orig_host, 8443): HTTPS}),
        (HTTPS_INFO, {}),
    ],
    ids=["not-redirected", "no-such-server"],
)
def test_plain_http_not_redirected_to_an_https_server_gets_nothing(ca, info, upstreams):
    async def go():
        async with agent(ca=ca, upstreams=upstreams, info=info) as a:
            reader, writer = await a.open(a.cfg.tls_listen_port)
            mine = writer.get_extra_info("sockname")
            writer.write(GET)
            assert await closed_unanswered(reader)
            writer.close()
            event = await a.audit.event("connection.refused")
            assert event["peer"] == f"{mine[0]}:{mine[1]}"
            assert event["listener"] == f"127.0.0.1:{a.cfg.tls_listen_port}"
            assert "not redirected by the kernel" in event["reason"]
            assert [e["event"] for e in a.audit.events()] == ["connection.refused"]
            assert a.records.forgotten == []

    asyncio.run(go())


@pytest.mark.parametrize("forget_fails", [False, True], ids=["forgotten", "forget-fails"])
def test_plain_http_to_an_https_server_is_answered_400_and_closed(ca, forget_fails):
    unhandled: list[dict[str, Any]] = []

    async def go():
        asyncio.get_running_loop().set_exception_handler(lambda _loop, c: unhandled.append(c))
        ups = {(HTTPS_INFO.orig_host, 8443): HTTPS}
        async with agent(ca=ca, upstreams=ups, info=HTTPS_INFO) as a:
            a.records.forget_fails = forget_fails
            reader, writer = await a.open(a.cfg.tls_listen_port)
            mine = writer.get_extra_info("sockname")
            writer.write(GET)
            answer = await read_to_end(reader)  # closed at once after the answer
            writer.close()
            head, body = answer.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
            assert b"\r\nConnection: close" in head
            [(peer, local, info)] = a.records.forgotten
            assert peer == mine and local[:2] == ("127.0.0.1", a.cfg.tls_listen_port)
            assert info == HTTPS_INFO
            event = await a.audit.event("request.denied")
            assert event["server"] == "weather" and event["mode"] == "broker"
            assert event["pid"] == HTTPS_INFO.tgid and event["peer_port"] == mine[1]
            assert event["status"] == 400
            message = json.loads(body)["error"]
            assert event["reason"] in message
            assert message.startswith(
                "credless: 'weather' at 127.0.0.1:8443 is an https server and this request "
                "is plain HTTP; call https://mcp.example:8443/mcp (https), or have the "
                "operator set the server's workload_url to a plain http:// address credless "
                "maps onto it"
            )
        gc.collect()  # a task that failed is reported when it goes

    asyncio.run(go())
    assert unhandled == []  # answered, drained and closed without an error


@pytest.mark.parametrize(
    "settings,head",
    [
        ({}, JSON_POST),
        (
            {"max_head_bytes": 1024},
            JSON_POST.replace(b"\r\n\r\n", b"\r\nX-P: %s\r\n\r\n" % (b"a" * 1100)),
        ),
        (
            {"max_header_fields": 8},
            JSON_POST.replace(
                b"\r\n\r\n", b"".join(b"\r\nX-%d: 1" % i for i in range(8)) + b"\r\n\r\n"
            ),
        ),
    ],
    ids=["within-limits", "head-over-max-bytes", "fields-over-max"],
)
def test_the_answer_is_json_rpc_only_for_a_head_within_the_configured_limits(ca, settings, head):
    async def go():
        ups = {(HTTPS_INFO.orig_host, 8443): HTTPS}
        async with agent(ca=ca, upstreams=ups, info=HTTPS_INFO, **settings) as a:
            reader, writer = await a.open(a.cfg.tls_listen_port)
            writer.write(head)
            answer = await read_to_end(reader)
            writer.close()
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert ("jsonrpc" in body) is (settings == {})
            if "jsonrpc" in body:  # its cause: the outcome the request counter counts
                cause = body["error"]["data"]["cause"]
                counted = {"server": "weather", "mode": "broker", "outcome": cause}
                sample = a.registry.get_sample_value("credless_injected_requests_total", counted)
                assert cause == "plain_http_to_https" and sample == 1

    asyncio.run(go())


# ------------------------------------------------------------------ stopping
def test_stop_closes_idle_connections_and_cuts_one_in_flight_after_drain_seconds(debug_lines):
    async def go():
        async with McpServer() as mcp:
            async with agent(upstreams={ORIG: passthrough(mcp.port)}, drain_seconds=0.3) as a:
                idle_r, idle_w = await a.open()
                busy_r, busy_w = await a.open()
                busy_w.write(GET)
                await asyncio.wait_for(mcp.got.wait(), WAIT)  # never answered
                await asyncio.wait_for(a.listeners.stop(), WAIT)
                assert await read_to_end(idle_r) == b""
                assert await read_to_end(busy_r) == b""  # cut: no answer came
                for w in (idle_w, busy_w):
                    w.close()
                assert a.listeners.listening() == []
                # the timeouts' sweep is stopped with them
                rest = asyncio.all_tasks() - {asyncio.current_task()}
                sweeps = [t for t in rest if "Timeouts.run" in repr(t.get_coro())]
                assert all(t.cancelling() for t in sweeps)

    asyncio.run(go())
    [line] = [x for x in debug_lines() if x["event"].startswith("drain time over")]
    assert line["event"] == "drain time over: closing connections with requests in flight"
    assert line["connections"] == 1 and line["streaming"] == 1  # the idle one: closed at once


def test_after_a_handover_an_answer_that_never_ends_is_cut_after_drain_seconds():
    async def go():
        async with McpServer() as mcp:
            async with agent(upstreams={ORIG: passthrough(mcp.port)}, drain_seconds=0.2) as a:
                reader, writer = await a.open()
                writer.write(GET)
                await asyncio.wait_for(mcp.got.wait(), WAIT)  # never answered
                a.listeners.stop_accepting()
                await asyncio.wait_for(a.listeners.stop(), WAIT)
                assert await read_to_end(reader) == b""
                writer.close()

    asyncio.run(go())


def test_stop_lets_an_answer_in_flight_finish(debug_lines):
    async def go():
        async with McpServer() as mcp:
            async with agent(upstreams={ORIG: passthrough(mcp.port)}, drain_seconds=WAIT) as a:
                reader, writer = await a.open()
                writer.write(GET)
                await asyncio.wait_for(mcp.got.wait(), WAIT)
                stopping = asyncio.create_task(a.listeners.stop())
                await asyncio.sleep(0)  # one turn of the loop: stop() runs to its wait
                # the listeners are closed at once; the request in flight is still answered
                assert not connects(socket.AF_INET, "127.0.0.1", a.cfg.listen_port)
                mcp.answer.set()
                answer = await read_to_end(reader)
                writer.close()
                assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok")
                await asyncio.wait_for(stopping, WAIT)
        [line] = [x for x in debug_lines() if x["event"] == "draining proxy connections"]
        assert line["connections"] == 1 and line["seconds"] == WAIT
        assert not [x for x in debug_lines() if x["event"].startswith("drain time over")]

    asyncio.run(go())


def test_a_finished_connection_is_no_longer_drained(debug_lines):
    async def go():
        async with agent(info=None) as a:
            reader, writer = await a.open()
            assert await read_to_end(reader) == b""  # refused and closed
            writer.close()

    asyncio.run(go())
    assert not [x for x in debug_lines() if x["event"] == "draining proxy connections"]


def test_after_a_handover_an_idle_connections_next_request_is_its_last(debug_lines):
    async def go():
        async with McpServer() as mcp:
            mcp.answer.set()
            async with agent(upstreams={ORIG: passthrough(mcp.port)}, drain_seconds=WAIT) as a:
                reader, writer = await a.open()
                writer.write(GET)
                first = await asyncio.wait_for(reader.readuntil(b"ok"), WAIT)
                assert b"Connection: close" not in first
                a.listeners.stop_accepting()
                assert a.listeners.handed_over
                # a new agent accepts now: nothing more here
                assert not connects(socket.AF_INET, "127.0.0.1", a.cfg.listen_port)
                stopping = asyncio.create_task(a.listeners.stop())
                await asyncio.sleep(0)  # one turn: stop() waits; the idle connection stays open
                writer.write(GET)
                last = await read_to_end(reader)
                writer.close()
                assert last.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close" in last
                await asyncio.wait_for(stopping, WAIT)
        [line] = [x for x in debug_lines() if x["event"].startswith("handed over")]
        assert line["connections"] == 1 and line["seconds"] == WAIT

    asyncio.run(go())


def test_a_tls_connection_accepted_as_the_handover_happens_is_served_one_request(ca):
    async def go():
        ups = {(HTTPS_INFO.orig_host, 8443): HTTPS}
        async with agent(ca=ca, upstreams=ups, info=HTTPS_INFO, drain_seconds=WAIT) as a:
            # accepted (looked up) before the handover, its handshake after it
            sock = socket.create_connection(("127.0.0.1", a.cfg.tls_listen_port))
            await asyncio.wait_for(a.records.seen.wait(), WAIT)
            a.listeners.stop_accepting()
            assert not connects(socket.AF_INET, "127.0.0.1", a.cfg.tls_listen_port)
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(sock=sock, ssl=trusting(ca), server_hostname="mcp.example"),
                WAIT,
            )
            writer.write(GET.replace(b"127.0.0.1:8080", b"mcp.example"))
            answer = await read_to_end(reader)  # answered (refused: unattested), then closed
            writer.close()
            assert answer.startswith(b"HTTP/1.1 403 ") and b"\r\nConnection: close" in answer

    asyncio.run(go())


def test_without_a_handover_a_tls_connection_stays_open_after_an_answer(ca):
    async def go():
        ups = {(HTTPS_INFO.orig_host, 8443): HTTPS}
        async with agent(ca=ca, upstreams=ups, info=HTTPS_INFO) as a:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", a.cfg.tls_listen_port, ssl=trusting(ca), server_hostname="mcp.example"
            )
            writer.write(GET.replace(b"127.0.0.1:8080", b"mcp.example"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            assert head.startswith(b"HTTP/1.1 403 ") and b"Connection: close" not in head
            writer.close()

    asyncio.run(go())


async def cut_short(a: Agent) -> dict[str, Any]:
    """A workload closing in the handshake without an alert (asyncio's TLS client refusing
    the certificate): the listener's audit event for it."""
    sock = socket.create_connection(("127.0.0.1", a.cfg.tls_listen_port))
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(
            sock=sock, ssl=ssl.create_default_context(), server_hostname="mcp.example"
        )
    return await a.audit.event("connection.tls_failed")


def test_a_handshake_cut_short_is_audited_too(ca):
    async def go():
        async with agent(
            ca=ca, upstreams={(HTTPS_INFO.orig_host, 8443): HTTPS}, info=HTTPS_INFO
        ) as a:
            event = await cut_short(a)
            assert event["server"] == "weather" and event["pid"] == HTTPS_INFO.tgid
            assert event["reason"].startswith("TLS with the workload failed (")

    asyncio.run(go())


def test_a_handshake_cut_short_is_audited_with_what_happened(ca):
    async def go():
        async with agent(ca=ca, upstreams={(HTTPS_INFO.orig_host, 8443): HTTPS}) as a:
            event = await cut_short(a)
            assert re.match(r"TLS with the workload failed \(\w", event["reason"])

    asyncio.run(go())
