"""The answers credless gives in the server's place (agent/inject/answers.py), found by
mutation testing: +json media types, a body that did not parse, the verdict's own code
against its cause's, the status and extra members the whole response carries, a credential
in any member redacted with the logs' marker, and the form of an event id. Sans-IO."""

from __future__ import annotations

import json

import pytest

from agent.inject import answers, http1
from agent.observe import logging as obs
from agent.policy import jsonrpc

JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmUifQ.c2lnbmF0dXJl"
CALL = b'{"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "x"}}'


def parsed(raw: bytes) -> tuple[http1.Head, object]:
    """The status line's head and the JSON body of a whole response."""
    events = http1.Reader(response=True).feed(raw)
    head = next(ev[1] for ev in events if ev[0] == http1.HEAD)
    body = b"".join(ev[1] for ev in events if ev[0] == http1.BODY)
    return head, json.loads(body)


@pytest.mark.parametrize(
    "content_type",
    [b"application/vnd.api+json", b"Application/Problem+JSON; charset=utf-8"],
)
def test_a_json_post_of_a_json_suffixed_type_may_be_json_rpc(content_type):
    assert answers.is_json(content_type)
    assert answers.by_head(b"POST", content_type) == answers.UNREAD_RPC


@pytest.mark.parametrize("content_type", [b"text/vnd.x+json", b"application/json-seq"])
def test_other_types_are_not_json(content_type):
    assert not answers.is_json(content_type)
    assert answers.by_head(b"POST", content_type) == answers.PLAIN


def test_a_body_that_did_not_parse_is_answered_with_id_null():
    assert answers.by_calls(None, False) == answers.UNREAD_RPC
    got = json.loads(
        answers.body(answers.by_calls(None, False), 400, "no", outcome="x", event_id=None)
    )
    assert got["id"] is None and got["error"]["message"] == "no"


def test_the_verdicts_own_code_wins_where_it_differs_from_its_causes():
    asked = answers.by_body(CALL)
    assert answers.CODES["body_refused"] != jsonrpc.PARSE_ERROR
    got = json.loads(
        answers.body(
            asked,
            400,
            "refused",
            outcome="body_refused",
            event_id="e1",
            rpc_code=jsonrpc.PARSE_ERROR,
        )
    )
    assert got["error"]["code"] == jsonrpc.PARSE_ERROR
    raw = answers.response(
        asked,
        400,
        b"Bad Request",
        "refused",
        outcome="body_refused",
        event_id="e1",
        rpc_code=jsonrpc.PARSE_ERROR,
    )
    assert parsed(raw)[1]["error"]["code"] == jsonrpc.PARSE_ERROR


def test_the_whole_response_carries_its_status_and_extra_members_in_either_shape():
    raw = answers.response(
        answers.by_body(CALL),
        502,
        b"Bad Gateway",
        "credless: no token",
        outcome="token_error",
        event_id="e2",
        kind="invalid_client",
    )
    head, got = parsed(raw)
    assert head.status == 502
    assert got["id"] == 4 and got["error"]["code"] == answers.TOKEN_FAILED
    assert got["error"]["data"] == {
        "status": 502,
        "cause": "token_error",
        "kind": "invalid_client",
        "event_id": "e2",
    }
    raw = answers.response(
        answers.PLAIN,
        502,
        b"Bad Gateway",
        "credless: no token",
        outcome="token_error",
        event_id="e2",
        kind="invalid_client",
        headers=[(b"Retry-After", b"5")],
    )
    head, got = parsed(raw)
    assert head.status == 502 and head.get(b"retry-after") == b"5"
    assert got == {"error": "credless: no token", "kind": "invalid_client", "event_id": "e2"}


@pytest.mark.parametrize("asked", [answers.PLAIN, answers.UNREAD_RPC])
def test_a_credential_in_any_member_is_replaced_by_the_logs_marker(asked):
    got = json.loads(
        answers.body(
            asked,
            502,
            f"credless: the server said {JWT}",
            outcome="credential_refused",
            event_id=None,
            server_said=f"Bearer {JWT} was refused",  # a member not named as a credential
            attempts=2,  # a member that is not text
        )
    )
    members = got if asked is answers.PLAIN else got["error"]["data"]
    message = got["error"] if asked is answers.PLAIN else got["error"]["message"]
    assert message == f"credless: the server said {obs.REDACTED}"
    assert members["server_said"] == f"Bearer {obs.REDACTED} was refused"
    assert members["attempts"] == 2


def test_an_answers_event_id_has_the_form_of_every_other_audit_event_id():
    ids = {answers.new_event_id() for _ in range(8)}
    other = obs.new_event_id()
    assert len(ids) == 8
    assert {len(i) for i in ids} == {len(other)}
    assert all(int(i, 16) >= 0 for i in ids)
