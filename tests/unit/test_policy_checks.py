"""Policy checks the rest of the suite left unpinned (found by `make mutate`): the sub-agent
restriction, the name lists of prompts and resources, wildcard-only policies, what a
JSON-RPC body must be, each routing field on its own, and the audit records of a body
decision, field by field."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

from agent.config import PolicySection
from agent.inject import decide
from agent.policy import jsonrpc, rules
from agent.policy.engine import PolicyEngine
from tests.unit.test_decide import BOT, CALLERS, SERVERS, call, policy_engine

PARENT, CHILD = "spiffe://example.org/parent", "spiffe://example.org/child"


def engine(subagents: str, rule_list: list[dict]) -> PolicyEngine:
    e = PolicyEngine(PolicySection(subagents=subagents), {"tools"}, registry=CollectorRegistry())
    e.policy = rules.parse({"default_unlisted": "deny", "rule": rule_list})
    return e


def rule(id_: str, sid: str, tools: list[str], effect: str = "allow") -> dict:
    return {
        "id": id_,
        "spiffe_id": sid,
        "server": "tools",
        "methods": ["tools/call"],
        "tools": tools,
        "effect": effect,
    }


# ------------------------------------------------------------ the sub-agent restriction
SUBAGENT_RULES = [rule("parent", PARENT, ["echo"]), rule("child", CHILD, ["echo", "delete"])]


def test_restrict_to_parent_denies_a_sub_agent_what_its_parent_may_not_do():
    e = engine("restrict_to_parent", SUBAGENT_RULES)
    d = e.decide(CHILD, "tools", "tools/call", "delete", PARENT)
    assert (d.allowed, d.rule_id) == (False, None)
    assert d.reason.startswith(f"sub-agent of {PARENT}, which may not: no rule allows")
    assert e.decide(CHILD, "tools", "tools/call", "echo", PARENT).allowed
    assert e.decide(CHILD, "tools", "tools/call", "delete", None).allowed  # not a sub-agent


def test_a_parents_deny_rule_is_named_in_the_sub_agents_denial():
    e = engine(
        "restrict_to_parent", [*SUBAGENT_RULES, rule("no-delete", PARENT, ["delete"], "deny")]
    )
    d = e.decide(CHILD, "tools", "tools/call", "delete", PARENT)
    assert (d.allowed, d.rule_id) == (False, "no-delete")


def test_inherit_decides_a_sub_agent_by_its_own_rules_only():
    e = engine("inherit", SUBAGENT_RULES)
    assert e.decide(CHILD, "tools", "tools/call", "delete", PARENT).allowed
    assert not e.decide(PARENT, "tools", "tools/call", "delete", CHILD).allowed


def test_each_decision_is_counted_under_its_server_and_outcome():
    registry = CollectorRegistry()
    e = PolicyEngine(PolicySection(subagents="inherit"), {"tools"}, registry=registry)
    assert e.decide(BOT, "tools", "tools/call", "x") == rules.Decision(
        True, None, "no policy configured"
    )
    e.policy = rules.parse({"default_unlisted": "deny", "rule": [rule("r", BOT, ["echo"])]})
    e.decide(BOT, "tools", "tools/call", "rm")
    count = registry.get_sample_value
    assert count("credless_policy_decisions_total", {"server": "tools", "decision": "allow"}) == 1
    assert count("credless_policy_decisions_total", {"server": "tools", "decision": "deny"}) == 1


# ------------------------------------------------------------ rules
@pytest.mark.parametrize(
    "method,key,name",
    [("prompts/get", "prompts", "other"), ("resources/read", "resources", "file:///etc/x")],
)
def test_prompt_and_resource_names_are_checked_against_their_lists(method, key, name):
    p = rules.parse(
        {
            "rule": [
                {
                    "id": "r",
                    "spiffe_id": BOT,
                    "server": "tools",
                    "methods": [method],
                    key: ["allowed-*"],
                }
            ]
        }
    )
    assert p.decide(BOT, "tools", method, "allowed-1").allowed
    assert not p.decide(BOT, "tools", method, name).allowed


def test_a_server_under_wildcard_rules_only_is_governed_by_them():
    p = rules.parse(
        {
            "default_unlisted": "allow",
            "rule": [{"id": "any", "spiffe_id": BOT, "server": "*", "methods": ["tools/list"]}],
        }
    )
    d = p.decide("spiffe://example.org/other", "tools", "tools/list")
    assert (d.allowed, d.reason) == (
        False,
        "no rule allows tools/list on 'tools' for spiffe://example.org/other",
    )


def test_a_name_list_of_anything_but_non_empty_strings_is_refused():
    bad = {"id": "r", "spiffe_id": BOT, "server": "tools", "methods": ["tools/call"]}
    with pytest.raises(Exception, match="tools"):
        rules.parse({"rule": [{**bad, "tools": [1]}]})


# ------------------------------------------------------------ what a JSON-RPC body must be
@pytest.mark.parametrize(
    "message,why",
    [
        ({"jsonrpc": "2.0", "id": 1, "method": 7}, "method must be a non-empty string"),
        ({"jsonrpc": "2.0", "id": 1, "method": "prompts/get"}, "prompts/get without params.name"),
        (
            {"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"name": "x"}},
            "resources/read without params.uri",
        ),
    ],
)
def test_a_call_policy_cannot_name_is_malformed(message, why):
    with pytest.raises(jsonrpc.Malformed) as e:
        jsonrpc.parse_calls(json.dumps(message).encode())
    assert (e.value.code, e.value.message) == (jsonrpc.INVALID_REQUEST, why)


def test_an_error_answer_to_a_server_request_is_a_response_not_a_call():
    answer = {"jsonrpc": "2.0", "id": 3, "error": {"code": -1, "message": "declined"}}
    calls, batch = jsonrpc.parse_calls(json.dumps(answer).encode())
    assert (calls, batch) == ([jsonrpc.Call("(response)", None, 3, False, is_response=True)], False)


# ------------------------------------------------------------ a body decision
def body_decision(body: object, **fields: bytes) -> tuple:
    req = decide.Request(
        b"POST",
        b"/mcp",
        {b"host": [b"127.0.0.1:8080"]}
        | {k.replace("_", "-").encode(): [v] for k, v in fields.items()},
    )
    return decide.decide_body(
        json.dumps(body).encode(), req, SERVERS["broker"], CALLERS["attested"], policy_engine()
    )


@pytest.mark.parametrize(
    "fields,forwarded",
    [
        ({"mcp_method": b"tools/call", "mcp_name": b"echo"}, True),
        ({"mcp_method": b"tools/call", "mcp_name": b"=?base64?ZWNobw==?="}, True),
        ({"mcp_method": b"tools/list", "mcp_name": b"echo"}, False),  # the method alone
        ({"mcp_method": b"tools/call"}, False),  # the name left out
        ({"mcp_name": b"echo"}, True),
    ],
)
def test_each_routing_field_must_agree_with_the_body(fields, forwarded):
    verdict, records, _, _ = body_decision(call("echo"), **fields)
    if forwarded:
        assert verdict.action == decide.FORWARD, verdict.message
        return
    assert (verdict.status, verdict.reason, verdict.outcome) == (
        400,
        b"Bad Request",
        "header_mismatch",
    )
    assert [(r.event, r.fields) for r in records] == [
        ("call.denied", {"reason": verdict.message.removeprefix("credless: ")})
    ]


def test_a_response_in_a_batch_does_not_end_the_decision():
    response = {"jsonrpc": "2.0", "id": 9, "result": {}}
    verdict, records, _, _ = body_decision([response, call("secret_tool", 2)])
    assert (verdict.status, verdict.reason) == (403, b"Forbidden")
    assert [r.fields["tool"] for r in records] == ["secret_tool"]


def test_each_call_is_audited_with_its_decision_and_rule():
    verdict, records, _, _ = body_decision([call("echo"), call("secret_tool", 2)])
    assert [(r.event, r.fields) for r in records] == [
        (
            "call.allowed",
            {
                "rpc_method": "tools/call",
                "tool": "echo",
                "rpc_id": 1,
                "rule": "bot",
                "decision": "allow",
                "reason": "allowed by rule 'bot'",
                "arguments": [],
            },
        ),
        (
            "call.denied",
            {
                "rpc_method": "tools/call",
                "tool": "secret_tool",
                "rpc_id": 2,
                "rule": "no-secrets",
                "decision": "deny",
                "reason": "denied by rule 'no-secrets'",
                "arguments": [],
            },
        ),
    ]
    assert verdict.message == (
        "credless: denied by policy: tools/call secret_tool: denied by rule 'no-secrets'"
    )


def test_a_malformed_body_is_audited_with_its_reason():
    verdict, records, calls, batch = decide.decide_body(
        b"{", decide.Request(b"POST", b"/mcp", {}), SERVERS["broker"], CALLERS["attested"], None
    )
    assert (verdict.status, verdict.reason, verdict.rpc_code) == (
        400,
        b"Bad Request",
        jsonrpc.PARSE_ERROR,
    )
    assert verdict.message == "credless: parse error: the body is not valid JSON"
    assert [(r.event, r.fields) for r in records] == [
        ("call.denied", {"reason": "parse error: the body is not valid JSON"})
    ]
    assert (calls, batch) == (None, False)


def test_a_sub_agent_is_decided_with_its_parent():
    restricted = engine("restrict_to_parent", SUBAGENT_RULES)
    req = decide.Request(b"POST", b"/mcp", {b"host": [b"127.0.0.1:8080"]})
    caller = decide.Caller(True, CHILD, parent_spiffe_id=PARENT)
    body = json.dumps(call("delete")).encode()
    verdict, _, _, _ = decide.decide_body(body, req, SERVERS["broker"], caller, restricted)
    assert verdict.status == 403


def test_a_notification_is_decided_like_a_call():
    notification = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "secret_tool"}}
    verdict, records, _, _ = body_decision(notification)
    assert (verdict.status, [r.event for r in records]) == (403, ["call.denied"])


# ------------------------------------------------------------ the answers given in its place
def test_an_error_answer_keeps_each_request_id_and_only_those():
    calls = [
        jsonrpc.Call("tools/call", "x", 4, True),
        jsonrpc.Call("notifications/cancelled", None, None, False),
    ]
    one = {"jsonrpc": "2.0", "id": 4, "error": {"code": -1, "message": "m", "data": {"k": 1}}}
    assert json.loads(jsonrpc.error_body(calls, False, -1, "m", {"k": 1})) == one
    assert json.loads(jsonrpc.error_body(calls, True, -1, "m", {"k": 1})) == [one]
    unknown = {"jsonrpc": "2.0", "id": None, "error": {"code": -1, "message": "m", "data": 2}}
    assert json.loads(jsonrpc.error_body([], False, -1, "m", 2)) == unknown
    assert json.loads(jsonrpc.error_body(calls[1:], False, -1, "m", 2)) == unknown


def test_a_duplicate_member_is_named():
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "a", "method": "b"}'
    with pytest.raises(jsonrpc.Malformed) as e:
        jsonrpc.parse_calls(body)
    assert str(e.value) == e.value.message == "duplicate member name 'method' in a JSON object"


def test_an_empty_routing_name_agrees_with_a_call_that_has_none():
    assert jsonrpc.header_mismatch([jsonrpc.Call("tools/list", None, 1, True)], None, "") is None


# ------------------------------------------------------------ reloading the policy file
def test_a_reload_keeps_the_previous_policy_when_the_new_file_is_wrong(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(f'[[rule]]\nid = "r"\nspiffe_id = "{BOT}"\nserver = "tools"\nmethods = ["*"]\n')
    registry = CollectorRegistry()
    e = PolicyEngine(PolicySection(file=str(path)), {"tools"}, registry=registry)
    assert e.reload(initial=True) and [r.id for r in e.policy.rules] == ["r"]
    path.write_text("[[rule]]\nid = 7\n")
    assert e.reload() is False and [r.id for r in e.policy.rules] == ["r"]
    count = registry.get_sample_value
    assert count("credless_policy_reloads_total", {"result": "ok"}) == 1
    assert count("credless_policy_reloads_total", {"result": "error"}) == 1


def test_loading_a_policy_file_names_the_file_in_every_problem(tmp_path):
    path = tmp_path / "policy.toml"
    with pytest.raises(rules.PolicyError) as e:
        rules.load(path, {"tools"})
    assert str(e.value) == f"{path}: file not found; create it or set policy.file"
    path.write_text("[[rule]\n")
    with pytest.raises(rules.PolicyError, match=f"^{path}: not valid TOML: "):
        rules.load(path, {"tools"})
    path.write_text(f'[[rule]]\nid = "r"\nspiffe_id = "{BOT}"\nserver = "other"\nmethods = ["*"]\n')
    with pytest.raises(rules.PolicyError, match=f"^{path}: rule.*other"):
        rules.load(path, {"tools"})
    path.write_text(path.read_text().replace("other", "tools"))
    assert rules.load(str(path), {"tools"}).source == str(path)


def test_a_reload_refuses_a_policy_naming_an_unknown_server(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(f'[[rule]]\nid = "r"\nspiffe_id = "{BOT}"\nserver = "other"\nmethods = ["*"]\n')
    assert PolicyEngine(PolicySection(file=str(path)), {"tools"}).reload() is False
    assert PolicyEngine(PolicySection(file=""), {"tools"}).reload() is True  # no file


def test_each_decision_says_why():
    p = rules.parse({"rule": [rule("r", BOT, ["echo"])]})
    assert p.decide(BOT, "tools", "initialize") == rules.Decision(
        True, None, "session lifecycle of an identity with allowed calls"
    )
    assert p.decide(BOT, "tools", "tools/call", "rm").reason == (
        f"no rule allows tools/call rm on 'tools' for {BOT}"
    )
    assert p.decide(BOT, "maps", "tools/list").reason == (
        "server 'maps' has no rules; default_unlisted = allow"
    )
