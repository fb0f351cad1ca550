"""One trust decision per MCP server (agent/oauth/trust.py server_tls), followed by the
discovery probe and by the proxy's upstream connections alike; and the workload_url mapping
of an https server onto a plain address (agent/inject/upstreams.py). The TLS peers are real
in-process servers on 127.0.0.1 with certificates of a CA made in the test."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import ServerSection
from agent.inject.components import redirect_targets
from agent.inject.redirect import Target
from agent.inject.upstreams import UpstreamCertificateError, UpstreamResolver, _servers, connect
from agent.oauth.discovery import Discovery, TlsRouter
from agent.oauth.trust import (
    AuthorizationServerCertificateRefused,
    McpServerCertificateRefused,
    ServerTls,
    authorization_server_tls,
    certificate_failure,
    server_tls,
    verifying_context,
)
from tests.tlsca import TestCA


@pytest.mark.parametrize(
    ("ca_file", "upstream_ca_file", "expected"),
    [
        ("/s.pem", "/u.pem", ServerTls("/s.pem", "servers[w].ca_file")),
        ("", "/u.pem", ServerTls("/u.pem", "inject.upstream_ca_file")),
        ("", "", ServerTls("", "the system store")),
    ],
)
def test_a_servers_ca_file_wins_then_inject_upstream_ca_file_then_the_system_store(
    ca_file, upstream_ca_file, expected
):
    assert server_tls("w", ca_file, upstream_ca_file) == expected


def test_the_authorization_server_is_verified_by_oauth_ca_file_alone():
    assert authorization_server_tls("/as.pem") == ServerTls("/as.pem", "oauth.ca_file")
    assert authorization_server_tls("").source == "the system store"


def test_one_context_per_ca_file_shared_by_everything_that_connects_with_it(tmp_path):
    ca = TestCA(tmp_path)
    assert verifying_context(str(ca.cert_path)) is server_tls("a", str(ca.cert_path), "").context
    ctx = verifying_context(str(ca.cert_path))
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_certificate_failure_is_found_under_the_errors_wrapping_it():
    verify = ssl.SSLCertVerificationError(1, "x")
    verify.verify_message = "unable to get local issuer certificate"
    try:
        try:
            raise verify
        except ssl.SSLError as e:
            raise httpx.ConnectError("wrapped") from e
    except httpx.ConnectError as outer:
        cause = certificate_failure(outer)
    assert cause == "certificate verify failed: unable to get local issuer certificate"
    assert certificate_failure(ConnectionRefusedError()) is None


# ------------------------------------------------------------ real TLS peers


class TlsPeer:
    """An https server on 127.0.0.1 answering every request 401 with a Bearer challenge."""

    def __init__(self, tmp: Path):
        self.ca = TestCA(tmp)
        cert, key = self.ca.issue("peer")
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        self.requests = 0

    async def __aenter__(self) -> TlsPeer:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                return
            self.requests += 1
            writer.write(
                b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer scope="tools"\r\n'
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()


def other_ca(tmp: Path) -> str:
    d = tmp / "other"
    d.mkdir()
    return str(TestCA(d, "another CA").cert_path)


def probe(tmp: Path, ca_file: str, as_tls: ServerTls | None = None) -> tuple[Any, int]:
    """discovery's 401 probe of a TlsPeer, the MCP server verified by ca_file."""

    async def run() -> tuple[Any, int]:
        async with TlsPeer(tmp) as peer:
            tls = server_tls("weather", ca_file or str(peer.ca.cert_path), "")
            # the client's default trust (the authorization servers') knows nothing of the
            # peer: only the MCP server's own trust, routed per request, can verify it
            router = TlsRouter(httpx.AsyncHTTPTransport(trust_env=False))
            async with httpx.AsyncClient(transport=router, trust_env=False) as http:
                disc = Discovery(http, mcp_tls=lambda _url: tls)
                try:
                    got: Any = await disc.challenge(f"https://localhost:{peer.port}/mcp")
                except McpServerCertificateRefused as e:
                    got = e
            return got, peer.requests

    return asyncio.run(run())


def test_the_probe_verifies_the_mcp_server_by_its_own_trust(tmp_path):
    got, requests = probe(tmp_path, "")
    assert got == {"bearer": {"scope": "tools"}} and requests == 1


def test_a_probe_whose_certificate_does_not_verify_names_the_mcp_server_and_sends_nothing(
    tmp_path,
):
    got, requests = probe(tmp_path, other_ca(tmp_path))
    assert isinstance(got, McpServerCertificateRefused)
    assert got.kind == "mcp_server_certificate"
    message = str(got)
    assert message.startswith("the MCP server's certificate did not verify (certificate ")
    assert "servers[weather].ca_file" in message and "Nothing was sent" in message
    assert requests == 0


def test_authorization_server_metadata_failing_verification_names_the_authorization_server(
    tmp_path,
):
    async def run() -> BaseException | None:
        async with TlsPeer(tmp_path) as peer:
            tls = authorization_server_tls(other_ca(tmp_path))
            router = TlsRouter(httpx.AsyncHTTPTransport(verify=tls.context, trust_env=False))
            async with httpx.AsyncClient(transport=router, trust_env=False) as http:
                # the MCP server's trust would verify it: it must not be used for the AS
                disc = Discovery(
                    http,
                    mcp_tls=lambda _url: server_tls("w", str(peer.ca.cert_path), ""),
                    as_tls=tls,
                )
                try:
                    await disc.server(f"https://localhost:{peer.port}")
                except AuthorizationServerCertificateRefused as e:
                    return e
        return None

    e = asyncio.run(run())
    assert e is not None and "the authorization server's certificate" in str(e)
    assert "oauth.ca_file" in str(e)


def test_upstream_connections_verify_by_the_upstreams_trust_and_count_tls(tmp_path):
    connected: list[str] = []

    async def run(ca_file: str | None) -> str:
        async with TlsPeer(tmp_path) as peer:
            server = ServerSection(
                name="weather",
                url=f"https://localhost:{peer.port}/mcp",
                ca_file=ca_file or str(peer.ca.cert_path),
            )
            up = _servers([server])[0][2]
            try:
                # the fallback context trusts nothing the peer has: up's own trust decides
                conn = await connect(
                    up, ssl.create_default_context(), 10, lambda u, k: connected.append(k)
                )
            except UpstreamCertificateError as e:
                return str(e)
            conn.transport.close()
            return "connected"

    assert asyncio.run(run(None)) == "connected" and connected == ["tls"]
    failed = asyncio.run(run(other_ca(tmp_path)))
    assert failed.startswith("the MCP server's certificate did not verify (certificate verify")
    assert "servers[weather].ca_file" in failed and connected == ["tls"]


# ------------------------------------------------------------ workload_url mapping


def dns(answers: dict[str, list[str]]):
    def resolve(host: str, port: int, type: int = 0) -> list[tuple[Any, ...]]:
        return [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, type, 6, "", (ip, port))
            for ip in answers[host]
        ]

    return resolve


def test_a_workload_url_maps_a_plain_address_onto_the_https_server():
    server = ServerSection(
        name="weather",
        url="https://mcp.example:8443/mcp",
        workload_url="http://127.0.0.1:18080/mcp",
        ca_file="/etc/mcp-ca.pem",
    )
    resolver = UpstreamResolver(
        [server], resolve=dns({"mcp.example": ["10.0.0.1"], "127.0.0.1": ["127.0.0.1"]})
    )
    ups = resolver.refresh()
    direct, mapped = ups[("10.0.0.1", 8443)], ups[("127.0.0.1", 18080)]
    assert direct.scheme == "https" and direct.workload_tls and direct.send_host is None
    # the workload speaks plain HTTP there; credless originates TLS to the URL
    assert mapped.scheme == "http" and not mapped.workload_tls
    assert (mapped.host, mapped.port, mapped.origin) == ("mcp.example", 8443, direct.origin)
    assert mapped.tls == direct.tls == ServerTls("/etc/mcp-ca.pem", "servers[weather].ca_file")
    assert mapped.send_host == b"mcp.example:8443"
    assert b"127.0.0.1:18080" in mapped.authorities and b"mcp.example:8443" in mapped.authorities
    assert redirect_targets(ups, 15002) == {
        Target("10.0.0.1", 8443, 15002),  # https: the TLS listener
        Target("127.0.0.1", 18080, 0),  # the workload_url: the plain one
    }


def test_localhost_is_intercepted_at_every_address_it_resolves_to():
    server = ServerSection(name="weather", url="https://localhost:8443/mcp")
    resolver = UpstreamResolver([server], resolve=dns({"localhost": ["::1", "127.0.0.1"]}))
    ups = resolver.refresh()
    assert set(ups) == {("::1", 8443), ("127.0.0.1", 8443)}
    assert {u.name for u in ups.values()} == {"weather"}


@pytest.mark.parametrize(
    ("url", "workload_url", "says"),
    [
        ("http://a.example/mcp", "http://127.0.0.1:1/mcp", "is for an https url"),
        ("https://a.example/mcp", "https://127.0.0.1:1/mcp", "must be a plain http:// URL"),
        ("https://a.example/mcp", "http://127.0.0.1:1/other", "its path must be the url's"),
        ("https://a.example:8443/mcp", "http://a.example:8443/mcp", "the url's own address"),
    ],
)
def test_a_workload_url_that_cannot_map_is_refused_at_start(url, workload_url, says):
    with pytest.raises(ValueError, match=says):
        _servers([ServerSection(name="w", url=url, workload_url=workload_url)])
