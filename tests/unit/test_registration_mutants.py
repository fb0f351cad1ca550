"""Dynamic client registration (agent/oauth/registration.py), found by mutation testing:
what is sent to the registration endpoint (the RFC 7591 metadata, the keys and the DPoP
binding), what is refused before anything is sent (a jwks_uri the authorization server
could not fetch safely, an endpoint off https), how an answer is read (the statuses taken
as success, the client_id, the management URI and token), what the RFC 7592 deletion sends
and takes as done, and what is kept in clients.json.

The authorization server is an httpx MockTransport recording each request (sans-IO, as in
test_tokens_mutants), or the TLS server of test_as_certificate for a certificate that does
not verify."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.oauth import registration as reg
from agent.oauth.errors import (
    InsecureEndpoint,
    MalformedResponse,
    RegistrationError,
    ServerUnavailable,
)
from agent.oauth.trust import (
    AuthorizationServerCertificateRefused,
    ServerTls,
    authorization_server_tls,
)
from tests.helpers import free_port
from tests.unit import test_tokens_mutants
from tests.unit.test_as_certificate import TlsServer, cas

SID = "spiffe://example.org/w"
ISSUER = "https://as.example"
STATEMENT = "software-statement-jwt"
JWKS = {"keys": [{"kty": "EC", "crv": "P-256", "x": "eA", "y": "eQ", "kid": "k1"}]}
MANAGEMENT_TOKEN = "registration-access-token"

debug_lines = test_tokens_mutants.debug_lines  # the diagnostic stream at debug, parsed


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Peer:
    """The authorization server as an httpx MockTransport (nothing is dialled, as in
    test_tokens_mutants): every request is answered (status, body) and recorded."""

    status: int = 201
    body: Any = None
    raw: bytes | None = None  # a body sent as is instead of `body` as JSON
    requests: list[Request] = field(default_factory=list)
    url: str = "http://127.0.0.1:8443"

    def answer(self, request: httpx.Request) -> httpx.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(Request(request.method, request.url.path, headers, request.content))
        out = self.raw if self.raw is not None else json.dumps(self.body).encode()
        return httpx.Response(
            self.status, content=out, headers={"Content-Type": "application/json"}
        )


def run(peer: Peer, call: Callable[[httpx.AsyncClient, str], Awaitable[Any]]) -> Any:
    """call(http, peer's URL) against peer; its result, or the exception it raised."""

    async def go() -> Any:
        async with httpx.AsyncClient(transport=httpx.MockTransport(peer.answer)) as http:
            try:
                return await call(http, peer.url)
            except Exception as e:  # noqa: BLE001 (the tests look at which)
                return e

    return asyncio.run(go())


def registering(**kw: Any) -> Callable[[httpx.AsyncClient, str], Awaitable[Any]]:
    def call(http: httpx.AsyncClient, url: str) -> Awaitable[Any]:
        args: dict[str, Any] = dict(
            endpoint=url + "/register",
            issuer=ISSUER,
            spiffe_id=SID,
            jwks_uri=None,
            jwks=JWKS,
            software_statement=STATEMENT,
            dpop=False,
        )
        args.update(kw)
        args = {k: (v(url) if callable(v) else v) for k, v in args.items()}
        return reg.register(http, **args)

    return call


# --- what is sent ---------------------------------------------------------------------------


def test_a_registration_posts_the_identitys_metadata_as_json():
    peer = Peer(201, {"client_id": "c1"})
    client = run(peer, registering())
    assert isinstance(client, reg.RegisteredClient)
    (sent,) = peer.requests
    assert sent.method == "POST" and sent.path == "/register"
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["accept"] == "application/json"
    assert "authorization" not in sent.headers
    assert json.loads(sent.body) == {
        "client_name": SID,
        "grant_types": ["client_credentials"],
        "response_types": [],
        "redirect_uris": [],
        "application_type": "web",
        "token_endpoint_auth_method": "private_key_jwt",
        "token_endpoint_auth_signing_alg": "ES256",
        "software_statement": STATEMENT,
        "spiffe_id": SID,
        "jwks": JWKS,
    }


def test_a_registration_with_dpop_asks_for_bound_tokens_and_names_the_jwks_uri():
    peer = Peer(201, {"client_id": "c1"})
    run(peer, registering(dpop=True, jwks_uri=lambda url: url + "/bundle"))
    meta = json.loads(peer.requests[0].body)
    assert meta["dpop_bound_access_tokens"] is True
    assert meta["jwks_uri"] == peer.url + "/bundle" and "jwks" not in meta


def test_the_registration_debug_line_names_the_request_not_the_statement(debug_lines):
    peer = Peer(201, {"client_id": "c1", "registration_access_token": MANAGEMENT_TOKEN})
    run(peer, registering(dpop=True, jwks_uri=lambda url: url + "/bundle"))
    lines = [line for line in debug_lines() if line.get("event") == "client registration request"]
    assert len(lines) == 1
    (line,) = lines
    assert line["url"] == peer.url + "/register" and line["spiffe_id"] == SID
    assert line["jwks_uri"] == peer.url + "/bundle" and line["dpop_bound_access_tokens"] is True
    text = json.dumps(debug_lines())
    assert STATEMENT not in text and MANAGEMENT_TOKEN not in text


def test_an_endpoint_off_https_is_refused_and_nothing_is_sent():
    peer = Peer(201, {"client_id": "c1"})
    err = run(peer, registering(endpoint="http://as.example/register"))
    assert isinstance(err, InsecureEndpoint)
    assert str(err).startswith("registration endpoint 'http://as.example/register' refused: ")
    assert peer.requests == []


def test_a_jwks_uri_the_server_cannot_fetch_safely_is_refused_and_nothing_is_sent():
    peer = Peer(201, {"client_id": "c1"})
    err = run(peer, registering(jwks_uri="http://bundle.example/keys"))
    assert isinstance(err, RegistrationError) and err.url == peer.url + "/register"
    assert peer.requests == []


def refused_certificate(
    tmp_path: Path, call: Callable[[httpx.AsyncClient, str, ServerTls | None], Awaitable[Any]]
) -> tuple[list[AuthorizationServerCertificateRefused], str]:
    """call(http, url, tls) against an https server whose certificate another CA issued,
    the client verifying by the system store (tls left out: None), then by oauth.ca_file
    naming the right CA: each refusal, in that order, and that CA file. The server got no
    request."""

    async def go() -> tuple[list[AuthorizationServerCertificateRefused], str]:
        trusted, other = cas(tmp_path)
        refusals: list[AuthorizationServerCertificateRefused] = []
        async with TlsServer(other, "reg") as server:
            for tls in (None, authorization_server_tls(str(trusted.cert_path))):
                verify = tls.context if tls is not None else True
                async with httpx.AsyncClient(verify=verify, trust_env=False) as http:
                    with pytest.raises(AuthorizationServerCertificateRefused) as e:
                        await call(http, server.url, tls)
                refusals.append(e.value)
            assert server.requests == []
        return refusals, str(trusted.cert_path)

    return asyncio.run(go())


def test_a_certificate_that_does_not_verify_is_refused_naming_what_it_was_verified_by(
    tmp_path,
):
    """tls left out: the client verifies by the system store, and the refusal says so."""

    def call(http: httpx.AsyncClient, url: str, tls: ServerTls | None) -> Awaitable[Any]:
        return registering(**({} if tls is None else {"tls": tls}))(http, url)

    (by_store, by_file), ca_file = refused_certificate(tmp_path, call)
    assert "certificate verify failed" in str(by_store) and "the system store" in str(by_store)
    assert "verified against oauth.ca_file" not in str(by_store)
    assert f"verified against oauth.ca_file ({ca_file})" in str(by_file)


# --- how the answer is read -----------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201])
def test_a_created_client_is_returned_with_its_management_uri_and_token(status):
    answer = {
        "client_id": "c1",
        "registration_client_uri": "https://as.example/register/c1",
        "registration_access_token": MANAGEMENT_TOKEN,
    }
    client = run(Peer(status, answer), registering())
    assert isinstance(client, reg.RegisteredClient)
    assert (client.spiffe_id, client.issuer, client.client_id) == (SID, ISSUER, "c1")
    assert client.registration_client_uri == "https://as.example/register/c1"
    assert client.registration_access_token == MANAGEMENT_TOKEN


def test_a_client_without_management_is_returned_without_uri_or_token():
    client = run(Peer(201, {"client_id": "c1"}), registering())
    assert client.client_id == "c1"
    assert client.registration_client_uri is None and client.registration_access_token is None


@pytest.mark.parametrize("status", [202, 400, 403, 409])
def test_a_status_other_than_200_or_201_is_a_registration_error_with_the_servers_words(status):
    answer = {"error": "invalid_software_statement", "error_description": "bad aud"}
    err = run(Peer(status, answer), registering())
    assert isinstance(err, RegistrationError) and not isinstance(err, MalformedResponse)
    assert err.status == status and err.error == "invalid_software_statement"
    assert err.error_description == "bad aud"
    url = err.url
    assert url is not None and url.endswith("/register")
    assert str(err).startswith(f"registration at {url} failed with HTTP {status}")


def test_a_refusal_whose_body_is_not_an_object_has_no_error_code():
    err = run(Peer(400, ["invalid_client_metadata"]), registering())
    assert isinstance(err, RegistrationError) and err.status == 400
    assert err.error is None and err.error_description is None


def test_a_server_failing_or_answering_other_than_json_is_named_as_the_registration():
    down = run(Peer(503, {"error": "temporarily_unavailable"}), registering())
    assert isinstance(down, ServerUnavailable) and down.status == 503
    assert str(down) == f"registration at {down.url} failed with HTTP 503"
    garbled = run(Peer(201, raw=b"<html>created</html>"), registering())
    assert isinstance(garbled, MalformedResponse) and garbled.status == 201
    assert str(garbled).startswith(f"registration at {garbled.url} answered HTTP 201")


@pytest.mark.parametrize(
    "answer", [["c1"], {}, {"client_id": 7}, {"client_id": None}, {"client": "c1"}]
)
def test_an_answer_without_a_string_client_id_is_malformed(answer):
    err = run(Peer(201, answer), registering())
    assert isinstance(err, MalformedResponse)
    assert err.url is not None and err.url.endswith("/register")
    assert str(err).startswith(f"registration at {err.url} returned no client_id")


# --- the metadata and its keys --------------------------------------------------------------

REG = "https://as.example/register"


def test_the_metadata_prefers_the_jwks_uri_over_inline_keys():
    meta = reg.client_metadata(
        SID, STATEMENT, endpoint=REG, jwks_uri="https://b.example/k", jwks=JWKS
    )
    assert meta == {
        "token_endpoint_auth_method": "private_key_jwt",
        "token_endpoint_auth_signing_alg": "ES256",
        "software_statement": STATEMENT,
        "spiffe_id": SID,
        "jwks_uri": "https://b.example/k",
    }


@pytest.mark.parametrize("jwks", [JWKS, {}])
def test_without_a_jwks_uri_the_keys_go_inline_even_an_empty_set(jwks):
    meta = reg.client_metadata(SID, STATEMENT, endpoint=REG, jwks_uri="", jwks=jwks)
    assert meta["jwks"] == jwks and "jwks_uri" not in meta


def test_without_any_keys_nothing_can_be_registered():
    with pytest.raises(RegistrationError) as e:
        reg.client_metadata(SID, STATEMENT, endpoint=REG, jwks_uri=None, jwks=None)
    assert e.value.url == REG
    assert str(e.value) == (
        f"no keys to register at {REG}: the bundle endpoint is off and oauth.jwks_uri is not set"
    )


@pytest.mark.parametrize(
    "jwks_uri, endpoint, reason",
    [
        ("http://bundle.example/k", REG, "plain http to a host that is not loopback"),
        ("ftp://bundle.example/k", REG, "not an absolute https URL"),
        ("https://[::1/k", REG, "not a valid URL"),
        ("https://0.0.0.0:8443/k", REG, "0.0.0.0 is a listen-on-all address"),
        ("https://[::]:8443/k", REG, ":: is a listen-on-all address"),
        # IPv4-mapped: the same address to the kernel (is_loopback_host unmaps them too)
        ("https://[::ffff:0.0.0.0]:8443/k", REG, "::ffff:0.0.0.0 is a listen-on-all address"),
        ("https://[::FFFF:0:0]:8443/k", REG, "is a listen-on-all address"),
        ("https://[::ffff:127.0.0.1]:8443/k", REG, "it is a loopback address"),
        ("http://0.0.0.0:8080/k", "http://127.0.0.1:9/register", "not loopback"),
        (
            "http://127.0.0.1:8080/k",
            REG,
            "it is a loopback address, which the authorization server at as.example (not on "
            "this host) cannot reach",
        ),
        ("https://localhost:8443/k", REG, "which the authorization server at as.example"),
    ],
)
def test_a_jwks_uri_the_server_could_not_fetch_safely_is_refused(jwks_uri, endpoint, reason):
    with pytest.raises(RegistrationError) as e:
        reg.check_jwks_uri(jwks_uri, endpoint)
    message = str(e.value)
    assert message.startswith(f"refusing to register jwks_uri {jwks_uri!r} at {endpoint}: ")
    assert reason in message
    assert message.endswith(
        "; serve the bundle endpoint over https (bundle_endpoint.cert_file and key_file) or "
        "set oauth.jwks_uri to an https URL the authorization server reaches; see "
        "docs/remote-as.md"
    )
    assert e.value.url == endpoint


@pytest.mark.parametrize(
    "jwks_uri, endpoint",
    [
        ("https://bundle.example/k", REG),
        ("https://10.0.0.7:8443/k", REG),
        ("http://127.0.0.1:8080/k", "http://127.0.0.1:9/register"),
        ("http://localhost:8080/k", "http://[::1]:9/register"),
        ("https://[::1]:8443/k", "https://localhost:9/register"),
    ],
)
def test_a_jwks_uri_the_server_can_fetch_safely_is_accepted(jwks_uri, endpoint):
    reg.check_jwks_uri(jwks_uri, endpoint)
    meta = reg.client_metadata(SID, STATEMENT, endpoint=endpoint, jwks_uri=jwks_uri, jwks=None)
    assert meta["jwks_uri"] == jwks_uri


# --- deletion (RFC 7592) --------------------------------------------------------------------


def client_at(url: str | None, token: str | None = MANAGEMENT_TOKEN) -> reg.RegisteredClient:
    return reg.RegisteredClient(SID, ISSUER, "c1", url, token)


@pytest.mark.parametrize("status", [200, 204, 401, 404])
def test_a_deletion_sends_the_management_token_and_takes_these_answers_as_done(status):
    peer = Peer(status, {})
    done = run(peer, lambda http, url: reg.delete(http, client_at(url + "/register/c1")))
    assert done is True
    (sent,) = peer.requests
    assert sent.method == "DELETE" and sent.path == "/register/c1"
    assert sent.headers["authorization"] == f"Bearer {MANAGEMENT_TOKEN}"


@pytest.mark.parametrize("status", [400, 403, 500])
def test_a_deletion_refused_otherwise_is_a_registration_error(status):
    peer = Peer(status, {})
    err = run(peer, lambda http, url: reg.delete(http, client_at(url + "/register/c1")))
    assert isinstance(err, RegistrationError) and err.status == status
    assert err.url == peer.url + "/register/c1"
    assert str(err).startswith(f"client deletion at {err.url} failed with HTTP {status}")
    assert MANAGEMENT_TOKEN not in str(err)


@pytest.mark.parametrize("uri, token", [(None, MANAGEMENT_TOKEN), ("/register/c1", None)])
def test_a_client_without_management_is_not_deleted_and_nothing_is_sent(uri, token):
    peer = Peer(204, {})
    done = run(
        peer,
        lambda http, url: reg.delete(http, client_at(uri and url + uri, token)),
    )
    assert done is False and peer.requests == []


def test_a_management_uri_off_https_gets_no_token():
    peer = Peer(204, {})
    err = run(peer, lambda http, url: reg.delete(http, client_at("http://as.example/r/c1")))
    assert isinstance(err, InsecureEndpoint) and peer.requests == []
    assert str(err).startswith("registration_client_uri 'http://as.example/r/c1' refused: ")


def test_a_deletion_nobody_answers_is_unavailable():
    url = f"http://127.0.0.1:{free_port()}/register/c1"  # nobody listens

    async def go() -> ServerUnavailable:
        async with httpx.AsyncClient(trust_env=False) as http:
            with pytest.raises(ServerUnavailable) as e:
                await reg.delete(http, client_at(url))
        return e.value

    err = asyncio.run(go())
    assert err.url == url and str(err).startswith(f"client deletion to {url}: could not connect")


def test_a_deletion_to_a_server_whose_certificate_does_not_verify_sends_nothing(tmp_path):
    def call(http: httpx.AsyncClient, url: str, tls: ServerTls | None) -> Awaitable[Any]:
        client = client_at(url + "/register/c1")
        return reg.delete(http, client) if tls is None else reg.delete(http, client, tls)

    (by_store, by_file), ca_file = refused_certificate(tmp_path, call)
    assert "verified against the system store" in str(by_store)
    assert f"verified against oauth.ca_file ({ca_file})" in str(by_file)
    assert MANAGEMENT_TOKEN not in str(by_store) + str(by_file)


# --- what is kept ---------------------------------------------------------------------------


def test_a_client_repr_names_the_client_never_its_management_token():
    text = repr(client_at("https://as.example/register/c1"))
    assert text == f"RegisteredClient(client_id='c1', issuer={ISSUER!r})"


def test_the_store_keeps_each_client_per_identity_and_server_owner_only(tmp_path):
    state = tmp_path / "state"  # not made yet
    store = reg.ClientStore(state)
    assert store.get(SID, ISSUER) is None and store.for_identity(SID) == []
    first = client_at("https://as.example/register/c1")
    other_as = reg.RegisteredClient(SID, "https://as2.example", "c2")
    other_id = reg.RegisteredClient("spiffe://example.org/v", ISSUER, "c3", None, None)
    for c in (first, other_as, other_id):
        store.put(c)
    path = state / "oauth" / "clients.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = reg.ClientStore(state)  # after a restart
    got = again.get(SID, ISSUER)
    assert got is not None and got.client_id == "c1"
    assert got.registration_client_uri == first.registration_client_uri
    assert got.registration_access_token == MANAGEMENT_TOKEN
    assert again.get(SID, "https://as2.example") == other_as
    assert again.get("spiffe://example.org/v", "https://as2.example") is None
    assert sorted(c.client_id for c in again.for_identity(SID)) == ["c1", "c2"]
    assert [c.client_id for c in again.for_identity("spiffe://example.org/v")] == ["c3"]


def test_removing_a_client_keeps_the_others_and_removing_none_writes_nothing(tmp_path):
    store = reg.ClientStore(tmp_path)
    path = tmp_path / "oauth" / "clients.json"
    store.remove(SID, ISSUER)
    assert not path.exists()  # nothing was there: nothing written
    store.put(client_at(None, None))
    store.put(reg.RegisteredClient(SID, "https://as2.example", "c2"))
    store.remove(SID, ISSUER)
    assert store.get(SID, ISSUER) is None
    assert [c.client_id for c in store.for_identity(SID)] == ["c2"]
    path.write_text("{}")  # the file changed since: a remove of nothing leaves it as is
    path.chmod(0o644)
    store.remove(SID, "https://as2.example")
    assert path.read_text() == "{}" and stat.S_IMODE(path.stat().st_mode) == 0o644


def test_the_store_reads_the_clients_an_earlier_run_wrote(tmp_path):
    """clients.json outlives the process: one keyed "<spiffe_id> <issuer>", written by an
    earlier version of the agent, is still read (and its clients deleted)."""
    path = tmp_path / "oauth" / "clients.json"
    path.parent.mkdir()
    kept = {
        "spiffe_id": SID,
        "issuer": ISSUER,
        "client_id": "c1",
        "registration_client_uri": "https://as.example/register/c1",
        "registration_access_token": MANAGEMENT_TOKEN,
    }
    path.write_text(json.dumps({f"{SID} {ISSUER}": kept}))
    got = reg.ClientStore(tmp_path).get(SID, ISSUER)
    assert got == reg.RegisteredClient(**kept)
