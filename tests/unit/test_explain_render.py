"""How `credless explain` reads for a person: the outcome, then each step in order, marked,
with its reasons under it; and its exit status."""

from __future__ import annotations

from agent.explain import outcome
from agent.explain.render import Step, failed, render

SID = "spiffe://example.org/bot"


def answer(*steps: Step, **asked) -> dict:
    return {
        "pid": 42,
        "url": "http://127.0.0.1:8080/mcp",
        "method": None,
        "tool": None,
        **asked,
        "outcome": outcome(list(steps)),
        "steps": [s.to_dict() for s in steps],
    }


def test_an_injected_request_reads_step_by_step():
    a = answer(
        Step("process", True, "pid 42 runs /usr/bin/python3", ["uid 1000 gid 1000 (effective)"]),
        Step("selectors", None, "2 selectors", ["unix:uid:1000", "cgroup:path:/bots"]),
        Step("entries", True, "1 of 1 entries match", ["✓ bot: all 1 selectors match"]),
        Step("identity", True, SID, ["from entry 'bot'"]),
        Step("intercept", True, "intercepted: the proxy serves it as 'echo'"),
        Step("policy", True, "tools/call echo: allowed: allowed by rule 'r'"),
        Step("token", True, "cached", ["Bearer from https://as.example, expires in 250 s"]),
        Step("audit", None, "no recent audit event for " + SID),
        method="tools/call",
        tool="echo",
    )
    assert render(a).splitlines() == [
        "pid 42 → http://127.0.0.1:8080/mcp  tools/call echo",
        "outcome: would be sent with credless's credential",
        "",
        "ok  process    pid 42 runs /usr/bin/python3",
        "               uid 1000 gid 1000 (effective)",
        "--  selectors  2 selectors",
        "               unix:uid:1000",
        "               cgroup:path:/bots",
        "ok  entries    1 of 1 entries match",
        "               ✓ bot: all 1 selectors match",
        "ok  SPIFFE ID  " + SID,
        "               from entry 'bot'",
        "ok  intercept  intercepted: the proxy serves it as 'echo'",
        "ok  policy     tools/call echo: allowed: allowed by rule 'r'",
        "ok  token      cached",
        "               Bearer from https://as.example, expires in 250 s",
        "--  audit      no recent audit event for " + SID,
    ]
    assert not failed(a)


def test_a_connect_not_intercepted_is_the_outcome_whatever_else_fails():
    a = answer(
        Step("process", True, "pid 42 runs /bin/sh"),
        Step("identity", False, "none: no registration entry matches this process"),
        Step("intercept", False, "not intercepted: the process's cgroup is not managed"),
        Step("policy", None, "not asked: no identity"),
    )
    assert a["outcome"] == "intercept: not intercepted: the process's cgroup is not managed"
    text = render(a).splitlines()
    assert text[1] == "outcome: " + a["outcome"]
    assert "NO  SPIFFE ID  none: no registration entry matches this process" in text
    assert "--  policy     not asked: no identity" in text
    assert failed(a)


def test_else_the_first_step_that_stops_the_request_is_the_outcome():
    a = answer(
        Step("process", True, "pid 42 runs /bin/sh"),
        Step("identity", False, "none: no registration entry matches this process"),
        Step("intercept", True, "intercepted: the proxy serves it as 'echo'"),
        Step("policy", False, "tools/call rm: denied (403): denied by rule 'r'"),
    )
    assert a["outcome"] == "identity: none: no registration entry matches this process"
    assert failed(a)


def test_an_error_is_one_line():
    e = {"error": "no [[servers]] entry is named 'x'; known: echo (http://127.0.0.1:1/mcp)"}
    assert render(e) == "credless: " + e["error"]
    assert failed(e)
