"""Answers an operator can trace (issue 19): a request credless makes that gets no answer
says what timed out after how long, and an authorization server's refusal is told as what
was observed (its error code and description, what credless sent), not as a guessed cause.

The parties are real: a loopback server that accepts and never answers, and oidc-provider
(tests/oidc) refusing the client's assertion; the last test goes through the real agent and
the kernel's redirect with the Python MCP SDK as the workload. docs/errors.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.inject import answers
from agent.oauth import registration as reg
from agent.oauth.discovery import Discovery
from agent.oauth.errors import ServerUnavailable
from agent.oauth.tokens import post_form, request_token
from tests.helpers import audit_events, free_port, http_get
from tests.kernel import enter_cgroup
from tests.mcp.peers import McpServer, run_client
from tests.oidc.peer import OidcProvider
from tests.upstreams.echo import hangup_server
from tests.world import JWT_RESOURCE, build_world, server_table, table

TIMEOUT = 0.5  # the client's timeout: what the messages must name (not a threshold)
SPIFFE_ID = "spiffe://example.org/agent/traced"
EVENT_ID = re.compile(r"\(audit event ([0-9a-f]{16})\)")


@contextlib.contextmanager
def silent_server() -> Iterator[tuple[int, list[bytes]]]:
    """A loopback port whose server accepts every connection, reads what arrives and never
    answers; yields the port and the first bytes of each connection (the request heads)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)  # how soon the thread sees it is to stop
    stop = threading.Event()
    held: list[socket.socket] = []
    heads: list[bytes] = []

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = srv.accept()
                held.append(conn)
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    heads.append(conn.recv(65536))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], heads
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        srv.close()


def fails(coro) -> ServerUnavailable:
    """The ServerUnavailable the coroutine raises (run on a loop of its own)."""
    with pytest.raises(ServerUnavailable) as err:
        asyncio.run(coro)
    return err.value


async def _every_request(base: str, http_timeout: float) -> list[tuple[str, str]]:
    """(what, message) for each kind of request credless makes to an authorization server or
    an MCP server, each sent to base."""
    out = []
    async with httpx.AsyncClient(timeout=http_timeout, trust_env=False) as http:
        d = Discovery(http)
        calls = {
            "as metadata": d.server(base),
            "probe": d.challenge(f"{base}/mcp"),
            "resource metadata": d.resource(f"{base}/mcp", www_authenticate="Bearer"),
            "token": request_token(
                http,
                token_endpoint=f"{base}/token",
                issuer=base,
                resource=f"{base}/mcp",
                scope="",
                profile="jwt-bearer",
                assertion_audience="issuer",
                client_id=SPIFFE_ID,
                spiffe_id=SPIFFE_ID,
                mint_assertion=lambda aud, iss: "not-an-assertion",
                dpop=None,
                nonces={},
            ),
            "registration": reg.register(
                http,
                endpoint=f"{base}/reg",
                issuer=base,
                spiffe_id=SPIFFE_ID,
                jwks_uri=None,
                jwks={"keys": []},
                software_statement="not-a-statement",
                dpop=False,
            ),
            "introspection": post_form(http, f"{base}/introspect", {"x": "y"}, {}, "introspection"),
            "deletion": reg.delete(
                http,
                reg.RegisteredClient(
                    SPIFFE_ID, base, "c1", f"{base}/reg/c1", "registration-access-token"
                ),
            ),
        }
        for what, coro in calls.items():
            try:
                await coro
            except ServerUnavailable as e:
                out.append((what, str(e)))
            else:
                out.append((what, "(answered)"))
    return out


def test_every_request_to_a_server_that_never_answers_says_what_timed_out_after_how_long():
    with silent_server() as (port, heads):
        base = f"http://127.0.0.1:{port}"
        said = dict(asyncio.run(_every_request(base, TIMEOUT)))
    after = f"no answer after {TIMEOUT:.1f} s"
    assert said == {
        "as metadata": "authorization server metadata request to "
        f"{base}/.well-known/oauth-authorization-server: {after}",
        "probe": f"unauthenticated probe of the MCP server to {base}/mcp: {after}",
        "resource metadata": "protected resource metadata request to "
        f"{base}/.well-known/oauth-protected-resource/mcp: {after}",
        "token": f"token request to {base}/token: {after}",
        "registration": f"registration to {base}/reg: {after}",
        "introspection": f"introspection to {base}/introspect: {after}",
        "deletion": f"client deletion to {base}/reg/c1: {after}",
    }
    # each request reached the server (it was the answer that never came), none carried a
    # secret into a message
    assert len(heads) == 7 and all(
        h.split(b" ", 1)[0] in (b"GET", b"POST", b"DELETE") for h in heads
    )
    assert not [m for m in said.values() if "registration-access-token" in m]


def test_a_refused_connection_and_a_hangup_say_so():
    closed = free_port()  # nothing listens there
    said = dict(asyncio.run(_every_request(f"http://127.0.0.1:{closed}", TIMEOUT)))
    assert said["token"].startswith(f"token request to http://127.0.0.1:{closed}/token: ")
    assert all("could not connect (" in m for m in said.values()), said
    with hangup_server() as port:
        said = dict(asyncio.run(_every_request(f"http://127.0.0.1:{port}", TIMEOUT)))
    # a GET the server read whole and closed on; a POST it may close on before reading its
    # body, which the kernel answers with a reset
    closed_on = "the server closed the connection without answering"
    assert said["as metadata"].endswith(f"oauth-authorization-server: {closed_on}")
    broken = "the connection was broken before a complete answer arrived"
    assert all(m.endswith(closed_on) or broken in m for m in said.values()), said


# ------------------------------------------------------------ through the agent


def stale_jwks() -> dict:
    """A JWKS holding one EC key that is not the agent's: what an authorization server has
    cached of the agent's jwks_uri from before its keys changed."""
    pub = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

    return {
        "keys": [
            {"kty": "EC", "crv": "P-256", "x": b64(pub.x), "y": b64(pub.y), "kid": "stale-key"}
        ]
    }


def shown_event(message: str) -> str:
    m = EVENT_ID.search(message)
    assert m, f"no audit event id in {message!r}"
    return m.group(1)


@pytest.mark.kernel
def test_an_authorization_server_refusing_the_client_is_told_as_observed(tmp_path):
    """The authorization server holds keys for the client that are not the agent's (as when
    it cached the agent's JWKS before the agent's keys changed). The workload's 502 names
    what the server said (invalid_client and its description) and what credless sent (the
    client id and the key id of the assertion), and guesses no cause."""
    with build_world(tmp_path, SPIFFE_ID) as w:
        mcp = w.enter(McpServer(tmp_path))
        w.oidc = w.enter(
            OidcProvider(
                tmp_path,
                resources={mcp.url: JWT_RESOURCE},
                clients=[{"client_id": SPIFFE_ID, "jwks": stale_jwks()}],
            )
        )
        mcp.start(w.oidc.issuer)
        # prewarm off: one refused token request, the call's own
        w.start_agent(server_table("weather", mcp.url, prewarm=False))
        out = run_client(mcp.url, "list", preexec=enter_cgroup(w.cg))[-1]
        assert out.get("code") == answers.TOKEN_FAILED, out
        detail = out["data"]["detail"]
        [refused] = w.oidc.events("grant.error")
        assert refused["error"] == "invalid_client"
        said = f"(server said invalid_client: {refused['error_description']})"
        assert said in detail, detail
        _status, jwks = http_get(f"http://127.0.0.1:{w.bundle_port}/jwks.json")
        kids = {k["kid"] for k in json.loads(jwks)["keys"]}
        named = re.search(r"JWT-SVID signed by key '([^']+)'", detail)
        assert named and named.group(1) in kids and named.group(1) != "stale-key", detail
        assert f"client_id {SPIFFE_ID!r}" in detail
        # no guessed cause
        assert "check that" not in detail and "points at" not in detail
        [failed] = [
            e
            for e in audit_events(w.agent.stdout_path, "request.failed")
            if e.get("event_id") == shown_event(out["message"])
        ]
        assert failed["spiffe_id"] == SPIFFE_ID and said in failed["reason"]
        assert "eyJ" not in json.dumps(out) and "eyJ" not in w.agent.stdout_path.read_text()


@pytest.mark.kernel
def test_an_authorization_server_that_never_answers_is_named_with_the_timeout(tmp_path):
    """The agent's own client, through the proxy: the 502 says which request to which URL
    got no answer, after the configured oauth.request_timeout_seconds."""
    with build_world(tmp_path, SPIFFE_ID) as w, silent_server() as (port, heads):
        base = f"http://127.0.0.1:{port}"
        mcp_url = f"http://127.0.0.1:{free_port()}/mcp"  # never reached: no token
        w.start_agent(
            server_table("silent", mcp_url, issuer=base),
            settings=table("[oauth]", request_timeout_seconds=1.5),
        )
        out = run_client(mcp_url, "list", preexec=enter_cgroup(w.cg))[-1]
        assert out.get("code") == answers.TOKEN_FAILED, out
        assert out["data"]["detail"] == (
            "authorization server metadata request to "
            f"{base}/.well-known/oauth-authorization-server: no answer after 1.5 s"
        )
        assert heads and heads[0].startswith(b"GET /.well-known/oauth-authorization-server ")
