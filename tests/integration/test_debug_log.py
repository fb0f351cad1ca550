"""`--log-level debug` shows the decisions an operator needs, and never a secret (issue 19;
docs/logging.md).

A real agent run with `--log-level debug` (tests/helpers.py AgentProcess), a workload in a
managed cgroup making two MCP calls on one connection through the kernel's redirect, real
oidc-provider issuing the token, and an upstream that records what it received: the real
token, as the server saw it. The whole diagnostic output (and the audit stream) is then
searched for that token and for anything shaped like a JWT (assertions, SVIDs, proofs) or a
private key.
"""

from __future__ import annotations

import hashlib
import json
import re
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import AgentProcess, audit_events, serving, write_config
from tests.kernel import run_python
from tests.upstreams.echo import Upstream
from tests.world import build_world, entry_table, inject_table, server_table, table, tools_rule

pytestmark = pytest.mark.kernel
SPIFFE_ID = "spiffe://example.org/agent/debugged"

# two tools/call requests on one connection, as a workload would make them
CALLS = """
import http.client, json, sys
host, port = sys.argv[1], int(sys.argv[2])
c = http.client.HTTPConnection(host, port, timeout=30)
out = []
for i in (1, 2):
    body = json.dumps({"jsonrpc": "2.0", "id": i, "method": "tools/call",
                       "params": {"name": "echo", "arguments": {"n": i}}})
    c.request("POST", "/mcp", body=body, headers={"Content-Type": "application/json",
                                                   "Accept": "application/json"})
    r = c.getresponse()
    out.append([r.status, r.read().decode()])
print(json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def debugged(tmp_path_factory) -> SimpleNamespace:
    """One run: the agent's diagnostic lines, its audit text, and what the upstream got."""
    tmp = tmp_path_factory.mktemp("debuglog")
    Upstream.seen = []
    with (
        serving(ThreadingHTTPServer(("127.0.0.1", 0), Upstream), "upstream") as upstream,
        build_world(tmp, SPIFFE_ID) as w,
    ):
        port = upstream.server_address[1]
        url = f"http://127.0.0.1:{port}/mcp"
        w.authorization_server([url])
        w.entries_path.write_text(entry_table("debugged", SPIFFE_ID, [w.selector]))
        policy = tmp / "policy.toml"
        policy.write_text(tools_rule("debugged-echo", SPIFFE_ID, "echo", ["echo"]))
        cfg = write_config(
            tmp,
            extra=inject_table(w.cg, w.proxy_port)
            + table("[policy]", file=str(policy))
            # prewarm off: the lines of one fetch, made by the call itself
            + server_table("echo", url, issuer=w.oidc.issuer, prewarm=False),
            bundle_port=w.bundle_port,
        )
        agent = w.enter(AgentProcess(cfg, tmp, args=["--log-level", "debug"]))
        agent.wait_ready()
        answers = json.loads(run_python(CALLS, "127.0.0.1", port, cgroup=w.cg))
        audit_events(
            agent.stdout_path,
            lambda evs: sum(e["event"] == "request.injected" for e in evs) >= 2,
        )
        agent.stop()
        return SimpleNamespace(
            answers=answers,
            lines=agent.log_events(),
            stderr=Path(agent.stderr_path).read_text(),
            audit=Path(agent.stdout_path).read_text(),
            seen=list(Upstream.seen),
            selector=w.selector,
        )


def named(lines: list[dict], event: str) -> list[dict]:
    return [e for e in lines if e.get("event") == event and e.get("level") == "debug"]


def test_the_calls_went_through_with_the_real_token(debugged):
    assert [status for status, _ in debugged.answers] == [200, 200], debugged.answers
    auth = [s["auth"] for s in debugged.seen]
    assert len(auth) == 2 and auth[0] == auth[1] and auth[0].startswith("Bearer ey"), auth


def test_no_secret_in_the_whole_log_output(debugged):
    token = debugged.seen[0]["auth"].split(" ", 1)[1]
    for text in (debugged.stderr, debugged.audit):
        assert token not in text
        assert token.split(".")[2] not in text  # not even its signature
        # no JWT of any kind (assertions, SVIDs, software statements, DPoP proofs)
        assert not re.search(r"eyJ[A-Za-z0-9_-]{4,}\.", text)
        assert "PRIVATE KEY" not in text and '"d":' not in text
    # the token is named by its fingerprint instead
    sha = hashlib.sha256(token.encode()).hexdigest()[:16]
    assert [e["token_sha256"] for e in named(debugged.lines, "token received")] == [sha]


def test_debug_shows_the_oauth_decisions(debugged):
    """The lines of the modules this change owns: where the token came from and how."""
    lines = debugged.lines
    [resolved] = named(lines, "authorization server resolved")
    assert resolved["server"] == "echo" and resolved["how"] == "configured issuer"
    assert resolved["spiffe_id"] == SPIFFE_ID and resolved["dpop_proofs"] is False
    [fetched] = [
        e
        for e in named(lines, "discovery fetched")
        if e["what"] == "authorization server metadata request"
    ][:1]
    assert fetched["status"] == 200
    [asked] = named(lines, "token request")
    assert asked["client_id"] == SPIFFE_ID and asked["profile"] == "jwt-bearer"
    assert asked["assertion_kid"] and asked["assertion_jti"]
    [got] = named(lines, "token received")
    assert got["token_type"] == "Bearer" and got["expires_in"] > 0


def test_debug_shows_every_decision_of_the_injected_call(debugged):
    lines = debugged.lines
    assert any(debugged.selector in e["selectors"] for e in named(lines, "process attested"))
    assert any(e["spiffe_id"] == SPIFFE_ID for e in named(lines, "registration entry matched"))
    assert named(lines, "accepted connection")[0]["redirected"].startswith("127.0.0.1:")
    [served] = named(lines, "connection served")
    assert served["spiffe_id"] == SPIFFE_ID and served["server"] == "echo"
    decided = named(lines, "request decided")
    assert [d["action"] for d in decided] == ["forward", "forward"]
    policy = named(lines, "policy decision")
    assert [(p["allowed"], p["rule"]) for p in policy] == [(True, "debugged-echo")] * 2
    assert [e["event"] for e in lines if e.get("event", "").startswith("token cache ")][:2] == [
        "token cache obtained",
        "token cache miss",
    ]
    assert named(lines, "token cache hit")
    assert len(named(lines, "upstream connected")) == 1
    assert len(named(lines, "upstream connection reused")) == 1
