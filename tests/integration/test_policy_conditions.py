"""Policy rules with conditions on the call's arguments and the caller's identity, end to end
on the real kernel: the official Python SDK client (MCP 2026-07-28: stateless, Mcp-Method
and Mcp-Name headers) and the TypeScript SDK client (2025-11-25: initialize and a session)
in a managed cgroup, oidc-provider, and the SDK's MCP server demanding its tokens.

A call whose arguments the condition refuses gets a JSON-RPC error keeping its id
(POLICY_DENIED), is audited with the rule and the argument names but never their values,
and never reaches the server; each call of a batch is decided with its own arguments; an
argument the condition needs and the call lacks denies (fail closed); an invalid condition
is refused by `credless policy check` and on reload, naming the rule, and the previous
policy keeps deciding. docs/policy.md.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys

import pytest

from agent.policy import jsonrpc
from tests.conftest import REPO
from tests.helpers import audit_events, wait_for
from tests.kernel import enter_cgroup, run_python
from tests.mcp.peers import McpServer, run_client, run_ts_client
from tests.world import build_world, server_table, table

pytestmark = pytest.mark.kernel
SPIFFE_ID = "spiffe://example.org/agent/cond-bot"
EVENT_ID = re.compile(r"\(audit event ([0-9a-f]{16})\)")
SECRET = "s3cr3t-Value-9f2c"  # in a refused call's arguments: must appear nowhere

POLICY = (
    'default_unlisted = "deny"\n'
    + table("[[rule]]", id="lister", spiffe_id=SPIFFE_ID, server="weather", methods=["tools/list"])
    + table(
        "[[rule]]",
        id="clean-echo",
        spiffe_id="spiffe://example.org/agent/*",
        server="weather",
        methods=["tools/call"],
        tools=["echo"],
        when='!args.text.matches("(?i)\\\\b(drop|delete|update)\\\\b")',
    )
    + table(
        "[[rule]]",
        id="small-sums",
        spiffe_id="spiffe://example.org/*",
        server="weather",
        methods=["tools/call"],
        tools=["add"],
        # derived from the caller's identity: only agents under /agent/ add, and little
        when='spiffe.segments[0] == "agent" && args.a + args.b < 100',
    )
)


@contextlib.contextmanager
def conditional_world(tmp_path, policy: str = POLICY):
    with build_world(tmp_path, SPIFFE_ID) as w:
        w.mcp = w.enter(McpServer(tmp_path))
        w.authorization_server([w.mcp.url])
        w.mcp.start(w.oidc.issuer)
        w.start_agent(server_table("weather", w.mcp.url), policy=policy)
        yield w


def py_client(w, *steps: str) -> list[dict]:
    return run_client(w.mcp.url, *steps, preexec=enter_cgroup(w.cg))


def ts_client(w, tool: str, args: dict) -> dict:
    return run_ts_client(w.mcp.url, tool, json.dumps(args), preexec=enter_cgroup(w.cg))


def shown_event(message: str) -> str:
    m = EVENT_ID.search(message)
    assert m, f"no audit event id in {message!r}"
    return m.group(1)


def audited(agent, event_id: str) -> list[dict]:
    """The audit events an answer names (waited for: they are written after the answer)."""
    events = audit_events(
        agent.stdout_path, lambda evs: any(e.get("event_id") == event_id for e in evs)
    )
    return [e for e in events if e.get("event_id") == event_id]


def ts_body(out: dict) -> dict:
    """The answer's body inside the TypeScript SDK's error message (it shows the body)."""
    return json.loads(out["message"].split("Error POSTing to endpoint: ", 1)[1])


def audited_all(w) -> list[dict]:
    return audit_events(w.agent.stdout_path)


def agent_output(w) -> str:
    return w.agent.stdout_path.read_text() + w.agent.stderr_path.read_text()


def test_a_condition_on_the_arguments_decides_each_call_of_both_revisions(tmp_path):
    with conditional_world(tmp_path) as w:
        # 2026-07-28 (the Python SDK): allowed, then refused by its argument's value
        ok, refused = py_client(
            w,
            'call:echo:{"text": "hello"}',
            'call:echo:{"text": "DROP TABLE users -- ' + SECRET + '"}',
        )
        assert ok["text"] == "hello" and not ok["is_error"], ok
        assert refused["error"] == "MCPError" and refused["code"] == jsonrpc.POLICY_DENIED
        assert "the condition of rule 'clean-echo' does not hold" in refused["message"]
        assert SECRET not in json.dumps(refused)
        [denied] = audited(w.agent, shown_event(refused["message"]))
        assert (denied["event"], denied["rule"], denied["tool"]) == (
            "call.denied",
            "clean-echo",
            "echo",
        )
        assert denied["arguments"] == ["text"] and denied["spiffe_id"] == SPIFFE_ID

        # 2025-11-25 (the TypeScript SDK, in a session): the same rule, the same answers
        ts = ts_client(w, "echo", {"text": "please delete " + SECRET})
        assert ts["status"] == 403, ts
        body = ts_body(ts)
        assert body["error"]["code"] == jsonrpc.POLICY_DENIED and isinstance(body["id"], int)
        assert audited(w.agent, shown_event(body["error"]["message"]))[0]["rule"] == "clean-echo"
        assert ts_client(w, "echo", {"text": "fine"})["text"] == "fine"

        stats = w.mcp.stats()
        assert stats["calls"] == {"echo": 2}  # hello and fine; neither refusal reached it
        revisions = {
            "2026-07-28" if r["mcp_method"] else "2025-11-25"
            for r in stats["requests"]
            if r["method"] == "POST"
        }
        assert revisions == {"2026-07-28", "2025-11-25"}
        allowed = [e for e in audited_all(w) if e.get("event") == "call.allowed"]
        assert [e["arguments"] for e in allowed if e["tool"] == "echo"] == [["text"], ["text"]]
        assert SECRET not in agent_output(w)  # argument values are never logged or audited


def test_a_condition_derived_from_the_identity_and_a_missing_argument_fails_closed(tmp_path):
    with conditional_world(tmp_path) as w:
        out = py_client(w, 'call:add:{"a": 2, "b": 3}', 'call:add:{"a": 99, "b": 1}')
        assert out[0]["text"] == "5", out
        assert out[1]["code"] == jsonrpc.POLICY_DENIED and "'small-sums'" in out[1]["message"]
        # b missing: the condition cannot be evaluated, so the call is denied, naming it
        [missing] = py_client(w, 'call:add:{"a": 2}')
        assert missing["code"] == jsonrpc.POLICY_DENIED, missing
        assert (
            "the condition of rule 'small-sums' cannot be evaluated: no field 'b'"
            in missing["message"]
        )
        [denied] = audited(w.agent, shown_event(missing["message"]))
        assert denied["rule"] == "small-sums" and denied["arguments"] == ["a"]
        assert w.mcp.stats()["calls"] == {"add": 1}


BATCH = """
import http.client, json, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=20)
def call(i, text):
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": text}}}
batch = [call(1, "hello"), {"jsonrpc": "2.0", "method": "notifications/initialized"},
         call("two", "update the table " + sys.argv[2])]
c.request("POST", "/mcp", body=json.dumps(batch),
          headers={"Content-Type": "application/json",
                   "Accept": "application/json, text/event-stream"})
r = c.getresponse()
print(json.dumps([r.status, json.loads(r.read())]), flush=True)
"""


def test_each_call_of_a_batch_is_decided_with_its_own_arguments(tmp_path):
    with conditional_world(tmp_path) as w:
        status, errors = json.loads(run_python(BATCH, w.mcp.port, SECRET, cgroup=w.cg))
        assert status == 403 and [e["id"] for e in errors] == [1, "two"]
        assert {e["error"]["code"] for e in errors} == {jsonrpc.POLICY_DENIED}
        message = errors[0]["error"]["message"]
        assert "tools/call echo: no rule allows" in message and SECRET not in message
        records = audited(w.agent, shown_event(message))
        assert [(e["event"], e["rpc_id"], e["rule"]) for e in records] == [
            ("call.allowed", 1, "clean-echo"),
            ("call.allowed", None, None),  # the notification: a session lifecycle method
            ("call.denied", "two", "clean-echo"),
        ]
        assert w.mcp.stats()["calls"] == {}  # nothing of a refused batch reaches the server
        assert SECRET not in agent_output(w)


INVALID = POLICY.replace("args.a + args.b < 100", "args.a + < 100")


def test_an_invalid_condition_is_refused_by_check_and_on_reload(tmp_path):
    with conditional_world(tmp_path) as w:
        assert py_client(w, 'call:add:{"a": 2, "b": 3}')[0]["text"] == "5"
        policy = tmp_path / "policy.toml"
        policy.write_text(INVALID)
        where = 'rule[2] (id "small-sums").when: not a valid condition: line 1, column '
        check = subprocess.run(
            [sys.executable, "-m", "agent", "policy", "check", str(policy)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert check.returncode == 2 and f"{policy}: {where}" in check.stderr, check.stderr
        w.agent.proc.send_signal(signal.SIGHUP)
        refused = wait_for(
            lambda: [
                e
                for e in w.agent.log_events()
                if e.get("event") == "policy not reloaded; keeping the previous one"
            ],
            what="the invalid policy refused",
        )
        assert where in refused[0]["error"]
        # the previous policy, conditions and all, still decides
        out = py_client(w, 'call:add:{"a": 2, "b": 3}', 'call:add:{"a": 99, "b": 1}')
        assert out[0]["text"] == "5" and out[1]["code"] == jsonrpc.POLICY_DENIED, out


def test_a_condition_on_the_callers_selectors_sees_the_attested_process(tmp_path):
    # the selectors the kernel's attestation gave the process, not any it could claim
    with build_world(tmp_path, SPIFFE_ID) as w:
        policy = 'default_unlisted = "deny"\n' + table(
            "[[rule]]",
            id="this-cgroup",
            spiffe_id=SPIFFE_ID,
            server="weather",
            methods=["tools/list", "tools/call"],
            tools=["echo", "add"],
            # echo: any process of this cgroup; add: only one of another cgroup
            when=f'"{w.selector}" in selectors && (tool != "add" || '
            '"cgroup:path:/elsewhere" in selectors)',
        )
        w.mcp = w.enter(McpServer(tmp_path))
        w.authorization_server([w.mcp.url])
        w.mcp.start(w.oidc.issuer)
        w.start_agent(server_table("weather", w.mcp.url), policy=policy)
        ok, denied = py_client(w, 'call:echo:{"text": "mine"}', 'call:add:{"a": 1, "b": 2}')
        assert ok["text"] == "mine", ok
        assert denied["code"] == jsonrpc.POLICY_DENIED, denied
        assert "the condition of rule 'this-cgroup' does not hold" in denied["message"]
        assert w.mcp.stats()["calls"] == {"echo": 1}
