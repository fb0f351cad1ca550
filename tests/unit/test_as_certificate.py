"""An authorization server whose certificate does not verify, met after discovery: the
token request, the dynamic registration, the introspection and the client deletion each
raise AuthorizationServerCertificateRefused (agent/oauth/trust.py) naming the authorization
server, the OpenSSL cause and oauth.ca_file, not "unavailable"; nothing is sent to it, and
the service counts and audits the refusal under its kind. The peers are real in-process TLS
servers on 127.0.0.1: the metadata's, with a certificate of the CA oauth.ca_file names, and
the endpoints', with one of another CA."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from agent.config import Config, OAuthSection, ServerSection
from agent.identity.bundle import TrustBundle
from agent.identity.entries import Entry
from agent.identity.jwtsvid import JwtSvid
from agent.identity.manager import Identity
from agent.identity.spiffeid import SpiffeId, TrustDomain
from agent.oauth import registration as reg
from agent.oauth.errors import ServerUnavailable
from agent.oauth.service import OAuthService
from agent.oauth.tokens import Token, fingerprint, request_token
from agent.oauth.trust import AuthorizationServerCertificateRefused, authorization_server_tls
from agent.observe.logging import AuditLog
from tests.helpers import free_port
from tests.tlsca import TestCA

SID = "spiffe://example.org/w"
IDENT = Identity(SpiffeId.parse(SID), Entry("w", SID, frozenset()))


class TlsServer:
    """https on 127.0.0.1: answers each path from `routes` (JSON), counting the requests
    that arrived (a handshake the client refused never makes one)."""

    def __init__(self, ca: TestCA, name: str):
        cert, key = ca.issue(name)
        import ssl

        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        self.routes: dict[str, dict] = {}
        self.requests: list[str] = []

    async def __aenter__(self) -> TlsServer:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                writer.close()
                return
            path = head.split(b" ", 2)[1].decode()
            self.requests.append(path)
            body = json.dumps(self.routes.get(path, {"error": "not_found"})).encode()
            status = b"200 OK" if path in self.routes else b"404 Not Found"
            writer.write(
                b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (status, len(body), body)
            )
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=self.ctx)
        self.url = f"https://localhost:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()


class Minting:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1()).public_key()

    def jwt_svid(
        self, ident: Identity, audience: list[str], ttl: int | None = None, iss: str | None = None
    ) -> JwtSvid:
        return JwtSvid(
            "eyJhbGciOiJFUzI1NiJ9.e30.c2ln", ident.spiffe_id, tuple(audience), "j", 0, 60
        )

    def bundle(self) -> TrustBundle:
        return TrustBundle(TrustDomain("example.org"), jwt_authorities={"k1": self.key})


def cas(tmp: Path) -> tuple[TestCA, TestCA]:
    """The CA oauth.ca_file names, and another, which issued the endpoints' certificate."""
    (tmp / "trusted").mkdir()
    (tmp / "other").mkdir()
    return TestCA(tmp / "trusted"), TestCA(tmp / "other", "another CA")


def refused_as_the_authorization_server(e: BaseException, url: str, ca_file: str) -> None:
    assert isinstance(e, AuthorizationServerCertificateRefused), repr(e)
    assert e.kind == "authorization_server_certificate" and e.url == url
    message = str(e)
    assert message.startswith("the authorization server's certificate did not verify")
    assert "certificate verify failed" in message and url in message
    assert f"oauth.ca_file ({ca_file})" in message and "Nothing was sent" in message


async def service_world(tmp: Path, registration: str = "preregistered"):
    """The metadata server (trusted) naming endpoints on the other (untrusted); a started
    OAuthService trusting the first by oauth.ca_file. Yields (svc, meta, endpoints, audit)."""
    trusted, other = cas(tmp)
    meta_srv = TlsServer(trusted, "as")
    endpoints = TlsServer(other, "endpoints")
    await meta_srv.__aenter__()
    await endpoints.__aenter__()
    issuer = meta_srv.url
    meta_srv.routes["/.well-known/oauth-authorization-server"] = {
        "issuer": issuer,
        "token_endpoint": endpoints.url + "/token",
        "registration_endpoint": endpoints.url + "/reg",
        "introspection_endpoint": endpoints.url + "/introspect",
    }
    cfg = Config(
        oauth=OAuthSection(ca_file=str(trusted.cert_path)),
        servers=(
            ServerSection(
                name="mcp",
                url="http://127.0.0.1:9/mcp",
                issuer=issuer,
                registration=registration,
                dpop="never",
            ),
        ),
    )
    out = io.StringIO()
    registry = CollectorRegistry()
    svc = OAuthService(
        cfg,
        Minting(),
        str(tmp / "state"),
        audit=AuditLog("node", stream=out),
        registry=registry,
        jwks_uri="https://127.0.0.1:8444/jwks.json",
    )
    await svc.start()

    async def close() -> None:
        await svc.stop()
        await endpoints.__aexit__()
        await meta_srv.__aexit__()

    return svc, meta_srv, endpoints, out, registry, str(trusted.cert_path), close


@pytest.mark.parametrize("registration", ["preregistered", "dynamic"])
def test_a_token_or_registration_endpoint_failing_verification_is_refused_and_audited(
    tmp_path, registration
):
    async def run() -> None:
        svc, meta_srv, endpoints, out, registry, ca_file, close = await service_world(
            tmp_path, registration
        )
        try:
            with pytest.raises(AuthorizationServerCertificateRefused) as e:
                await svc.token(IDENT, "mcp")
        finally:
            await close()
        path = "/token" if registration == "preregistered" else "/reg"
        refused_as_the_authorization_server(e.value, endpoints.url + path, ca_file)
        assert meta_srv.requests == ["/.well-known/oauth-authorization-server"]
        assert endpoints.requests == []  # the handshake failed: not a byte of the request
        assert svc.store.get(SID, meta_srv.url) is None
        [failed] = [
            json.loads(line)
            for line in out.getvalue().splitlines()
            if json.loads(line)["event"] == "token.failed"
        ]
        assert failed["kind"] == "authorization_server_certificate"
        assert failed["server"] == "mcp" and failed["spiffe_id"] == SID
        assert "authorization server's certificate" in failed["reason"]
        labels = {"server": "mcp", "check": "authorization_server_certificate"}
        assert registry.get_sample_value("credless_oauth_refused_total", labels) == 1

    asyncio.run(run())


def test_an_introspection_endpoint_failing_verification_is_refused(tmp_path):
    async def run() -> None:
        svc, _meta, endpoints, _out, _reg, ca_file, close = await service_world(tmp_path)
        token = Token(
            "opaque", "Bearer", 0, 9e9, "", "r", "i", SID, SID, None, fingerprint("o"), None
        )
        try:
            with pytest.raises(AuthorizationServerCertificateRefused) as e:
                await svc.introspect(IDENT, "mcp", token)
        finally:
            await close()
        refused_as_the_authorization_server(e.value, endpoints.url + "/introspect", ca_file)
        assert endpoints.requests == []

    asyncio.run(run())


def test_a_client_deletion_failing_verification_sends_no_registration_token(tmp_path):
    async def run() -> None:
        trusted, other = cas(tmp_path)
        tls = authorization_server_tls(str(trusted.cert_path))
        async with TlsServer(other, "reg") as peer:
            client = reg.RegisteredClient(SID, peer.url, "c1", peer.url + "/reg/c1", "rat-secret")
            async with httpx.AsyncClient(verify=tls.context, trust_env=False) as http:
                with pytest.raises(AuthorizationServerCertificateRefused) as e:
                    await reg.delete(http, client, tls)
            assert peer.requests == []
        refused_as_the_authorization_server(e.value, peer.url + "/reg/c1", str(trusted.cert_path))
        assert "rat-secret" not in str(e.value)

    asyncio.run(run())


def test_an_authorization_server_not_answering_is_still_unavailable(tmp_path):
    async def run() -> None:
        url = f"https://127.0.0.1:{free_port()}/token"  # nobody listens
        async with httpx.AsyncClient(trust_env=False) as http:
            with pytest.raises(ServerUnavailable) as e:
                await request_token(
                    http,
                    token_endpoint=url,
                    issuer="https://127.0.0.1",
                    resource="http://127.0.0.1:9/mcp",
                    scope="",
                    profile="jwt-bearer",
                    assertion_audience="issuer",
                    client_id=SID,
                    spiffe_id=SID,
                    mint_assertion=lambda aud, iss: "assertion",
                    dpop=None,
                    nonces={},
                )
        assert e.value.kind == "unavailable" and url in str(e.value)

    asyncio.run(run())
