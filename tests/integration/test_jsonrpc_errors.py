"""Errors a client can show, on the real kernel with the real SDKs: when credless itself
answers a JSON-RPC request (403 no identity, 502 no token, 403 policy), the answer is a
JSON-RPC error keeping the request's id, with credless's message and the id of the audit
event that records it, and the official Python and TypeScript MCP clients show that message
(not "Server returned an error response"). The HTTP status is unchanged. docs/errors.md.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess

import pytest

from agent.inject import answers
from agent.policy import jsonrpc
from tests.conftest import REPO
from tests.helpers import audit_events
from tests.kernel import enter_cgroup, run_python
from tests.mcp.peers import McpServer, run_client, run_ts_client
from tests.world import build_world, entry_table, server_table, tools_rule

pytestmark = pytest.mark.kernel
SPIFFE_ID = "spiffe://example.org/agent/error-bot"
EVENT_ID = re.compile(r"\(audit event ([0-9a-f]{16})\)")


@contextlib.contextmanager
def world_of(tmp_path, entries=None, registered=(SPIFFE_ID,), policy=None):
    """oidc-provider (knowing the clients `registered`), an MCP server demanding its tokens,
    and the agent (entries: default, the world's cgroup is SPIFFE_ID)."""
    with build_world(tmp_path, SPIFFE_ID) as w:
        w.mcp = w.enter(McpServer(tmp_path))
        w.authorization_server([w.mcp.url], list(registered))
        w.mcp.start(w.oidc.issuer)
        w.start_agent(server_table("weather", w.mcp.url), entries=entries, policy=policy)
        yield w


def py_client(w, *steps: str) -> dict:
    """The Python SDK client in the world's cgroup: its last line (the error it surfaced)."""
    return run_client(w.mcp.url, *steps, preexec=enter_cgroup(w.cg))[-1]


def ts_client(w, *args: str) -> dict:
    return run_ts_client(w.mcp.url, *args, preexec=enter_cgroup(w.cg))


def ts_body(out: dict) -> dict:
    """The answer's body inside the TypeScript SDK's error message (it shows the body)."""
    return json.loads(out["message"].split("Error POSTing to endpoint: ", 1)[1])


def audited(agent, event_id: str) -> list[dict]:
    """The audit events an answer names (waited for: they are written after the answer)."""
    return [
        e
        for e in audit_events(
            agent.stdout_path, lambda evs: any(e.get("event_id") == event_id for e in evs)
        )
        if e.get("event_id") == event_id
    ]


def shown_event(message: str) -> str:
    m = EVENT_ID.search(message)
    assert m, f"no audit event id in {message!r}"
    return m.group(1)


def test_a_process_without_identity_is_shown_why_by_both_sdks(tmp_path):
    # the world's cgroup is managed, but no registration entry matches its processes
    elsewhere = entry_table("elsewhere", SPIFFE_ID, ["cgroup:path:/not-the-test-cgroup"])
    with world_of(tmp_path, entries=elsewhere) as w:
        out = py_client(w, "list")
        assert out["error"] == "MCPError" and out["code"] == answers.NO_IDENTITY, out
        assert out["message"].startswith("credless: this process has no identity")
        assert out["data"]["status"] == 403 and out["data"]["cause"] == "unattested"
        event_id = shown_event(out["message"])
        assert out["data"]["event_id"] == event_id
        [denied] = audited(w.agent, event_id)
        assert denied["event"] == "request.denied" and denied["status"] == 403
        assert denied["spiffe_id"] is None and denied["cgroup"] == f"/{w.cg.name}"

        ts = ts_client(w)
        assert ts["status"] == 403, ts  # StreamableHTTPError: the HTTP status as its code
        body = ts_body(ts)
        assert body["jsonrpc"] == "2.0" and isinstance(body["id"], int)  # its initialize
        assert body["error"]["code"] == answers.NO_IDENTITY
        assert "this process has no identity" in body["error"]["message"]
        [ts_denied] = audited(w.agent, shown_event(body["error"]["message"]))
        assert ts_denied["event"] == "request.denied" and ts_denied["exe"].endswith("node")

        # a raw batch keeps each request's id; a GET (not JSON-RPC) keeps the plain body
        code = f"""
import http.client, json
c = http.client.HTTPConnection("127.0.0.1", {w.mcp.port}, timeout=20)
batch = [{{"jsonrpc": "2.0", "id": 5, "method": "tools/list"}},
         {{"jsonrpc": "2.0", "method": "notifications/initialized"}},
         {{"jsonrpc": "2.0", "id": "six", "method": "ping"}}]
c.request("POST", "/mcp", body=json.dumps(batch), headers={{"Content-Type": "application/json"}})
r = c.getresponse(); posted = [r.status, json.loads(r.read())]
c.request("GET", "/mcp", headers={{"Accept": "text/event-stream"}})
r = c.getresponse(); print(json.dumps([posted, [r.status, json.loads(r.read())]]), flush=True)
"""
        (status, body), (get_status, plain) = json.loads(run_python(code, cgroup=w.cg))
        assert status == 403 and [e["id"] for e in body] == [5, "six"]
        assert get_status == 403 and plain["error"].startswith("credless: this process has no")
        assert audited(w.agent, plain["event_id"])[0]["method"] == "GET"
        assert w.mcp.relayed() == []  # nothing of it reached the server


def test_a_token_failure_is_shown_with_what_the_authorization_server_said(tmp_path):
    # the authorization server knows another client, not this workload's SPIFFE ID
    with world_of(tmp_path, registered=["spiffe://example.org/agent/someone-else"]) as w:
        out = py_client(w, "list")
        assert out["error"] == "MCPError" and out["code"] == answers.TOKEN_FAILED, out
        msg = out["message"]
        assert msg.startswith(
            "credless: could not obtain a token from the authorization server: "
        ), msg
        assert "invalid_client" in msg and out["data"]["status"] == 502
        assert out["data"]["kind"] and out["data"]["detail"] in msg
        assert "eyJ" not in json.dumps(out)  # never an assertion or a token
        [failed] = audited(w.agent, shown_event(msg))
        assert failed["event"] == "request.failed" and failed["spiffe_id"] == SPIFFE_ID

        ts = ts_client(w)
        assert ts["status"] == 502, ts
        error = ts_body(ts)["error"]
        assert error["code"] == answers.TOKEN_FAILED and "invalid_client" in error["message"]
        assert audited(w.agent, shown_event(error["message"]))[0]["event"] == "request.failed"

        # the authorization server stopped: still a JSON-RPC error naming it
        w.oidc.stop()
        out = py_client(w, "list")
        assert out["code"] == answers.TOKEN_FAILED, out
        assert "authorization server" in out["message"]
        assert audited(w.agent, shown_event(out["message"]))[0]["event"] == "request.failed"
        assert not w.mcp.credentialed()


def test_a_policy_denial_is_shown_by_both_sdks_as_before(tmp_path):
    policy = tools_rule("bot-tools", SPIFFE_ID, "weather", ["echo"])
    with world_of(tmp_path, policy=policy) as w:
        out = py_client(w, "list", "call:secret_tool")
        assert out["error"] == "MCPError" and out["code"] == jsonrpc.POLICY_DENIED, out
        assert "denied by policy" in out["message"] and "secret_tool" in out["message"]
        records = audited(w.agent, shown_event(out["message"]))
        assert [(e["event"], e["tool"]) for e in records] == [("call.denied", "secret_tool")]
        assert records[0]["spiffe_id"] == SPIFFE_ID

        ts = ts_client(w, "secret_tool")
        assert ts["status"] == 403, ts
        body = ts_body(ts)
        assert body["error"]["code"] == jsonrpc.POLICY_DENIED and isinstance(body["id"], int)
        assert "secret_tool" in body["error"]["message"]
        assert audited(w.agent, shown_event(body["error"]["message"]))[0]["event"] == "call.denied"
        # an allowed call still goes through
        assert ts_client(w)["text"] == "from typescript"
        assert "secret_tool" not in w.mcp.stats()["calls"]


def test_an_unreachable_or_silent_server_is_shown_by_both_sdks(tmp_path):
    """The exchange's own answers (exchange.py): 502 unreachable and 502 closed without an
    answer, through the full path and the fast lane alike (passthrough: no token)."""
    from tests.helpers import AgentProcess, free_port
    from tests.kernel import cgroup_child
    from tests.upstreams.echo import hangup_server
    from tests.world import passthrough_config

    with cgroup_child() as cg, hangup_server() as hangup:
        dead = free_port()  # nothing listens there
        cfg = passthrough_config(tmp_path, cg, {"dead": dead, "hangup": hangup})
        with AgentProcess(cfg, tmp_path) as agent:
            agent.wait_ready()
            for port, code, text in [
                (dead, answers.UPSTREAM_FAILED, "credless: the MCP server is unreachable: "),
                (hangup, answers.UPSTREAM_FAILED, "closed the connection without answering"),
            ]:
                url = f"http://127.0.0.1:{port}/mcp"
                out = run_client(url, "list", preexec=enter_cgroup(cg))[-1]
                assert out["error"] == "MCPError" and out["code"] == code, out
                assert text in out["message"]
                [failed] = audited(agent, shown_event(out["message"]))
                assert failed["event"] == "request.failed" and failed["server"] in (
                    "dead",
                    "hangup",
                )
                r = subprocess.run(
                    ["node", str(REPO / "tests/mcp/client.mjs"), url],
                    capture_output=True,
                    text=True,
                    timeout=90,
                    preexec_fn=enter_cgroup(cg),
                )
                ts = json.loads(r.stdout.strip().splitlines()[-1])
                assert ts["status"] == 502 and ts_body(ts)["error"]["code"] == code, ts
