"""HTTPS MCP servers in broker mode, end to end on the real kernel with real peers: the
official MCP Python SDK server behind uvicorn TLS (a CA made in the test), oidc-provider,
DPoP on, and the Python and TypeScript SDK clients holding no credential.

Both ways a workload reaches an https server: (2) it speaks https to https://localhost:P/mcp
itself and credless intercepts with its injection CA (trusted through SSL_CERT_FILE /
NODE_EXTRA_CA_CERTS), and (1) it speaks plain HTTP to the server's workload_url, which
credless maps onto the https URL. Either way credless verifies the server by the one trust
setting of that server (servers.ca_file, else inject.upstream_ca_file) for the 401 probe,
the metadata and the relayed requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers import audit_events, free_port, metric_sum
from tests.kernel import enter_cgroup, run_python
from tests.mcp.peers import McpServer
from tests.tlsca import TestCA
from tests.world import build_world, server_table

pytestmark = pytest.mark.kernel
SPIFFE_ID = "spiffe://example.org/agent/https-bot"

# The official Python SDK client as a new user runs it: its default HTTP client (which
# honours SSL_CERT_FILE), no auth. Prints one JSON line: the tools and the echo texts, or
# the error (exception groups flattened: the TLS error is inside one).
SDK_CLIENT = r"""
import asyncio, json, sys
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

async def main(url, n):
    async with Client(streamable_http_client(url)) as c:
        tools = await c.list_tools()
        texts = []
        for i in range(n):
            r = await c.call_tool("echo", {"text": f"hi {i}"})
            texts.append("".join(getattr(x, "text", "") for x in r.content))
    print(json.dumps({"tools": sorted(t.name for t in tools.tools), "texts": texts}))

def leaves(e):
    subs = getattr(e, "exceptions", None)
    if subs:
        return [x for s in subs for x in leaves(s)]
    out = [e]
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
        out.append(e)
    return out

try:
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
except BaseException as e:
    print(json.dumps({"error": " | ".join(f"{type(x).__name__}: {x}" for x in leaves(e))}))
"""

# One request with Python's http.client: status and JSON body (https when a CA is given).
RAW_CLIENT = r"""
import http.client, json, ssl, sys
host, port, path, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
if cafile:
    c = http.client.HTTPSConnection(host, port, timeout=30,
                                    context=ssl.create_default_context(cafile=cafile))
else:
    c = http.client.HTTPConnection(host, port, timeout=30)
body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "raw", "version": "1"}}})
c.request("POST", path, body=body, headers={
    "Content-Type": "application/json", "Accept": "application/json, text/event-stream"})
r = c.getresponse()
print(json.dumps([r.status, r.read().decode()]))
"""


@contextlib.contextmanager
def https_world(tmp: Path, trust: str = "server", metrics: bool = False, **server: object):
    """An https MCP server (DPoP) of a test CA, oidc-provider and the agent. trust: which
    setting names the server's CA: "server" (servers.ca_file), "inject"
    (inject.upstream_ca_file, as the README once said), or "other" (servers.ca_file naming
    another CA, so the server's certificate does not verify)."""
    with build_world(tmp, SPIFFE_ID) as w:
        w.ca = TestCA(tmp)
        w.mcp = w.enter(McpServer(tmp, dpop=True, tls=w.ca))
        w.authorization_server([w.mcp.url], dpop=True)
        w.mcp.start(w.oidc.issuer)
        server.setdefault("dpop", "always")  # the test server demands DPoP (and says so)
        inject: dict[str, object] = {"tls_listen_port": free_port()}
        if trust == "server":
            server["ca_file"] = str(w.ca.cert_path)
        elif trust == "inject":
            inject["upstream_ca_file"] = str(w.ca.cert_path)
        else:
            (tmp / "other").mkdir(exist_ok=True)
            server["ca_file"] = str(TestCA(tmp / "other", "another CA").cert_path)
        w.metrics_port = free_port() if metrics else None
        w.start_agent(
            server_table("weather", w.mcp.url, **server), inject=inject, metrics_port=w.metrics_port
        )
        w.inject_ca = tmp / "run" / "inject-ca.crt"
        yield w


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("https")
    workload_port = free_port()  # nobody listens: credless maps it onto the https URL
    with https_world(tmp, metrics=True, workload_url=f"http://127.0.0.1:{workload_port}/mcp") as w:
        w.workload_url = f"http://127.0.0.1:{workload_port}/mcp"
        yield w


def sdk_client(w, url: str, calls: int = 1, ca: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    if ca is not None:
        env["SSL_CERT_FILE"] = str(ca)
    r = subprocess.run(
        [sys.executable, "-c", SDK_CLIENT, url, str(calls)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=enter_cgroup(w.cg),
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert lines, r.stderr[-3000:]
    return json.loads(lines[-1])


def raw(w, host: str, port: int, ca: Path | None) -> tuple[int, dict]:
    out = run_python(RAW_CLIENT, host, port, "/mcp", ca or "", cgroup=w.cg)
    status, body = json.loads(out)
    return status, json.loads(body) if body.startswith("{") else {"text": body}


def upstream_connections(w, kind: str) -> float:
    """credless_upstream_connections_total for the server "weather", of this kind."""
    return metric_sum(
        w.metrics_port, "credless_upstream_connections_total", kind=kind, server="weather"
    )


def credentialed(w) -> list[dict]:
    return w.mcp.credentialed()


def test_python_sdk_over_https_is_intercepted_injected_and_pooled(world):
    before = len(credentialed(world))
    tls_before = upstream_connections(world, "tls")
    out = sdk_client(world, world.mcp.url, calls=5, ca=world.inject_ca)
    assert out == {
        "tools": ["add", "echo", "secret_tool", "stream_count"],
        "texts": [f"hi {i}" for i in range(5)],
    }, out
    seen = credentialed(world)[before:]
    assert len(seen) >= 7  # initialize, initialized, tools/list, 5 calls (and the GET stream)
    assert {r["auth_scheme"] for r in seen} == {"DPoP"}
    events = audit_events(
        world.agent.stdout_path,
        lambda evs: sum(e["event"] == "request.injected" for e in evs) >= len(seen) + before,
    )
    fingerprints = {e["token_sha256"] for e in events if e["event"] == "request.injected"}
    assert {r["token_sha256"] for r in seen} <= fingerprints
    # every upstream connection was TLS, and the pool spared the handshakes: the SDK's
    # requests go one after another, so one connection carries them all (measured: 1 for 7
    # requests), two if its GET event stream overlaps a POST, however many calls it makes
    tls = upstream_connections(world, "tls") - tls_before
    plain = upstream_connections(world, "plain")
    assert 1 <= tls <= 2 and plain == 0, (tls, len(seen))


def test_typescript_sdk_over_https_trusts_the_injection_ca_through_node_extra_ca_certs(world):
    before = world.mcp.stats()["calls"].get("echo", 0)
    r = subprocess.run(
        ["node", str(REPO / "tests/mcp/client.mjs"), world.mcp.url],
        env={**os.environ, "NODE_EXTRA_CA_CERTS": str(world.inject_ca)},
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=enter_cgroup(world.cg),
    )
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {
        "tools": ["add", "echo", "secret_tool", "stream_count"],
        "text": "from typescript",
    }
    assert world.mcp.stats()["calls"]["echo"] == before + 1


def test_a_workload_not_trusting_the_injection_ca_fails_its_handshake_and_nothing_goes_up(world):
    before = len(world.mcp.relayed())
    out = sdk_client(world, world.mcp.url, ca=world.ca.cert_path)  # trusts only the real CA
    assert "CERTIFICATE_VERIFY_FAILED" in out.get("error", ""), out
    failed = audit_events(
        world.agent.stdout_path,
        lambda evs: [e for e in evs if e["event"] == "connection.tls_failed"],
    )
    tls_failed = [e for e in failed if e["event"] == "connection.tls_failed"]
    assert tls_failed[-1]["server"] == "weather"
    assert str(world.inject_ca) in tls_failed[-1]["reason"]
    assert len(world.mcp.relayed()) == before


def test_plain_http_to_the_https_address_is_answered_400_naming_the_mismatch(world):
    before = len(world.mcp.relayed())
    status, body = raw(world, "127.0.0.1", world.mcp.port, None)
    assert status == 400
    # a JSON POST: a JSON-RPC error (its body never read: id null) naming the audit event
    assert body["id"] is None and body["error"]["code"] == -32084
    message, event_id = body["error"]["message"], body["error"]["data"]["event_id"]
    assert "is an https server and this request is plain HTTP" in message
    assert world.mcp.url in message and "workload_url" in message
    assert f"(audit event {event_id})" in message
    events = audit_events(
        world.agent.stdout_path,
        lambda evs: [e for e in evs if e.get("event_id") == event_id],
    )
    [denied] = [e for e in events if e.get("event_id") == event_id]
    assert denied["event"] == "request.denied" and denied["status"] == 400
    assert denied["server"] == "weather" and message.startswith(denied["reason"])
    assert len(world.mcp.relayed()) == before
    assert (
        metric_sum(
            world.metrics_port,
            "credless_injected_requests_total",
            mode="broker",
            outcome="plain_http_to_https",
            server="weather",
        )
        >= 1
    )


def test_a_plain_workload_url_is_mapped_onto_the_https_server(world):
    before = len(credentialed(world))
    tls_before = upstream_connections(world, "tls")
    out = sdk_client(world, world.workload_url, calls=2)  # plain http: no CA needed
    assert out["texts"] == ["hi 0", "hi 1"], out
    seen = credentialed(world)[before:]
    assert seen and {r["auth_scheme"] for r in seen} == {"DPoP"}  # htu: the https URL
    # credless originated TLS for it (the server listens on TLS only)
    tls = upstream_connections(world, "tls")
    assert tls > tls_before
    assert upstream_connections(world, "plain") == 0
    # the workload sent Host 127.0.0.1:<workload port>; the server sees its own URL's
    assert {r["host"] for r in seen} == {f"localhost:{world.mcp.port}"}


def test_trust_from_inject_upstream_ca_file_covers_the_probe_too(tmp_path):
    """The issue's new user: only inject.upstream_ca_file names the server's CA. The 401
    probe and the metadata read follow the same setting as the relayed requests."""
    with https_world(tmp_path, trust="inject") as w:
        out = sdk_client(w, w.mcp.url, ca=w.inject_ca)
        assert out.get("texts") == ["hi 0"], out
        assert {r["auth_scheme"] for r in credentialed(w)} == {"DPoP"}


def test_an_upstream_certificate_that_does_not_verify_is_a_502_naming_it_and_no_token(tmp_path):
    with https_world(tmp_path, trust="other") as w:
        status, body = raw(w, "localhost", w.mcp.port, w.inject_ca)
        said = json.dumps(body)  # a plain body's detail, or a JSON-RPC error's message
        assert status == 502
        assert "MCP server's certificate did not verify (certificate verify failed: " in said
        assert "servers[weather].ca_file" in said and "mcp_server_certificate" in said
        events = audit_events(w.agent.stdout_path, "request.failed")
        failed = [e for e in events if e["event"] == "request.failed"]
        assert failed[0]["kind"] == "mcp_server_certificate"
        assert "certificate verify failed: " in failed[0]["reason"]
        refused = [e for e in events if e["event"] == "oauth.refused"]
        assert refused and refused[0]["check"] == "mcp_server_certificate"
        assert not [e for e in events if e["event"].startswith("token.")]
        assert w.mcp.stats()["requests"] == []  # not even the probe got through


def test_with_the_issuer_configured_a_bad_upstream_certificate_stops_the_request(tmp_path):
    """No probe at all (issuer configured): the relayed request's own connection verifies
    the server, fails, and the token never leaves credless."""
    with build_world(tmp_path, SPIFFE_ID) as w:
        ca = TestCA(tmp_path)
        (tmp_path / "other").mkdir()
        other = TestCA(tmp_path / "other", "another CA")
        w.mcp = w.enter(McpServer(tmp_path, dpop=True, tls=ca))
        w.authorization_server([w.mcp.url], dpop=True)
        w.mcp.start(w.oidc.issuer)
        w.start_agent(
            server_table(
                "weather",
                w.mcp.url,
                issuer=w.oidc.issuer,
                ca_file=str(other.cert_path),
                dpop="always",
            ),
            inject={"tls_listen_port": free_port()},
        )
        status, body = raw(w, "localhost", w.mcp.port, tmp_path / "run" / "inject-ca.crt")
        assert status == 502
        assert "MCP server's certificate did not verify (certificate verify" in json.dumps(body)
        failed = audit_events(w.agent.stdout_path, "request.failed")
        assert any("certificate did not verify" in e.get("reason", "") for e in failed)
        assert w.mcp.stats()["requests"] == []
