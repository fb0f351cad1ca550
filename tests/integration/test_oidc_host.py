"""The tests' authorization servers share one node process per test process
(tests/oidc/oidc_host.mjs); each must still be a server of its own, as when each had a
process: its own storage, keys and log, and nothing left listening once stopped."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.bundle import public_key_to_jwk
from tests.oidc.peer import OidcProvider, provider_host

SPIFFE_ID = "spiffe://example.org/host-test"


def _http(url: str, body: dict | None = None, token: str = "") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw or b"{}")
    except ValueError:
        return status, {"body": raw.decode(errors="replace")}


def _register(oidc: OidcProvider) -> dict:
    jwk = public_key_to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
    status, client = _http(
        oidc.registration_endpoint,
        {
            "spiffe_id": SPIFFE_ID,
            "jwks": {"keys": [jwk]},
            "token_endpoint_auth_method": "private_key_jwt",
            "grant_types": ["client_credentials"],
            "response_types": [],
            "redirect_uris": [],
        },
    )
    assert status == 201, client
    return client


def test_two_providers_of_one_host_share_no_client_keys_or_log(tmp_path):
    with (
        OidcProvider(tmp_path, registration=True) as first,
        OidcProvider(tmp_path, registration=True) as second,
    ):
        assert first.proc is None and second.proc is None  # both served by the host
        client = _register(first)
        client_id = urllib.parse.quote(client["client_id"], safe="")
        read = f"{first.registration_endpoint}/{client_id}"
        assert _http(read, token=client["registration_access_token"])[0] == 200
        # the second has never heard of the client nor of its management token
        elsewhere = f"{second.registration_endpoint}/{client_id}"
        assert _http(elsewhere, token=client["registration_access_token"])[0] == 401
        keys = [_http(f"{o.issuer}/jwks")[1]["keys"] for o in (first, second)]
        assert keys[0] != keys[1]
        assert [e["event"] for e in first.events()] == ["registration_create.success"]
        assert second.events() == []


def test_a_stopped_provider_listens_no_more_and_the_host_serves_on(tmp_path):
    with OidcProvider(tmp_path) as first:
        metadata = f"{first.issuer}/.well-known/openid-configuration"
        assert _http(metadata)[0] == 200
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(metadata, timeout=5)
    with OidcProvider(tmp_path) as second:
        assert second.issuer != first.issuer
        assert _http(f"{second.issuer}/.well-known/openid-configuration")[0] == 200


def test_a_host_that_died_is_replaced_and_says_why_a_start_failed(tmp_path):
    host = provider_host()
    host.proc.kill()
    host.proc.wait()
    with OidcProvider(tmp_path) as oidc:  # a new host
        assert provider_host() is not host and provider_host().alive()
        assert _http(f"{oidc.issuer}/.well-known/openid-configuration")[0] == 200
    broken = OidcProvider(tmp_path)
    broken.cfg_path.write_text("not json")
    with pytest.raises(RuntimeError, match=r"start: .*SyntaxError"):
        broken.start()
