"""Issue 17, "HTTPS authorization server": oidc-provider served over TLS (a CA made in the
test), credless verifying it through oauth.ca_file for discovery, dynamic registration and
token requests; the client's jwks_uri served by the bundle endpoint over https, which is
what oidc-provider fetches (trusting the test CA, as a remote server trusts the Web PKI)
to verify credless's assertions. A plain-http jwks_uri for another host is refused before
anything is registered."""

from __future__ import annotations

import dataclasses
import io
import socket
import ssl
import urllib.error
import urllib.request

import pytest

from agent.identity.bundle_endpoint import BundleEndpoint, oauth_jwks
from agent.oauth.errors import OAuthError, RegistrationError
from agent.oauth.service import OAuthService
from tests.helpers import audit_events, free_port
from tests.kernel import enter_cgroup
from tests.mcp.peers import McpServer, run_client
from tests.oidc.peer import OidcProvider
from tests.oidc.remote import env, start_agent
from tests.oidc.stack import build as stack_build
from tests.oidc.stack import running
from tests.tlsca import TestCA
from tests.world import JWT_RESOURCE, build_world, server_table

A = "spiffe://example.org/workload/a"
RES = "http://127.0.0.1:9/mcp"  # a resource identifier, never dialled here
SPIFFE_ID = "spiffe://example.org/agent/remote-as"


def https_stack(tmp_path, ca: TestCA, **servers_settings):
    return stack_build(
        tmp_path,
        stream=io.StringIO(),
        identities=(A,),
        servers=[{"name": "mcp", "url": RES, "dpop": "never", **servers_settings}],
        resources={RES: {"format": "jwt", "scope": "tools"}},
        registered=() if servers_settings.get("registration") == "dynamic" else (A,),
        oidc_kwargs={"registration": True, "dpop": False},
        tls=ca,
    )


def with_service(s, **oauth_settings) -> None:
    """s.svc made again from s's config with these [oauth] settings."""
    cfg = dataclasses.replace(s.cfg, oauth=dataclasses.replace(s.cfg.oauth, **oauth_settings))
    s.new_service = lambda: OAuthService(
        cfg, s.mgr, str(s.state_dir), audit=s.audit, jwks_uri=s.jwks_uri
    )
    s.svc = s.new_service()


def test_discovery_registration_and_tokens_over_verified_https(tmp_path):
    ca = TestCA(tmp_path)
    s = https_stack(tmp_path, ca, registration="dynamic")
    assert s.oidc.issuer.startswith("https://localhost:")
    assert s.jwks_uri == f"https://127.0.0.1:{s.bundle.address[1]}/jwks.json"
    with running(s):
        tok = s.run(s.svc.token(s.ident(A), "mcp"))
    assert tok.issuer == s.oidc.issuer
    created = s.oidc.events("registration_create.success")
    assert [(c["client_id"], c["jwks_uri"]) for c in created] == [(A, s.jwks_uri)]
    assert created[0]["token_endpoint_auth_method"] == "private_key_jwt"
    # the software statement and then the token request's assertion were verified with
    # keys oidc-provider fetched itself, over https, from the bundle endpoint
    fetched = s.oidc.fetched()
    assert fetched and set(fetched) == {s.jwks_uri}
    assert [e["client_id"] for e in s.oidc.events("grant.success")] == [A]


def test_an_authorization_server_whose_certificate_does_not_verify_gets_nothing(tmp_path):
    ca = TestCA(tmp_path)
    s = https_stack(tmp_path, ca, registration="dynamic")
    with_service(s, ca_file="")  # the system store: the test CA is not in it
    with running(s), pytest.raises(OAuthError) as e:
        s.run(s.svc.token(s.ident(A), "mcp"))
    assert "certificate verify failed" in str(e.value), e.value
    assert not s.oidc.events("registration_create.success")
    assert not s.oidc.events("grant.success") and not s.oidc.events("grant.error")


@pytest.mark.parametrize(
    "jwks_uri, why",
    [
        ("http://node.example:8444/jwks.json", "plain http to a host that is not loopback"),
        ("https://0.0.0.0:8444/jwks.json", "listen-on-all address"),
    ],
)
def test_a_jwks_uri_the_authorization_server_cannot_fetch_safely_is_not_registered(
    tmp_path, jwks_uri, why
):
    ca = TestCA(tmp_path)
    s = https_stack(tmp_path, ca, registration="dynamic")
    with_service(s, jwks_uri=jwks_uri)
    with running(s), pytest.raises(RegistrationError) as e:
        s.run(s.svc.token(s.ident(A), "mcp"))
    msg = str(e.value)
    assert why in msg and jwks_uri in msg and "bundle_endpoint.cert_file" in msg, msg
    assert not s.oidc.events("registration_create.success")
    assert not s.oidc.events("fetch")


def test_the_bundle_endpoint_serves_https_only_with_its_certificate(tmp_path):
    ca = TestCA(tmp_path)
    s = https_stack(tmp_path, ca)
    try:
        port = s.bundle.address[1]
        trusting = ssl.create_default_context(cafile=str(ca.cert_path))
        url = f"https://127.0.0.1:{port}/jwks.json"
        with urllib.request.urlopen(url, context=trusting, timeout=10) as r:
            assert r.read() == oauth_jwks(s.mgr.bundle())
        # a client that does not trust the certificate fails its handshake...
        with pytest.raises(urllib.error.URLError) as refused:
            urllib.request.urlopen(url, context=ssl.create_default_context(), timeout=10)
        assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
        # ...plain http gets no document...
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"GET /jwks.json HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = c.recv(65536)
            except ConnectionResetError:  # the TLS server's answer to a plaintext hello
                answer = b""
            assert b'"keys"' not in answer
        # ...and a client that stalls in its handshake holds up no other
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            with urllib.request.urlopen(url, context=trusting, timeout=10) as r:
                assert r.status == 200
    finally:
        s.oidc.stop()
        s.bundle.stop()
        s.mgr.stop()


def test_a_bundle_endpoint_certificate_that_cannot_be_loaded_fails_its_start(tmp_path):
    ca = TestCA(tmp_path)
    cert, _ = ca.issue("bundle")
    other_cert, other_key = ca.issue("other")
    from agent import config

    section = config.parse(
        {
            "bundle_endpoint": {
                "listen": "127.0.0.1:1",
                "cert_file": str(cert),
                "key_file": str(other_key),
            }
        }
    ).bundle_endpoint
    endpoint = BundleEndpoint(None, "127.0.0.1", free_port(), section)
    with pytest.raises(ValueError, match="cannot load the certificate") as e:
        endpoint.start()
    assert str(cert) in str(e.value) and "key matching the leaf" in str(e.value)
    assert other_cert.exists()


# ---------------------------------------------------------------- end to end, real kernel
@pytest.mark.kernel
def test_sdk_client_through_credless_with_an_https_authorization_server(tmp_path):
    """The Python SDK client, holding nothing, calls a plain-http MCP server whose tokens
    come from oidc-provider over https; credless registers its client dynamically (the
    jwks_uri its https bundle endpoint) and gets the token with a JWT-SVID."""
    ca = TestCA(tmp_path)
    with build_world(tmp_path, SPIFFE_ID) as w:
        mcp = w.enter(McpServer(tmp_path))
        oidc = w.enter(
            OidcProvider(
                tmp_path,
                resources={mcp.url: JWT_RESOURCE},
                registration=True,
                dpop=False,
                tls=ca,
            )
        )
        with env(SSL_CERT_FILE=str(ca.cert_path)):  # the MCP server reads the AS's JWKS
            mcp.start(oidc.issuer)
        agent = start_agent(
            w,
            server_table("weather", mcp.url, issuer=oidc.issuer, registration="dynamic"),
            ca.issue("bundle"),
            settings=f'[oauth]\nca_file = "{ca.cert_path}"\n',
        )
        out = run_client(
            mcp.url, "list", 'call:echo:{"text": "over https"}', preexec=enter_cgroup(w.cg)
        )
        assert "error" not in out[0], out
        assert out[1]["text"] == "over https"
        jwks_uri = f"https://127.0.0.1:{w.bundle_port}/jwks.json"
        created = oidc.events("registration_create.success")
        assert [(c["client_id"], c["jwks_uri"]) for c in created] == [(SPIFFE_ID, jwks_uri)]
        assert oidc.fetched() and set(oidc.fetched()) == {jwks_uri}
        assert [e["client_id"] for e in oidc.events("grant.success")] == [SPIFFE_ID]
        assert mcp.stats()["calls"] == {"echo": 1}
        events = audit_events(agent.stdout_path, "request.injected")
        registered = [e for e in events if e["event"] == "oauth.client_registered"]
        assert registered and registered[0]["issuer"] == oidc.issuer
        obtained = [e for e in events if e["event"] == "token.obtained"]
        assert obtained and obtained[0]["issuer"] == oidc.issuer
