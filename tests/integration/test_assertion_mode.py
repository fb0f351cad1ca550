"""Issue 17, "Assertion mode as the seed describes it, against an HTTPS authorization
server". The workload runs its own OAuth client (the official MCP SDK's private-key-JWT
client, tests/oidc/workload.py) holding only placeholders, and speaks https to oidc-provider:
credless intercepts with its injection CA (the workload trusts <run_dir>/inject-ca.crt),
puts its SPIFFE identity's client authentication into the registration and the token
requests, and originates verified TLS to the server. The token then calls an MCP server.
What the authorization server parsed (its events) and credless's audit are the evidence."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.helpers import audit_events
from tests.kernel import enter_cgroup
from tests.mcp.peers import McpServer
from tests.oidc.peer import OidcProvider
from tests.oidc.remote import env, start_agent
from tests.tlsca import TestCA
from tests.world import JWT_RESOURCE, build_world, server_table

pytestmark = pytest.mark.kernel
SPIFFE_ID = "spiffe://example.org/agent/assertion-mode"


def run_workload(w, *steps: str) -> list[dict]:
    """tests/oidc/workload.py in the world's cgroup, trusting the injection CA."""
    r = subprocess.run(
        [sys.executable, "-m", "tests.oidc.workload", w.mcp.url, w.oidc.issuer, "-", *steps],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=enter_cgroup(w.cg),
        env={**os.environ, "SSL_CERT_FILE": str(w.tmp / "run" / "inject-ca.crt")},
    )
    out = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    if len(out) != len(steps):
        raise AssertionError(f"workload: {r.stdout[-2000:]} {r.stderr[-3000:]}")
    return out


@contextlib.contextmanager
def assertion_world(tmp, **settings):
    """oidc-provider on https with dynamic registration, an MCP server trusting it, and the
    agent in assertion mode for the server's token endpoint (with these [[servers]]
    settings); the workload has registered (w.registered: what it was told)."""
    ca = TestCA(tmp)
    with build_world(tmp, SPIFFE_ID) as w:
        w.mcp = w.enter(McpServer(tmp))
        w.oidc = w.enter(
            OidcProvider(
                tmp, resources={w.mcp.url: JWT_RESOURCE}, registration=True, dpop=False, tls=ca
            )
        )
        with env(SSL_CERT_FILE=str(ca.cert_path)):  # the MCP server reads the AS's JWKS
            w.mcp.start(w.oidc.issuer)
        start_agent(
            w,
            server_table(
                "as",
                w.oidc.token_endpoint,
                issuer=w.oidc.issuer,
                mode="assertion",
                ca_file=str(ca.cert_path),
                **settings,
            ),
            ca.issue("bundle"),
            settings=f'[oauth]\nca_file = "{ca.cert_path}"\n',
        )
        w.jwks_uri = f"https://127.0.0.1:{w.bundle_port}/jwks.json"
        w.registered = run_workload(w, "register")[0]
        yield w


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with assertion_world(tmp_path_factory.mktemp("assertion-mode")) as w:
        yield w


def audit(w, until) -> list[dict]:
    return audit_events(w.agent.stdout_path, until)


def token_work_since(w, before: int) -> list[dict]:
    """What the authorization server did on a token request (a grant, a key fetch) since its
    event `before`: nothing, when credless refused the request."""
    return [e for e in w.oidc.events()[before:] if e["event"].startswith(("grant.", "fetch"))]


def refused(events: list[dict]) -> list[dict]:
    """The agent's refusals of a workload's own client authentication."""
    return [e for e in events if e["event"] == "assertion.refused"]


def test_a_registration_gets_the_identitys_software_statement_and_https_jwks_uri(world):
    assert world.registered["status"] == 201, world.registered
    assert world.registered["client_id"] == SPIFFE_ID
    created = world.oidc.events("registration_create.success")
    assert [(c["client_id"], c["jwks_uri"]) for c in created] == [(SPIFFE_ID, world.jwks_uri)]
    assert created[0]["token_endpoint_auth_method"] == "private_key_jwt"
    # oidc-provider verified the software statement with keys it fetched over https
    assert world.jwks_uri in world.oidc.fetched()

    def registration(events):
        return [
            e
            for e in events
            if e["event"] == "assertion.injected" and e.get("request") == "registration"
        ]

    (injected,) = registration(audit(world, registration))
    assert injected["spiffe_id"] == SPIFFE_ID and injected["action"] == "replaced"
    assert injected["jwks_uri"] == world.jwks_uri and injected["jti"]
    assert injected["audience"] == world.oidc.registration_endpoint


def test_the_sdks_private_key_jwt_client_with_a_placeholder_gets_a_token(world):
    before = len(world.oidc.events("grant.success"))
    (out,) = run_workload(world, "sdk")
    assert "error" not in out, out
    assert out["text"] == "assertion mode" and "echo" in out["tools"]
    grants = world.oidc.events("grant.success")[before:]
    assert [(g["client_id"], g["grant_type"]) for g in grants] == [
        (SPIFFE_ID, "client_credentials")
    ]
    assert set(world.oidc.fetched()) == {world.jwks_uri}  # every key fetch over https
    assert world.mcp.stats()["calls"].get("echo", 0) >= 1

    def token_requests(events):
        return [
            e
            for e in events
            if e["event"] == "assertion.injected"
            and e.get("request") == "token"
            and e.get("action") == "replaced"
        ]

    injected = token_requests(audit(world, token_requests))[-1]
    assert injected["grant_type"] == "client_credentials"
    assert injected["audience"] == world.oidc.issuer and injected["jti"]


def test_a_workloads_own_jwt_assertion_is_refused_and_never_reaches_the_server(world):
    before = len(world.oidc.events())
    (out,) = run_workload(world, "sdk-own-jwt")
    assert out.get("error"), out
    # nothing of the refused request reached the authorization server
    assert not token_work_since(world, before)
    (r,) = refused(audit(world, refused))
    assert r["error"] == "invalid_request" and r["what"] == "client_assertion"
    assert r["workload_jti"].startswith("workload-") and r["spiffe_id"] == SPIFFE_ID


@pytest.mark.parametrize("step", ["own-jwt-TOKEN", "own-jwt-token/"])
def test_a_workloads_own_jwt_assertion_is_refused_however_the_token_path_is_spelt(world, step):
    # oidc-provider routes /TOKEN and /token/ to its token endpoint: credless used to forward
    # them unread, the workload's own assertion and all
    before = len(world.oidc.events())
    (out,) = run_workload(world, step)
    assert (out["status"], out["error"]) == (400, "invalid_request"), out
    assert not token_work_since(world, before)
    assert any(r["what"] == "client_assertion" for r in refused(audit(world, refused)))


def test_a_token_request_without_client_authentication_gets_it_added(world):
    (out,) = run_workload(world, "bare-token")
    assert out["status"] == 200 and out["has_access_token"], out
    assert world.oidc.events("grant.success")[-1]["client_id"] == SPIFFE_ID

    def added(events):
        return [
            e for e in events if e["event"] == "assertion.injected" and e.get("action") == "added"
        ]

    assert added(audit(world, added))[-1]["grant_type"] == "client_credentials"


def test_a_workloads_own_jwt_assertion_is_replaced_when_the_server_says_so(tmp_path):
    with assertion_world(tmp_path, workload_assertion="replace") as w:
        (out,) = run_workload(w, "sdk-own-jwt")
        assert "error" not in out, out
        assert out["text"] == "assertion mode"
        assert [g["client_id"] for g in w.oidc.events("grant.success")] == [SPIFFE_ID]

        def replaced(events):
            return [e for e in events if e.get("action") == "replaced_workload_jwt"]

        (r,) = replaced(audit(w, replaced))
        assert r["event"] == "assertion.injected" and r["workload_jti"].startswith("workload-")
