"""credless's own answers (agent/inject/answers.py): a JSON-RPC error that keeps the request's
ids for a JSON-RPC request, the plain `{"error": ...}` body for anything else; a code per
cause, the human message and the audit event's id; never a credential."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from agent.inject import answers, bodies, decide, http1
from agent.inject.bodies import Replay
from agent.inject.record import AuditBase
from agent.policy import jsonrpc

REPO = Path(__file__).resolve().parents[2]
MESSAGE = "credless: this process has no identity"


def rpc_body(body: bytes, **kw) -> dict | list:
    kw = {"outcome": "unattested", "event_id": "0123456789abcdef", **kw}
    return json.loads(answers.body(answers.by_body(body), 403, MESSAGE, **kw))


def test_a_single_request_keeps_its_id_and_shows_the_message_and_event_id():
    got = rpc_body(b'{"jsonrpc": "2.0", "id": "abc", "method": "tools/list"}')
    assert got == {
        "jsonrpc": "2.0",
        "id": "abc",
        "error": {
            "code": answers.NO_IDENTITY,
            "message": f"{MESSAGE} (audit event 0123456789abcdef)",
            "data": {"status": 403, "cause": "unattested", "event_id": "0123456789abcdef"},
        },
    }


def test_a_batch_keeps_every_request_id_and_answers_no_notification():
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "x"}},
        {"jsonrpc": "2.0", "id": 9, "result": {}},  # a response to the server: not a call
    ]
    got = rpc_body(json.dumps(batch).encode())
    assert isinstance(got, list) and [e["id"] for e in got] == [1, 7]
    assert all(e["error"]["code"] == answers.NO_IDENTITY for e in got)


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc": "2.0", "method": "notifications/initialized"}',
        b'[{"jsonrpc": "2.0", "method": "notifications/initialized"}]',
    ],
    ids=["notification", "batch-of-notifications"],
)
def test_notifications_only_get_one_error_with_id_null(body):
    # JSON-RPC answers notifications with nothing, and never with an empty array; an HTTP
    # refusal still needs a body that says why
    got = rpc_body(body)
    assert isinstance(got, dict) and got["id"] is None
    assert got["error"]["message"].startswith(MESSAGE)


def test_a_json_post_whose_body_was_not_read_gets_id_null():
    asked = answers.by_head(b"POST", b"application/json; charset=utf-8")
    assert asked == answers.UNREAD_RPC
    got = json.loads(
        answers.body(asked, 421, "credless: wrong Host", outcome="host_refused", event_id="e1")
    )
    assert got["id"] is None and got["error"]["code"] == answers.NOT_FOR_THIS_SERVER
    assert answers.by_body(None) == answers.UNREAD_RPC  # over the limit: not read whole


@pytest.mark.parametrize(
    "method,content_type",
    [(b"GET", b"application/json"), (b"DELETE", None), (b"POST", b"text/plain"), (b"POST", None)],
)
def test_anything_but_a_json_post_gets_the_plain_body(method, content_type):
    asked = answers.by_head(method, content_type)
    assert asked == answers.PLAIN
    got = json.loads(answers.body(asked, 403, MESSAGE, outcome="unattested", event_id="e2"))
    assert got == {"error": MESSAGE, "event_id": "e2"}


@pytest.mark.parametrize("body", [b'{"n": 1}', b"{", b"[]", b'{"jsonrpc": "2.0"}'])
def test_a_body_that_is_not_json_rpc_gets_the_plain_body(body):
    assert answers.by_body(body) == answers.PLAIN
    assert "error" in rpc_body(body) and isinstance(rpc_body(body)["error"], str)


def test_the_plain_body_keeps_its_members_and_adds_the_event_id():
    got = json.loads(
        answers.body(
            answers.PLAIN,
            502,
            "credless: could not obtain a token from the authorization server",
            outcome="token_error",
            event_id="e3",
            kind="invalid_client",
            detail="the AS refused the client (server said invalid_client)",
        )
    )
    assert got == {
        "error": "credless: could not obtain a token from the authorization server",
        "kind": "invalid_client",
        "detail": "the AS refused the client (server said invalid_client)",
        "event_id": "e3",
    }


def test_the_shown_message_ends_with_what_the_failing_party_said():
    got = rpc_body(
        b'{"jsonrpc": "2.0", "id": 3, "method": "tools/list"}',
        outcome="token_error",
        kind="invalid_client",
        detail="token endpoint refused (server said invalid_client)",
    )
    assert got["error"]["code"] == answers.TOKEN_FAILED
    assert got["error"]["message"] == (
        f"{MESSAGE}: token endpoint refused (server said invalid_client) "
        "(audit event 0123456789abcdef)"
    )
    assert got["error"]["data"]["kind"] == "invalid_client"


def test_never_a_credential_in_an_answer():
    jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmUifQ.c2lnbmF0dXJl"
    for asked in (answers.PLAIN, answers.UNREAD_RPC):
        text = answers.body(
            asked,
            502,
            f"credless: the server said {jwt}",
            outcome="token_error",
            event_id="e4",
            detail=f"assertion {jwt} refused",
            access_token="opaque-secret-value",  # a member named as a credential
        ).decode()
        assert "eyJ" not in text and "opaque-secret-value" not in text
        assert "[redacted]" in text


def test_a_credential_nested_in_an_answers_members_is_scrubbed_and_the_answer_stays_json():
    """Scrubbed as the audit is, as serialized text (logging.scrub_json): wherever the
    value sits in the members, a nested object's or a list's too, with PEM keys cut at
    their string's end."""
    jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmUifQ.c2lnbmF0dXJl"
    key = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEI...\n"  # cut short, no END line
    for asked in (answers.PLAIN, answers.UNREAD_RPC):
        text = answers.body(
            asked,
            502,
            "credless: refused",
            outcome="token_error",
            event_id="e5",
            server={"said": [f"bad {jwt}", {"key": key}]},
        ).decode()
        assert json.loads(text)  # still one JSON document
        assert "eyJ" not in text and "MHcCAQEEI" not in text, text
        assert text.count("[redacted]") == 2


def test_a_verdicts_own_code_wins_over_the_causes():
    got = rpc_body(
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}}',
        outcome="policy_denied",
        rpc_code=jsonrpc.POLICY_DENIED,
    )
    assert got["error"]["code"] == jsonrpc.POLICY_DENIED


def test_every_refusal_decide_can_give_has_a_code_and_a_documented_row():
    """Each outcome a Verdict refuses with (decide.py) is mapped, and docs/errors.md lists
    every code and every cause."""
    src = (REPO / "agent/inject/decide.py").read_text()
    outcomes = set(re.findall(r'"(\w+_(?:refused|denied|credentials)|unattested)"', src))
    assert outcomes and outcomes <= set(answers.CODES)
    doc = (REPO / "docs/errors.md").read_text()
    for outcome, code in answers.CODES.items():
        assert f"`{outcome}`" in doc and str(code) in doc, outcome
    assert set(answers.UNREADABLE) <= set(answers.CODES)


def test_event_ids_are_distinct():
    assert len({answers.new_event_id() for _ in range(1000)}) == 1000


def test_the_verdicts_of_decide_are_answered_with_their_codes():
    verdict = decide.Verdict(
        decide.ANSWER, status=415, outcome="encoding_refused", rpc_code=jsonrpc.INVALID_REQUEST
    )
    assert answers.code_for(verdict.outcome, verdict.rpc_code) == jsonrpc.INVALID_REQUEST
    assert answers.code_for("unattested") == answers.NO_IDENTITY
    assert answers.code_for("something_new") == answers.FALLBACK_CODE


# ------------------------------------------------ the body read to learn ids, or dropped
def _head(method: bytes, content_type: bytes | None) -> http1.Head:
    headers = [(b"Content-Type", content_type)] if content_type else []
    return http1.Head(method=method, target=b"/mcp", headers=headers)


class _Source(Replay):
    """A body's events, counting what was taken (to tell read or drained from untouched)."""

    def __init__(self, body: bytes):
        super().__init__(body)
        self.taken = 0

    async def next(self):
        self.taken += 1
        return await super().next()


@pytest.mark.parametrize(
    "readable,drain,taken",
    [(True, False, 2), (False, True, 2), (False, False, 0)],
    ids=["read", "drained", "untouched"],
)
def test_a_refused_json_posts_body_is_read_only_when_readable(readable, drain, taken):
    src = _Source(b'{"jsonrpc": "2.0", "id": 9, "method": "tools/list"}')
    head = _head(b"POST", b"application/json")
    asked = asyncio.run(bodies.asked_of(src, head, 1 << 20, readable=readable, drain=drain))
    assert src.taken == taken
    assert asked == (
        answers.Asked(True, (jsonrpc.Call("tools/list", None, 9, True),), False)
        if readable
        else answers.UNREAD_RPC
    )


def test_a_body_over_the_limit_is_dropped_and_answered_with_id_null():
    src = _Source(b'{"jsonrpc": "2.0", "id": 9, "method": "tools/list"}')
    asked = asyncio.run(
        bodies.asked_of(src, _head(b"POST", b"application/json"), 8, readable=True, drain=True)
    )
    assert asked == answers.UNREAD_RPC and src.taken == 2  # read to its end, then dropped


def test_a_body_that_is_not_json_is_never_read_for_ids():
    src = _Source(b"a=b")
    head = _head(b"POST", b"application/x-www-form-urlencoded")
    asked = asyncio.run(bodies.asked_of(src, head, 1 << 20, readable=True, drain=False))
    assert asked == answers.PLAIN and src.taken == 0


def test_what_a_request_asked_is_worked_out_from_its_head_only_when_answered():
    head = _head(b"POST", b"application/json")
    assert answers.of(head) == answers.UNREAD_RPC
    req = decide.Request(b"GET", b"/mcp", {b"content-type": [b"application/json"]})
    assert answers.of(req) == answers.PLAIN
    assert answers.of(answers.PLAIN) is answers.PLAIN
    assert AuditBase({}, "").asked is answers.PLAIN  # the default: the plain body
