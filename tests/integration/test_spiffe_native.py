"""SPIFFE-native OAuth: an official MCP SDK client authenticates to oidc-provider with a
JWT-SVID it fetches from the agent's Workload API (py-spiffe) as its client assertion."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import audit_events, run_json_program, wait_for
from tests.kernel import enter_cgroup
from tests.mcp.hostile import RecordingAuthorizationServer
from tests.mcp.peers import McpServer
from tests.world import build_world, entry_table, server_table

pytestmark = pytest.mark.kernel
SPIFFE_ID = "spiffe://example.org/agent/native"


def spiffe_client(mcp_url: str, issuer: str, spiffe_id: str, source: str, preexec=None) -> dict:
    """The SDK's private-key-JWT client (tests/mcp/spiffe_client.py), its JSON summary;
    source: the Workload API socket its JWT-SVID comes from, or "placeholder"."""
    return run_json_program(
        "tests.mcp.spiffe_client",
        mcp_url,
        issuer,
        spiffe_id,
        source,
        timeout=120,
        preexec_fn=preexec,
    )


@contextlib.contextmanager
def native_world(tmp_path, entry: dict | None = None, settings: str = ""):
    """oidc-provider, an MCP server trusting it, and the agent with an entry for a fresh
    cgroup (with `entry`'s settings) and its Workload API on a socket any uid can reach;
    yields a runner of the SDK's private-key-JWT client in that cgroup (its JSON summary)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="credless-native-"))
    os.chmod(sock_dir, 0o755)
    try:
        with build_world(tmp_path, SPIFFE_ID) as w:
            w.mcp = w.enter(McpServer(tmp_path))
            w.authorization_server([w.mcp.url], dpop=False)
            w.mcp.start(w.oidc.issuer)
            w.start_agent(
                settings.format(mcp_url=w.mcp.url, issuer=w.oidc.issuer),
                entries=entry_table("native", SPIFFE_ID, [w.selector], **(entry or {})),
                intercept=False,
                workload_api_socket=sock_dir / "agent.sock",
            )
            w.client = lambda: spiffe_client(
                w.mcp.url,
                w.oidc.issuer,
                SPIFFE_ID,
                str(sock_dir / "agent.sock"),
                enter_cgroup(w.cg),
            )
            yield w
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_mcp_sdk_private_key_jwt_with_a_jwt_svid_from_the_workload_api(tmp_path):
    with native_world(tmp_path) as w:
        out = w.client()
        assert "error" not in out, out
        assert out["text"] == "spiffe-native" and "echo" in out["tools"]
        assert out["assertion_audiences"] == [w.oidc.issuer]
        assert [e["client_id"] for e in w.oidc.events("grant.success")] == [SPIFFE_ID]
        assert w.mcp.stats()["calls"] == {"echo": 1}

        def jwt_issued_in(events):
            return [e for e in events if e["event"] == "svid.issued" and e["type"] == "jwt"]

        jwt_issued = jwt_issued_in(audit_events(w.agent.stdout_path, jwt_issued_in))
        assert jwt_issued and jwt_issued[0]["audience"] == [w.oidc.issuer]


def test_assertion_mode_replaces_a_placeholder_with_a_jwt_svid(tmp_path):
    sid = "spiffe://example.org/agent/assertion"
    with build_world(tmp_path, sid) as w:
        mcp = w.enter(McpServer(tmp_path))
        oidc = w.authorization_server([mcp.url], dpop=False)
        mcp.start(oidc.issuer)

        def client(preexec):
            return spiffe_client(mcp.url, oidc.issuer, sid, "placeholder", preexec)

        # the placeholder alone is refused by the authorization server
        alone = client(None)
        assert alone.get("error"), alone
        assert oidc.events("grant.error") and not oidc.events("grant.success")
        agent = w.start_agent(
            server_table("as", oidc.token_endpoint, issuer=oidc.issuer, mode="assertion")
        )
        out = client(enter_cgroup(w.cg))
        assert "error" not in out, out
        assert out["text"] == "spiffe-native"
        assert [e["client_id"] for e in oidc.events("grant.success")] == [sid]
        events = audit_events(agent.stdout_path, "assertion.injected")
        injected = [e for e in events if e["event"] == "assertion.injected"]
        assert len(injected) == 1 and injected[0]["spiffe_id"] == sid
        assert injected[0]["audience"] == oidc.issuer
        assert mcp.stats()["calls"] == {"echo": 1}


@pytest.mark.parametrize("opted_in", [False, True], ids=["default", "entry-opts-in"])
def test_a_jwt_svid_for_an_authorization_server_credless_uses_is_refused_by_default(
    tmp_path, opted_in
):
    """Issue 15, item 3. A JWT-SVID whose audience is an authorization server credless
    obtains tokens from is exactly the client assertion credless sends: a workload holding
    one could get its own token and call the MCP server without the proxy (no policy, no
    DPoP binding to the agent's key, no audit). The Workload API refuses it unless the
    registration entry opts in; so the AS never sees such an assertion from the workload."""
    # credless obtains tokens for this MCP server from this authorization server
    servers = (
        '[inject]\nenabled = false\n[[servers]]\nname = "weather"\nurl = "{mcp_url}"\n'
        'issuer = "{issuer}"\n'
    )
    with native_world(
        tmp_path, {"authorization_server_audience": True} if opted_in else None, servers
    ) as w:
        out = w.client()
        if opted_in:
            assert "error" not in out, out
            assert [e["client_id"] for e in w.oidc.events("grant.success")] == [SPIFFE_ID]
            return
        assert out.get("error") and "authorization server" in out.get("message", ""), out
        assert not w.oidc.events("grant.success") and w.mcp.stats()["calls"] == {}
        events = audit_events(w.agent.stdout_path, "workload_api.denied")
        assert not [e for e in events if e["event"] == "svid.issued" and e["type"] == "jwt"]
        [denied] = [e for e in events if e["event"] == "workload_api.denied"]
        assert denied["spiffe_id"] == SPIFFE_ID and denied["audience"] == [w.oidc.issuer]


def test_a_jwt_svid_for_a_token_endpoint_on_another_origin_is_refused(tmp_path):
    """An AS may put its token endpoint on another origin than its issuer. A JWT-SVID for
    that endpoint is a client assertion there, but the Workload API knew the endpoint only
    once credless had read the AS's metadata for a request (found by review, stop 32). A
    workload (py-spiffe) asked before any request: it got the JWT-SVID and presented it at
    the token endpoint itself. Now the agent reads every configured AS's metadata at start;
    until it has, a URL audience is refused with UNAVAILABLE, after it, with
    PERMISSION_DENIED; the token endpoint never sees an assertion."""
    sock_dir = Path(tempfile.mkdtemp(prefix="credless-native-"))
    os.chmod(sock_dir, 0o755)
    try:
        with build_world(tmp_path, SPIFFE_ID) as w:
            tokens = w.enter(RecordingAuthorizationServer("127.0.0.2"))
            issuer = w.enter(RecordingAuthorizationServer("127.0.0.1"))
            with issuer._lock:  # not published yet: the agent's first reads fail
                del issuer.routes[("GET", "/.well-known/oauth-authorization-server")]
            token_endpoint = f"{tokens.origin}/token"
            agent = w.start_agent(
                server_table("weather", "http://127.0.0.1:9/mcp", issuer=issuer.issuer),
                entries=entry_table("native", SPIFFE_ID, [w.selector]),
                intercept=False,
                workload_api_socket=sock_dir / "agent.sock",
            )

            def thief() -> dict:
                return run_json_program(
                    "tests.mcp.assertion_thief",
                    str(sock_dir / "agent.sock"),
                    token_endpoint,
                    SPIFFE_ID,
                    timeout=60,
                    preexec_fn=enter_cgroup(w.cg),
                )

            unread = thief()
            assert not unread["fetched"] and "retry shortly" in unread["message"], unread
            issuer.publish(token_endpoint=token_endpoint)
            refused = wait_for(
                lambda: (r := thief()) and "retry shortly" not in r.get("message", "") and r,
                what="the agent to read the authorization server's metadata",
            )
            assert not refused["fetched"], refused
            assert "is the authorization server" in refused["message"], refused
            assert tokens.received() == []

            def denials(events: list[dict]) -> list[dict]:
                return [e for e in events if e["event"] == "workload_api.denied"]

            events = audit_events(
                agent.stdout_path,
                lambda evs: any(e["code"] == "PERMISSION_DENIED" for e in denials(evs)),
            )
            denied = denials(events)
            assert [e["code"] for e in denied[:1]] == ["UNAVAILABLE"]
            assert denied[0]["unread"] == ["weather"]
            assert denied[-1]["code"] == "PERMISSION_DENIED"
            assert denied[-1]["authorization_server"] == token_endpoint
            assert not [e for e in events if e["event"] == "svid.issued"]
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
