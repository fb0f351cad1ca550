"""A hostile MCP server behind the real agent, on the real kernel (issue 15, item 6).

A workload in a managed cgroup calls an MCP server whose metadata names an authorization
server the operator did not allow (or that it later switched to, after the first one was
pinned). The proxy answers the workload 502 with the reason; the wrong authorization server
receives nothing, the MCP server nothing with a credential, and the refusal is audited under
the workload's identity. The honest authorization server is the real oidc-provider; the MCP
server and the wrong authorization server are tests/mcp/hostile.py's (in this process).
"""

from __future__ import annotations

import contextlib
import json

import pytest

from tests.helpers import AgentProcess, audit_events
from tests.kernel import run_python
from tests.mcp.hostile import HostileMcpServer, RecordingAuthorizationServer
from tests.world import build_world, server_table

pytestmark = pytest.mark.kernel
SID = "spiffe://example.org/test/hostile-server"

# One POST on one connection; prints the status line and the body of the answer as JSON.
CLIENT = r"""
import http.client, json, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=20)
body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
c.request("POST", "/mcp", body, {"Content-Type": "application/json",
                                 "Accept": "application/json, text/event-stream"})
r = c.getresponse()
print(json.dumps({"status": r.status, "body": r.read().decode()}))
"""


@contextlib.contextmanager
def hostile_world(tmp_path, **server_settings):
    """The agent with one server, `h`: the hostile MCP server; server_settings' values may
    name the honest authorization server as "{oidc}"."""
    with build_world(tmp_path, SID) as w:
        w.mcp = w.enter(HostileMcpServer("127.0.0.1"))
        w.wrong = w.enter(RecordingAuthorizationServer("127.0.0.2"))
        w.authorization_server([w.mcp.url])
        w.mcp.metadata([w.wrong.issuer])  # hostile from the start
        settings = {
            k: [x.format(oidc=w.oidc.issuer) for x in v] for k, v in server_settings.items()
        }
        w.start_agent(server_table("h", w.mcp.url, **settings))

        w.call = lambda: json.loads(run_python(CLIENT, w.mcp.port, cgroup=w.cg))
        yield w


def test_a_server_naming_an_authorization_server_off_the_allow_list_gets_a_502(tmp_path):
    with hostile_world(tmp_path, authorization_servers=["{oidc}"]) as w:
        answer = w.call()
        assert answer["status"] == 502
        # a JSON-RPC request: a JSON-RPC error, the failure's kind and detail in its data
        body = json.loads(answer["body"])["error"]["data"]
        assert body["kind"] == "untrusted_authorization_server"
        assert w.wrong.issuer in body["detail"] and w.oidc.issuer in body["detail"]
        assert "'h'" in body["detail"]
        assert w.wrong.received() == []
        assert not any(s.carries_credential for s in w.mcp.received())
        assert w.oidc.events("grant.success") == []
        events = audit_events(w.agent.stdout_path, "request.failed")
        refused = [e for e in events if e["event"] == "oauth.refused"]
        assert refused and refused[0]["spiffe_id"] == SID and refused[0]["server"] == "h"
        assert refused[0]["authorization_server"] == w.wrong.issuer
        failed = [e for e in events if e["event"] == "request.failed"]
        assert failed and failed[0]["kind"] == "untrusted_authorization_server"
        assert failed[0]["spiffe_id"] == SID


def test_a_pinned_authorization_server_survives_a_restart_and_a_hostile_change(tmp_path):
    """No issuer, no list: the first AS discovered is pinned; after a restart, a server
    that now names another AS is refused and nothing reaches that AS."""
    with hostile_world(tmp_path) as w:
        w.mcp.metadata([w.oidc.issuer])  # honest at first
        first = w.call()
        assert first["status"] == 401  # the hostile server refuses every token:
        assert w.oidc.events("grant.success")  # what matters is that one was issued
        pins = tmp_path / "state" / "oauth" / "authorization_servers.json"
        assert [p["issuer"] for p in json.loads(pins.read_text()).values()] == [w.oidc.issuer]
        w.agent.stop()
        w.mcp.metadata([w.wrong.issuer])  # then switches to its accomplice
        with AgentProcess(w.agent.config, tmp_path) as agent:
            agent.wait_ready()
            answer = w.call()
            assert answer["status"] == 502
            data = json.loads(answer["body"])["error"]["data"]
            assert data["kind"] == "untrusted_authorization_server"
            assert str(pins) in data["detail"]
            assert w.wrong.received() == []
            assert [p["issuer"] for p in json.loads(pins.read_text()).values()] == [w.oidc.issuer]
            refused = [
                e
                for e in audit_events(agent.stdout_path, "oauth.refused")
                if e["event"] == "oauth.refused"
            ]
            assert refused[0]["spiffe_id"] == SID
            assert refused[0]["check"] == "untrusted_authorization_server"
