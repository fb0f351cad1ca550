"""The proxy's one decision (agent/inject/decide.py), table-driven from
tests/testdata/inject/decisions.tsv: each head is parsed by the proxy's own parser (the full
path's facts) and, where the fast lane could take it, also read as the lane reads it; both
must get the verdict the table says. Then the body decisions (policy per JSON-RPC call)."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
from prometheus_client import CollectorRegistry

from agent.config import InjectSection, PolicySection
from agent.inject import decide, http1
from agent.inject.upstreams import Upstream, authorities
from agent.policy import jsonrpc
from agent.policy.engine import PolicyEngine
from agent.policy.rules import parse
from tests.conftest import TESTDATA

BOT, STRANGER = "spiffe://example.org/bot", "spiffe://example.org/stranger"
SERVERS = {
    mode: Upstream(
        "tools",
        "http",
        "127.0.0.1",
        8080,
        "http://127.0.0.1:8080",
        mode,
        b"/token" if mode == "assertion" else b"/mcp",
        authorities("http", "127.0.0.1:8080", 8080),
    )
    for mode in ("broker", "assertion", "passthrough")
}
CALLERS = {
    "attested": decide.Caller(True, BOT),
    "stranger": decide.Caller(True, STRANGER),
    "unattested": decide.Caller(True, None),
    "exec'd": decide.Caller(False, BOT),
    "revoked": decide.Caller(False, BOT, changed="the registration entries changed"),
}


def policy_engine() -> PolicyEngine:
    # a sub-agent is held to its own rules only (no restriction to its parent's)
    engine = PolicyEngine(
        PolicySection(subagents="inherit"), {"tools"}, registry=CollectorRegistry()
    )
    engine.policy = parse(
        {
            "default_unlisted": "deny",
            "rule": [
                {
                    "id": "bot",
                    "spiffe_id": BOT,
                    "server": "tools",
                    "methods": ["tools/list", "tools/call"],
                    "tools": ["echo", "add"],
                },
                {
                    "id": "no-secrets",
                    "spiffe_id": "spiffe://example.org/*",
                    "server": "*",
                    "methods": ["tools/call"],
                    "tools": ["secret_*"],
                    "effect": "deny",
                },
            ],
        }
    )
    return engine


def rows() -> list[dict]:
    lines = (TESTDATA / "inject/decisions.tsv").read_text().splitlines()
    return list(
        csv.DictReader(
            [ln for ln in lines if not ln.startswith("#")], delimiter="\t", quoting=csv.QUOTE_NONE
        )
    )


def parsed(head: bytes) -> http1.Head:
    events = http1.Reader().feed(head)
    return events[0][1]


def expected(spec: str) -> dict:
    if spec.startswith("forward"):
        flags = spec.split("+")[1:]
        return {
            "action": decide.FORWARD,
            **{f: f in flags for f in ("credential", "read_body", "strip")},
        }
    if spec.startswith("close"):
        return {"action": decide.CLOSE, "outcome": spec.split()[1]}
    status, outcome, *close = spec.split()
    return {
        "action": decide.ANSWER,
        "status": int(status),
        "outcome": outcome,
        "close": bool(close),
    }


ROWS = rows()


@pytest.mark.parametrize("row", ROWS, ids=[r["name"] for r in ROWS])
def test_decision(row):
    settings = InjectSection(unattested="deny", workload_authorization="strip")
    if row["settings"] != "-":
        key, value = row["settings"].split("=")
        settings = dataclasses.replace(settings, **{key: value})
    policy = policy_engine() if row["policy"] == "on" else None
    head_bytes = row["head"].replace("\\r\\n", "\r\n").encode() + b"\r\n\r\n"
    up, caller = SERVERS[row["server"]], CALLERS[row["caller"]]
    want = expected(row["expect"])

    verdict = decide.decide(
        decide.Request.from_head(parsed(head_bytes)), up, caller, settings, policy
    )
    assert {k: getattr(verdict, k) for k in want} == want
    if verdict.action == decide.ANSWER:
        assert verdict.message.startswith("credless: ") and verdict.status == want["status"]
        assert (verdict.allow == decide.ALLOW) is (verdict.status == 405)

    # the fast lane's reading of the same head, where it could take it, decides the same
    whole = http1.WholeMessage()
    request = head_bytes + (b"{}" if b"Content-Length: 2" in head_bytes else b"")
    read = (
        decide.Request.from_read(request, whole.head_end, whole.method, whole.url)
        if whole.one(request)
        else None
    )
    if read is not None:
        head = decide.Request.from_head(parsed(head_bytes))
        assert (read.fields, read.bodied) == (head.fields, head.bodied)
        assert decide.decide(read, up, caller, settings, policy) == verdict


@pytest.mark.parametrize(
    "field",
    [
        b"Forwarded: for=203.0.113.9",
        b"x-forwarded-for: 203.0.113.9",
        b"X-Forwarded-Client-Cert: URI=spiffe://example.org/admin",
        b"X-Real-IP: 203.0.113.9",
        b"True-Client-IP: 203.0.113.9",
        b"X-Original-URL: /admin",
        b"X-Rewrite-URL: /admin",
        b"X-HTTP-Method-Override: DELETE",
        b"X-SSL-Client-Verify: SUCCESS",
        b"SSL-Client-Cert: -",
        b"X-Client-Cert: -",
    ],
)
def test_a_field_a_proxy_vouches_for_is_removed_whichever_executor_reads_it(field):
    """The lane relays a head as read, so it must leave such a request to the full path,
    which names the field for removal (Request.vouched) and strips it."""
    data = b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n" + field + b"\r\n\r\n"
    whole = http1.WholeMessage()
    assert whole.one(data)
    assert decide.Request.from_read(data, whole.head_end, whole.method, whole.url) is None
    req = decide.Request.from_head(parsed(data))
    assert req.vouched == (field.split(b":")[0].lower(),)
    verdict = decide.decide(
        req, SERVERS["broker"], CALLERS["attested"], InjectSection(unattested="deny"), None
    )
    assert (verdict.action, verdict.strip) == (decide.FORWARD, True)


def test_fields_only_named_like_vouched_ones_stay():
    data = (
        b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-Forwarded: a\r\nForwarded-For: b\r\n\r\n"
    )
    whole = http1.WholeMessage()
    assert whole.one(data)
    read = decide.Request.from_read(data, whole.head_end, whole.method, whole.url)
    assert read is not None and read.vouched == ()
    assert decide.Request.from_head(parsed(data)).vouched == ()


def test_every_refusal_outcome_is_a_distinct_metric_label():
    outcomes = {expected(r["expect"]).get("outcome") for r in ROWS} - {None}
    assert outcomes >= {
        "method_refused",
        "upgrade_refused",
        "body_refused",
        "target_refused",
        "framing_refused",
        "host_refused",
        "path_refused",
        "unattested",
        "policy_denied",
        "workload_credentials",
        "encoding_refused",
        "image_changed",
        "identity_changed",
    }


def call(name: str, id_: int = 1) -> dict:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": name, "arguments": {}},
    }


BODIES = {
    "an allowed call": (json.dumps(call("echo")), {}, "forward", None),
    "a denied tool": (
        json.dumps(call("secret_tool")),
        {},
        "403 policy_denied",
        jsonrpc.POLICY_DENIED,
    ),
    "a tool no rule allows": (
        json.dumps(call("drop_tables")),
        {},
        "403 policy_denied",
        jsonrpc.POLICY_DENIED,
    ),
    "a denied call hidden in a batch": (
        json.dumps([call("echo"), call("secret_tool", 2)]),
        {},
        "403 policy_denied",
        jsonrpc.POLICY_DENIED,
    ),
    "a header naming another tool than the body": (
        json.dumps(call("echo")),
        {b"mcp-method": [b"tools/call"], b"mcp-name": [b"secret_tool"]},
        "400 header_mismatch",
        jsonrpc.HEADER_MISMATCH,
    ),
    "duplicate member names": (
        '{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        '"params":{"name":"echo","name":"secret_tool","arguments":{}}}',
        {},
        "400 malformed_body",
        jsonrpc.INVALID_REQUEST,
    ),
    "not JSON": ("{", {}, "400 malformed_body", jsonrpc.PARSE_ERROR),
}


@pytest.mark.parametrize("body,fields,want,code", BODIES.values(), ids=BODIES.keys())
def test_body_decision(body, fields, want, code):
    req = decide.Request(b"POST", b"/mcp", {b"host": [b"127.0.0.1:8080"], **fields})
    verdict, records, calls, batch = decide.decide_body(
        body.encode(), req, SERVERS["broker"], CALLERS["attested"], policy_engine()
    )
    if want == "forward":
        assert verdict.action == decide.FORWARD and verdict.credential
        assert [r.event for r in records] == ["call.allowed"]
        return
    status, outcome = want.split()
    assert (verdict.action, verdict.status, verdict.outcome, verdict.rpc_code) == (
        decide.ANSWER,
        int(status),
        outcome,
        code,
    )
    assert records and all(r.event in ("call.allowed", "call.denied") for r in records)
    if calls:  # the error keeps each request's id
        ids = [
            e["id"]
            for e in (lambda d: d if isinstance(d, list) else [d])(
                json.loads(jsonrpc.error_body(calls, batch, code, verdict.message))
            )
        ]
        assert ids == [c.id for c in calls]
