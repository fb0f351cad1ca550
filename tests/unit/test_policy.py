"""Policy rules (table-driven over testdata) and JSON-RPC inspection."""

from __future__ import annotations

import json

import pytest

from agent.policy import jsonrpc, rules
from tests.conftest import REPO, TESTDATA

POLICY = rules.load(TESTDATA / "policy/policy.toml", servers={"weather", "maps"})
ROWS = [
    ln.split("\t")
    for ln in (TESTDATA / "policy/decisions.tsv").read_text().splitlines()
    if ln and not ln.startswith("#")
]


@pytest.mark.parametrize(
    "sid,server,method,name,allowed,rule",
    ROWS,
    ids=[f"{r[0].rsplit('/', 1)[-1]}-{r[2]}-{r[3]}" for r in ROWS],
)
def test_decisions(sid, server, method, name, allowed, rule):
    d = POLICY.decide(sid, server, method, None if name == "-" else name)
    assert d.allowed is (allowed == "true"), d.reason
    assert d.rule_id == (None if rule == "-" else rule)


def test_a_resource_uri_that_is_not_plain_is_refused_saying_why():
    d = POLICY.decide(
        "spiffe://example.org/agent/a", "weather", "resources/read", "file:///docs/../etc/passwd"
    )
    assert d.allowed is False and d.rule_id is None
    assert "has a dot segment" in d.reason and "plain URI" in d.reason


def test_unlisted_servers_follow_the_default():
    p = rules.parse(
        {"rule": [{"id": "r", "spiffe_id": "spiffe://e/*", "server": "a", "methods": ["*"]}]}
    )
    assert p.decide("spiffe://e/x", "b", "tools/list").allowed is True  # default allow
    p.default_unlisted = "deny"
    assert p.decide("spiffe://e/x", "b", "tools/list").allowed is False


@pytest.mark.parametrize(
    "spiffe_id,verb,allowed",
    [
        ("spiffe://example.org/agent/a", "http:GET", True),  # any allowed call: a session
        ("spiffe://example.org/agent/a", "http:DELETE", True),
        ("spiffe://example.org/nobody", "http:GET", False),  # no rule: default deny
        ("spiffe://example.org/admin", "http:GET", True),  # methods = ["*"] covers it
    ],
)
def test_session_requests_without_a_body_follow_the_identity_rules(spiffe_id, verb, allowed):
    assert POLICY.decide(spiffe_id, "weather", verb).allowed is allowed


def test_a_deny_rule_covering_every_method_refuses_the_event_stream_too():
    p = rules.parse(
        {
            "rule": [
                {"id": "calls", "spiffe_id": "spiffe://e/x", "server": "a", "methods": ["tools/*"]},
                {
                    "id": "off",
                    "spiffe_id": "spiffe://e/x",
                    "server": "a",
                    "methods": ["*"],
                    "effect": "deny",
                },
            ]
        }
    )
    assert p.decide("spiffe://e/x", "a", "http:GET").rule_id == "off"


@pytest.mark.parametrize(
    "key,value,says",
    [
        ("oauth", ["token"], "oauth: removed: it was never enforced"),
        (
            "scope",
            "tools:read",
            "scope: removed: it was never enforced. Set the scope to "
            "request per server with `scope` in the agent's [[servers]]",
        ),
    ],
)
def test_rule_keys_that_were_never_enforced_are_refused_saying_what_to_do(key, value, says):
    with pytest.raises(rules.PolicyError) as err:
        rules.parse(
            {
                "rule": [
                    {
                        "id": "r",
                        "spiffe_id": "spiffe://e/x",
                        "server": "a",
                        "methods": ["tools/list"],
                        key: value,
                    }
                ]
            }
        )
    assert len(err.value.problems) == 1 and says in err.value.problems[0]


# invalid files and their exact messages: tests/testdata/policy, run by test_config.py


def test_the_example_policy_loads_as_written():
    p = rules.load(REPO / "deploy/policy.example.toml", servers={"weather"})
    assert p.default_unlisted == "deny"
    assert [(r.id, r.effect) for r in p.rules] == [
        ("weather-readers", "allow"),
        ("no-secrets", "deny"),
        ("admin", "allow"),
        ("safe-queries", "allow"),
        ("own-files", "allow"),
    ]
    readers = p.rules[0]
    assert readers.methods == ("tools/list", "tools/call", "resources/read")
    assert readers.tools == ("get_*", "echo") and readers.prompts == ("*",)


# ---------------------------------------------------------------- JSON-RPC
def test_single_and_batch_parsing():
    calls, batch = jsonrpc.parse_calls(
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {}},
            }
        ).encode()
    )
    assert not batch and calls == [jsonrpc.Call("tools/call", "echo", 7, True)]
    calls, batch = jsonrpc.parse_calls(
        json.dumps(
            [
                {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "resources/read",
                    "params": {"uri": "file:///a"},
                },
                {"jsonrpc": "2.0", "method": "notifications/initialized"},
                {"jsonrpc": "2.0", "id": 9, "result": {}},
            ]
        ).encode()
    )
    assert batch and [(c.method, c.name, c.id, c.is_request) for c in calls] == [
        ("resources/read", "file:///a", 1, True),
        ("notifications/initialized", None, None, False),
        ("(response)", None, 9, False),
    ]


@pytest.mark.parametrize(
    "body,code,message",
    [
        (b"{nope", -32700, "parse error: the body is not valid JSON"),
        (b"[]", -32600, "empty batch"),
        (b'{"jsonrpc": "1.0", "method": "x"}', -32600, "not a JSON-RPC 2.0 message"),
        (b'{"jsonrpc": "2.0", "id": 1}', -32600, "JSON-RPC message without a method"),
        (
            b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}}',
            -32600,
            "tools/call without params.name",
        ),
    ],
)
def test_malformed(body, code, message):
    with pytest.raises(jsonrpc.Malformed) as err:
        jsonrpc.parse_calls(body)
    assert (err.value.code, err.value.message) == (code, message)


def test_header_agreement_for_the_stateless_revision():
    call = [jsonrpc.Call("tools/call", "echo", 1, True)]
    assert jsonrpc.header_mismatch(call, None, None) is None
    assert jsonrpc.header_mismatch(call, "tools/call", "echo") is None
    assert jsonrpc.header_mismatch(call, "tools/call", "=?base64?ZWNobw==?=") is None
    assert (
        jsonrpc.header_mismatch(call, "tools/list", None)
        == "Mcp-Method header 'tools/list' != body method 'tools/call'"
    )
    assert (
        jsonrpc.header_mismatch(call, "tools/call", "secret")
        == "Mcp-Name header 'secret' != body name 'echo'"
    )
    assert (
        jsonrpc.header_mismatch(call, "tools/call", None)
        == "Mcp-Name header missing for tools/call 'echo'"
    )


@pytest.mark.parametrize("name", ["\0invalid", "=?base64?!!!?=", "=?base64?/w==?="])
def test_a_routing_header_that_does_not_decode_never_agrees(name):
    """An undecodable =?base64?...?= value (not base64, not UTF-8) is a mismatch whatever
    the body names, even the string a decoder might have used to stand for it."""
    call = [jsonrpc.Call("tools/call", "\0invalid", 1, True)]
    got = jsonrpc.header_mismatch(call, "tools/call", "=?base64?!!!?=")
    assert got == "Mcp-Name header '=?base64?!!!?=' is not valid base64 UTF-8"
    call = [jsonrpc.Call("tools/call", name, 1, True)]
    assert jsonrpc.header_mismatch(call, "tools/call", "=?base64?/w==?=") is not None


def test_error_bodies_keep_ids():
    one = [jsonrpc.Call("tools/call", "x", "abc", True)]
    assert json.loads(jsonrpc.error_body(one, False, -32001, "denied")) == {
        "jsonrpc": "2.0",
        "id": "abc",
        "error": {"code": -32001, "message": "denied"},
    }
    batch = [
        jsonrpc.Call("tools/call", "x", 1, True),
        jsonrpc.Call("notifications/initialized", None, None, False),
        jsonrpc.Call("tools/list", None, 2, True),
    ]
    assert [e["id"] for e in json.loads(jsonrpc.error_body(batch, True, -32001, "d"))] == [1, 2]


def test_policy_cli(credless_cmd, tmp_path):
    import subprocess

    from tests.helpers import write_config
    from tests.world import server_table

    # explain names the server as the agent's config does
    cfg = write_config(tmp_path, extra=server_table("weather", "http://127.0.0.1:1/mcp"))
    f = str(TESTDATA / "policy/policy.toml")
    r = subprocess.run([*credless_cmd, "policy", "check", f], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f"{f}: ok (3 rules, default_unlisted = deny)\n"
    r = subprocess.run(
        [
            *credless_cmd,
            "policy",
            "explain",
            "--file",
            f,
            "--config",
            str(cfg),
            "--spiffe-id",
            "spiffe://example.org/agent/a",
            "--server",
            "weather",
            "--method",
            "tools/call",
            "--tool",
            "secret_x",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert json.loads(r.stdout) == {
        "decision": "deny",
        "rule": "no-secrets",
        "reason": "denied by rule 'no-secrets'",
    }
