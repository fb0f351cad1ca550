"""Policy rules with conditions (`when`, CEL): decisions table-driven over
tests/testdata/policy/conditions.{toml,tsv}, what a condition may read and call, its bounds,
fail-closed evaluation, and the body decision's audit of argument names. Invalid conditions
and their exact messages: tests/testdata/policy/invalid_conditions.{toml,err}, run by
test_config.py."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

from agent.config import PolicySection
from agent.inject import decide
from agent.policy import conditions, jsonrpc, rules
from agent.policy.conditions import CallView, ConditionError, EvaluationError, compile_condition
from agent.policy.engine import PolicyEngine
from tests.conftest import REPO, TESTDATA
from tests.unit.test_decide import SERVERS

POLICY = rules.load(TESTDATA / "policy/conditions.toml", servers={"weather", "maps"})
ROWS = [
    ln.split("\t")
    for ln in (TESTDATA / "policy/conditions.tsv").read_text().splitlines()
    if ln and not ln.startswith("#")
]
AGENT = "spiffe://example.org/agent/a"


@pytest.mark.parametrize(
    "sid,tool,args,selectors,allowed,rule,why",
    ROWS,
    ids=[f"{r[0].rsplit('/', 1)[-1]}-{r[1]}-{r[2][:40]}-{r[3]}" for r in ROWS],
)
def test_decisions(sid, tool, args, selectors, allowed, rule, why):
    d = POLICY.decide(
        sid,
        "weather",
        "tools/call",
        tool,
        None if args == "-" else json.loads(args),
        () if selectors == "-" else selectors.split(","),
    )
    assert (d.allowed, d.rule_id) == (allowed == "true", None if rule == "-" else rule), d
    assert why in d.reason


def test_a_rule_without_a_condition_decides_as_before():
    assert POLICY.decide(AGENT, "weather", "tools/call", "delete_x").rule_id == "deleters"
    # not a tools/call: the condition's `method` test lets it through without arguments
    assert POLICY.decide(AGENT, "weather", "tools/list").rule_id == "taggers"


# ------------------------------------------------------------ what a condition reads
def view(**kw) -> CallView:
    base = dict(spiffe_id=AGENT, server="db", method="tools/call", tool="query", args={})
    return CallView(**(base | kw))


@pytest.mark.parametrize(
    "source,holds",
    [
        ('tool == "query" && method == "tools/call" && server == "db"', True),
        ('spiffe_id == "spiffe://example.org/agent/a"', True),
        ('spiffe.trust_domain == "example.org" && spiffe.path == "/agent/a"', True),
        ('spiffe.segments == ["agent", "a"]', True),
        ('"unix:uid:0" in selectors', False),
        ("size(selectors) == 0 && size(args) == 0", True),
        ("type(args) == map", True),
    ],
)
def test_a_condition_reads_the_call_and_the_caller(source, holds):
    assert compile_condition(source).holds(view()) is holds


def test_a_condition_reads_only_the_variables_it_names():
    c = compile_condition('args.sql.startsWith("SELECT")')
    assert c.reads == ("args",)
    # spiffe, selectors... are not worked out for it; a list's binder is no variable
    assert compile_condition("selectors.exists(s, s.startsWith('k8s:'))").reads == ("selectors",)


@pytest.mark.parametrize("name", sorted(conditions.FUNCTIONS))
def test_each_function_a_condition_may_call_exists_in_the_library(name):
    # the allow-list is checked at load; this pins it against the installed library
    calls = {
        "size": 'size("ab") == 2',
        "contains": '"abc".contains("b")',
        "startsWith": '"abc".startsWith("a")',
        "endsWith": '"abc".endsWith("c")',
        "matches": '"abc".matches("^a")',
        "int": 'int("2") == 2',
        "uint": "uint(2) == 2u",
        "double": "double(2) == 2.0",
        "string": 'string(2) == "2"',
        "bytes": 'bytes("a") == b"a"',
        "timestamp": 'timestamp("2026-01-02T03:04:05Z") > timestamp("2025-01-01T00:00:00Z")',
        "duration": 'duration("1s") < duration("2s")',
        "type": "type(1) == int",
        "dyn": "dyn(1) == 1",
    }
    ts = 'timestamp("2026-01-02T03:04:05Z")'
    source = calls.get(name, f"{ts}.{name}() >= 0")
    assert compile_condition(source).holds(view()) is True


# ------------------------------------------------------------ bounds and failures
def test_a_long_or_deep_or_nested_condition_is_refused_at_load():
    with pytest.raises(ConditionError, match="more than the limit of 2048"):
        compile_condition("true || " * 300 + "true")
    with pytest.raises(ConditionError, match="nested 33 deep"):
        compile_condition("(" * 33 + "true" + ")" * 33)
    assert compile_condition("(" * 32 + "true" + ")" * 32).holds(view())
    with pytest.raises(ConditionError, match=r"comprehension \(map\) inside another"):
        compile_condition("args.a.all(x, args.b.map(y, y).size() > 0)")
    with pytest.raises(ConditionError, match=r"comprehension \(all\) that reads args"):
        compile_condition("args.a.all(x, x in args.b)")
    # one after the other is linear: allowed; brackets inside a string are not nesting, the
    # caller's selectors (a handful) may be read in a body, and `args` in a string is text
    compile_condition('args.a.all(x, x > 0) && args.b.exists(y, y == "((((")')
    compile_condition('args.a.exists(x, x in selectors || x == "args")')


def test_arguments_larger_than_a_condition_may_read_are_denied():
    c = compile_condition("size(args.ids) > 0")
    big = {"ids": list(range(conditions.MAX_ARGUMENT_ITEMS))}
    with pytest.raises(EvaluationError, match="more than 2048 values"):
        c.holds(view(args=big))
    assert c.holds(view(args={"ids": list(range(conditions.MAX_ARGUMENT_ITEMS - 2))}))
    deep: dict = {}
    inner = deep
    for _ in range(conditions.MAX_ARGUMENT_DEPTH):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(EvaluationError, match="nested more than 32 deep"):
        c.holds(view(args={"ids": [1], "deep": deep}))


@pytest.mark.parametrize(
    "source,args,why",
    [
        ("args.sql == 'x'", {}, "no field 'sql' in what it reads"),
        ("args.m[args.k] == 1", {"m": {}, "k": "s3cr3t"}, "a field it reads is missing"),
        ("args.n + 1 == 2", {"n": "one"}, "another type than it expects"),
        ("args.n / 0 == 1", {"n": 1}, "division by zero"),
        ("args.n", {"n": 1}, "it yields int, not a boolean"),
        ("args.s.matches('a' + '(')", {"s": "a"}, "evaluation failed"),
        ("args.x == 1", ["not", "an", "object"], "params.arguments is not a JSON object"),
    ],
)
def test_a_condition_that_cannot_be_evaluated_says_why_without_values(source, args, why):
    with pytest.raises(EvaluationError) as e:
        compile_condition(source).holds(view(args=args))
    assert why in str(e.value) and "s3cr3t" not in str(e.value)


def test_an_evaluation_error_denies_even_where_another_rule_would_allow():
    p = rules.parse(
        {
            "rule": [
                {
                    "id": "guard",
                    "spiffe_id": AGENT,
                    "server": "db",
                    "methods": ["tools/call"],
                    "effect": "deny",
                    "when": 'args.sql.contains("DROP")',
                },
                {"id": "all", "spiffe_id": AGENT, "server": "db", "methods": ["*"]},
            ]
        }
    )
    assert p.decide(AGENT, "db", "tools/call", "q", {"sql": "SELECT 1"}).allowed
    d = p.decide(AGENT, "db", "tools/call", "q", {"query": "DROP TABLE t"})
    assert (d.allowed, d.rule_id) == (False, "guard")
    assert (
        d.reason
        == "the condition of rule 'guard' cannot be evaluated: no field 'sql' in what it reads"
    )


def test_a_sub_agent_and_its_parent_are_asked_about_the_same_arguments():
    parent, child = "spiffe://example.org/parent", "spiffe://example.org/agent/child"
    e = PolicyEngine(
        PolicySection(subagents="restrict_to_parent"), {"db"}, registry=CollectorRegistry()
    )
    e.policy = rules.parse(
        {
            "rule": [
                {"id": "child", "spiffe_id": child, "server": "db", "methods": ["*"]},
                {
                    "id": "parent",
                    "spiffe_id": parent,
                    "server": "db",
                    "methods": ["tools/call"],
                    "when": 'args.n < 10 && spiffe.path == "/parent" && "k8s:ns:a" in selectors',
                },
            ]
        }
    )
    ok = e.decide(child, "db", "tools/call", "t", parent, args={"n": 1}, selectors=["k8s:ns:a"])
    assert ok.allowed
    no = e.decide(child, "db", "tools/call", "t", parent, args={"n": 11}, selectors=["k8s:ns:a"])
    assert (no.allowed, no.rule_id) == (False, "parent")
    assert no.reason.startswith(f"sub-agent of {parent}, which may not: no rule allows")


def test_the_example_policy_conditions_load_and_decide():
    p = rules.load(REPO / "deploy/policy.example.toml", servers={"weather"})
    conditional = {r.id: r.when for r in p.rules if r.when}
    assert set(conditional) == {"safe-queries", "own-files"}
    for r in p.rules:
        if r.when:
            assert r.condition is not None and r.condition.source == r.when
    sid = "spiffe://example.org/agent/a"
    assert p.decide(sid, "weather", "tools/call", "query", {"sql": "SELECT 1"}).allowed
    assert not p.decide(sid, "weather", "tools/call", "query", {"sql": "TRUNCATE t"}).allowed
    mine, theirs = "/srv/data/agent/a/out.csv", "/srv/data/agent/b/out.csv"
    assert p.decide(sid, "weather", "tools/call", "write_file", {"path": mine}).allowed
    assert not p.decide(sid, "weather", "tools/call", "write_file", {"path": theirs}).allowed


# ------------------------------------------------------------ the body decision
def conditional_engine() -> PolicyEngine:
    e = PolicyEngine(PolicySection(), {"tools"}, registry=CollectorRegistry())
    e.policy = rules.parse(
        {
            "default_unlisted": "deny",
            "rule": [
                {
                    "id": "safe-echo",
                    "spiffe_id": AGENT,
                    "server": "tools",
                    "methods": ["tools/call"],
                    "tools": ["echo"],
                    "when": '!args.text.contains("drop") && "unix:uid:1000" in selectors',
                }
            ],
        }
    )
    return e


def echo(id_: object, text: str, **more: object) -> dict:
    args = {"text": text, **more}
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": args},
    }


def body_decision(body: object, selectors=("unix:uid:1000",)) -> tuple:
    req = decide.Request(b"POST", b"/mcp", {b"host": [b"127.0.0.1:8080"]})
    caller = decide.Caller(True, AGENT, selectors=frozenset(selectors))
    return decide.decide_body(
        json.dumps(body).encode(), req, SERVERS["broker"], caller, conditional_engine()
    )


def test_each_call_of_a_batch_is_decided_with_its_arguments_and_audited_by_their_names():
    verdict, records, calls, batch = body_decision(
        [echo(1, "hi", password="hunter2"), echo("b", "drop it")]
    )
    assert (verdict.status, verdict.rpc_code, batch) == (403, jsonrpc.POLICY_DENIED, True)
    assert [(r.event, r.fields["rpc_id"], r.fields["rule"]) for r in records] == [
        ("call.allowed", 1, "safe-echo"),
        ("call.denied", "b", "safe-echo"),
    ]
    assert [r.fields["arguments"] for r in records] == [["text", "password"], ["text"]]
    assert "hunter2" not in repr(records) + repr(calls) + verdict.message
    assert "drop it" not in repr(records) + verdict.message
    # the answer keeps both ids (jsonrpc.error_body): the calls carry them
    assert [c.id for c in calls] == [1, "b"]


def test_the_callers_selectors_reach_the_condition():
    verdict, records, _, _ = body_decision(echo(1, "hi"), selectors=("unix:uid:0",))
    assert verdict.status == 403 and records[0].fields["rule"] == "safe-echo"
    verdict, _, _, _ = body_decision(echo(1, "hi"))
    assert verdict.action == decide.FORWARD


def test_argument_names_are_bounded_in_the_audit():
    names = conditions.argument_names({f"{'n' * 100}{i:03}": i for i in range(40)})
    assert names is not None and len(names) == 32 and {len(n) for n in names} == {64}
    assert conditions.argument_names(["a"]) is None and conditions.argument_names(None) is None


def test_a_body_nested_too_deep_for_the_json_parser_is_a_parse_error():
    # json's C scanner raises RecursionError, not ValueError: refused like any bad body
    body = (
        b'{"jsonrpc":"2.0","id":1,"method":"x","params":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    )
    with pytest.raises(jsonrpc.Malformed) as e:
        jsonrpc.parse_calls(body)
    assert (e.value.code, e.value.message) == (
        jsonrpc.PARSE_ERROR,
        "parse error: the body nests too deep",
    )
