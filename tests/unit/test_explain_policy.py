"""`credless explain`'s policy step: the decision the proxy's policy makes for the call and
the rule that made it, a sub-agent held to its parent's rules, conditions with the call's
arguments; asked of the real policy, without counting a decision."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from agent.config import ServerSection
from agent.explain import Call, policy_step
from agent.policy.rules import parse

BOT, PARENT = "spiffe://example.org/bot", "spiffe://example.org/parent"
POLICY = parse(
    {
        "rule": [
            {
                "id": "bot-tools",
                "spiffe_id": BOT,
                "server": "files",
                "methods": ["tools/list", "tools/call"],
                "tools": ["read", "list"],
            },
            {
                "id": "parent-list",
                "spiffe_id": PARENT,
                "server": "files",
                "methods": ["tools/call"],
                "tools": ["list"],
            },
            {
                "id": "srv-only",
                "spiffe_id": BOT,
                "server": "files",
                "methods": ["tools/call"],
                "tools": ["write"],
                "when": 'args.path.startsWith("/srv/")',
            },
        ]
    }
)
FILES = ServerSection(name="files", url="http://127.0.0.1:9/mcp")


def agent(subagents: str = "inherit"):
    return SimpleNamespace(cfg=SimpleNamespace(policy=SimpleNamespace(subagents=subagents)))


def proxy(policy=POLICY):
    return SimpleNamespace(policy=SimpleNamespace(policy=policy))


def step(call: Call, parent=None, subagents="inherit", server=FILES, policy=POLICY):
    return policy_step(agent(subagents), proxy(policy), server, BOT, parent, call)


def test_the_decision_names_the_rule_and_lists_the_identitys_rules():
    s = step(Call("tools/call", "read"))
    assert s.ok is True and s.summary == "tools/call read: allowed: allowed by rule 'bot-tools'"
    assert s.data == {
        "decision": "allow",
        "rule": "bot-tools",
        "reason": "allowed by rule 'bot-tools'",
    }
    assert s.lines[0] == "rule 'bot-tools': allow tools/list, tools/call tools read, list"
    denied = step(Call("tools/call", "delete"))
    assert denied.ok is False and denied.summary.startswith("tools/call delete: denied (403): ")


def test_without_a_method_the_rules_are_listed_and_nothing_decided():
    s = step(Call(None))
    assert s.ok is None and s.data == {}
    assert [ln.split(":")[0] for ln in s.lines] == ["rule 'bot-tools'", "rule 'srv-only'"]


def test_a_sub_agent_is_held_to_its_parents_rules_when_configured():
    assert step(Call("tools/call", "read"), parent=PARENT).ok is True
    s = step(Call("tools/call", "read"), parent=PARENT, subagents="restrict_to_parent")
    assert s.ok is False and s.data["rule"] is None
    assert s.data["reason"].startswith(f"sub-agent of {PARENT}, which may not: ")
    assert step(Call("tools/call", "list"), parent=PARENT, subagents="restrict_to_parent").ok


@pytest.mark.parametrize(
    ("args", "allowed"),
    [({"path": "/srv/a"}, True), ({"path": "/etc/passwd"}, False), (None, False)],
)
def test_a_condition_is_asked_with_the_calls_arguments(args, allowed):
    s = step(Call("tools/call", "write", args))
    assert s.ok is allowed and s.data["rule"] == "srv-only"
    hint = "asked without arguments: give --args for rules with a `when` condition"
    assert (hint in s.lines) is (args is None)


def test_modes_without_policy_and_no_policy_file():
    passthrough = ServerSection(name="files", url="http://127.0.0.1:9/mcp", mode="passthrough")
    assert step(Call("tools/call", "x"), server=passthrough).summary == (
        "not asked: passthrough mode forwards without MCP policy"
    )
    s = policy_step(agent(), proxy(None), FILES, BOT, None, Call("tools/call", "x"))
    assert s.ok is True and s.summary == "no policy file (policy.file): every call is allowed"
    assert policy_step(agent(), proxy(), FILES, None, None, Call("x")).summary == (
        "not asked: no identity"
    )
