"""The proxy's one decision (agent/inject/decide.py) at the edges `make mutate` found
unpinned: a workload's own credential still refused in reject mode when phantom
placeholders are on, the status lines and messages of the placeholder refusals, an
assertion-mode registration candidate not held to the token endpoint's path, the
caller's selectors in a GET's policy decision, a refusal saying "connection closed"
exactly when it closes it, the documented unattested message, and how a denial names
each call of a body."""

from __future__ import annotations

import dataclasses
import json
import re
from http import HTTPStatus

import pytest
from prometheus_client import CollectorRegistry

from agent.config import PolicySection
from agent.inject import decide
from agent.inject.phantom import Binding
from agent.policy.engine import PolicyEngine
from agent.policy.rules import parse
from tests.conftest import REPO
from tests.unit.test_decide import BOT, CALLERS, SERVERS, STRANGER, parsed, policy_engine
from tests.unit.test_decide_checks import ANSWERED, SETTINGS, decided, table_verdict


def request(head: str) -> decide.Request:
    return decide.Request.from_head(parsed(head.replace("\n", "\r\n").encode() + b"\r\n\r\n"))


class Placeholders:
    """The placeholder check (agent/inject/ports.py Placeholders) answering as told: a
    binding, None (not a placeholder) or a ValueError (one that does not verify)."""

    def __init__(self, found: Binding | None = None, invalid: str = ""):
        self.found, self.invalid = found, invalid

    def binding(self, authorization: bytes) -> Binding | None:
        if self.invalid:
            raise ValueError(self.invalid)
        return self.found


def with_placeholders(phantom: Placeholders, caller: decide.Caller, mode: str = "broker", **kw):
    up = dataclasses.replace(SERVERS["broker"], mode=mode)
    head = "POST /mcp HTTP/1.1\nHost: 127.0.0.1:8080\nAuthorization: Bearer its-own"
    return decide.decide(
        request(head), up, caller, dataclasses.replace(SETTINGS, **kw), None, phantom
    )


@pytest.mark.parametrize("mode", ["broker", "phantom"])
def test_reject_mode_refuses_a_workloads_own_credential_while_placeholders_are_on(mode):
    # a credential that is not a placeholder is the workload's own, phantom mode or not
    verdict = with_placeholders(
        Placeholders(None), CALLERS["attested"], mode, workload_authorization="reject"
    )
    assert (verdict.action, verdict.status, verdict.outcome) == (
        decide.ANSWER,
        400,
        "workload_credentials",
    )


def test_a_placeholder_that_does_not_verify_is_answered_401_with_the_cause():
    verdict = with_placeholders(Placeholders(invalid="token expired"), CALLERS["attested"])
    assert (verdict.status, verdict.outcome) == (401, "phantom_invalid")
    assert verdict.reason == HTTPStatus(verdict.status).phrase.encode()
    assert verdict.message.startswith("credless: ") and "token expired" in verdict.message


@pytest.mark.parametrize("caller", [STRANGER, None])
def test_a_misused_placeholder_is_answered_403_naming_both_parties(caller):
    issued = Binding(BOT, "tools", "jti-1", 0)
    verdict = with_placeholders(Placeholders(issued), decide.Caller(True, caller), "phantom")
    assert (verdict.status, verdict.outcome, verdict.misuse) == (403, "phantom_misuse", issued)
    assert verdict.reason == HTTPStatus(verdict.status).phrase.encode()
    assert BOT in verdict.message and "None" not in verdict.message
    # the holder is named: its SPIFFE ID, or that it has none
    holder = caller or "a process without identity"
    assert f"it came from {holder} to 'tools'" in verdict.message


def test_an_assertion_mode_registration_is_read_whatever_its_path():
    # the registration endpoint is known only from the AS metadata: any JSON POST but one to
    # the token endpoint is a candidate, its body read, not refused as off the token's path
    verdict = decided(
        "POST /register HTTP/1.1\nHost: 127.0.0.1:8080\nContent-Type: application/json\n"
        "Content-Length: 2",
        "assertion",
    )
    assert (verdict.action, verdict.credential, verdict.read_body) == (decide.FORWARD, True, True)


def test_a_path_refusal_names_the_path_before_the_first_question_mark():
    verdict = decided("GET /other?a=1?b=2 HTTP/1.1\nHost: 127.0.0.1:8080")
    assert verdict.outcome == "path_refused"
    assert "'/other' is not under the MCP endpoint" in verdict.message


def test_a_gets_policy_decision_reads_the_callers_selectors():
    # a deny rule conditioned on the caller's attested selectors refuses its event stream
    engine = PolicyEngine(PolicySection(), {"tools"}, registry=CollectorRegistry())
    engine.policy = parse(
        {
            "default_unlisted": "deny",
            "rule": [
                {
                    "id": "no-root-streams",
                    "spiffe_id": BOT,
                    "server": "tools",
                    "methods": ["http:GET"],
                    "when": '"unix:uid:0" in selectors',
                    "effect": "deny",
                },
                {"id": "bot", "spiffe_id": BOT, "server": "tools", "methods": ["tools/list"]},
            ],
        }
    )
    req = request("GET /mcp HTTP/1.1\nHost: 127.0.0.1:8080")
    for selectors, allowed in ((["unix:uid:1000"], True), (["unix:uid:0"], False)):
        caller = decide.Caller(True, BOT, selectors=frozenset(selectors))
        verdict = decide.decide(req, SERVERS["broker"], caller, SETTINGS, engine)
        assert verdict.credential is allowed, selectors
        assert verdict.outcome == ("" if allowed else "policy_denied")


@pytest.mark.parametrize("row", ANSWERED, ids=[r["name"] for r in ANSWERED])
def test_a_refusal_says_the_connection_is_closed_exactly_when_it_is(row):
    verdict = table_verdict(row)
    assert verdict.message.endswith("; connection closed") is verdict.close


def test_the_unattested_refusal_is_the_one_docs_errors_md_shows():
    shown = re.search(
        r'"message": "(credless: [^"]*?) \(audit event [0-9a-f]+\)"',
        (REPO / "docs/errors.md").read_text(),
    )
    assert shown is not None
    verdict = decided("GET /mcp HTTP/1.1\nHost: 127.0.0.1:8080", caller="unattested")
    assert verdict.outcome == "unattested" and verdict.message == shown.group(1)


def rpc(id_: int, method: str, name: str | None = None) -> dict:
    call: dict = {"jsonrpc": "2.0", "id": id_, "method": method}
    if name is not None:
        call["params"] = {"name": name, "arguments": {}}
    return call


def test_a_denial_names_each_denied_call_in_turn():
    body = json.dumps([rpc(1, "tools/list"), rpc(2, "tools/call", "echo")]).encode()
    req = request("POST /mcp HTTP/1.1\nHost: 127.0.0.1:8080\nContent-Length: 2")
    verdict, records, _, _ = decide.decide_body(
        body, req, SERVERS["broker"], CALLERS["stranger"], policy_engine()
    )
    assert verdict.outcome == "policy_denied"
    reasons = [r.fields["reason"] for r in records]
    # a call without a name is named by its method alone
    assert verdict.message == (
        f"credless: denied by policy: tools/list: {reasons[0]}; tools/call echo: {reasons[1]}"
    )


def test_policy_is_never_asked_about_a_caller_without_identity():
    # decide() answers an unattested caller's credentialed request itself (403, or forwarded
    # bare): a body reaching decide_body for one is a programming error, and says so
    req = request("POST /mcp HTTP/1.1\nHost: 127.0.0.1:8080\nContent-Length: 2")
    body = json.dumps(rpc(1, "tools/list")).encode()
    with pytest.raises(RuntimeError, match="unattested caller"):
        decide.decide_body(body, req, SERVERS["broker"], CALLERS["unattested"], policy_engine())
