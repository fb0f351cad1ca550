"""A body the policy decides is read as the server reads it, and every call in it decided.

The policy reads a JSON-RPC body as UTF-8. A server decodes the charset the request's
Content-Type names: the official TypeScript MCP SDK's server (express.json(), body-parser)
decodes any utf-* through iconv-lite, UTF-7 included, where `+AG4-` is `n`. So the body
below is `tools/call echo` to a UTF-8 reader and, to the server, has a second member `name`
= "secret_tool", which JSON.parse keeps: run against that server, it ran secret_tool. Such a
body is refused (415) before it is read; the policy decodes UTF-8 strictly, never guessing.
"""

from __future__ import annotations

import dataclasses

import pytest

from agent.config import InjectSection
from agent.inject import decide
from agent.inject.phantom import Binding
from agent.policy import jsonrpc
from tests.unit.test_decide import CALLERS, SERVERS, parsed, policy_engine

SETTINGS = InjectSection(unattested="deny", workload_authorization="strip")
# what a workload writes; a server decoding UTF-7 reads params.name == "secret_tool"
SMUGGLED = (
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
    b'"params":{"name":"echo","+AG4-ame":"secret_tool","arguments":{}}}'
)
DIRECT = (
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"secret_tool","arguments":{}}}'
)
ECHO = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}'


def request(raw: bytes) -> decide.Request:
    return decide.Request.from_head(parsed(raw))


def decided(content_type: bytes, body: bytes) -> decide.Verdict:
    """The full path's decisions on a POST under policy: its head, then its body."""
    req = request(
        b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: %s\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (content_type, len(body), body)
    )
    up, caller, policy = SERVERS["broker"], CALLERS["attested"], policy_engine()
    verdict = decide.decide(req, up, caller, SETTINGS, policy)
    if verdict.action != decide.FORWARD or not verdict.read_body:
        return verdict
    return decide.decide_body(body, req, up, caller, policy)[0]


def test_the_calls_spelt_directly_are_decided_as_written():
    assert decided(b"application/json", DIRECT).outcome == "policy_denied"
    assert decided(b"application/json; charset=utf-8", ECHO).action == decide.FORWARD


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/json; charset=utf-7",
        b"application/json;charset=UTF-7",
        b'application/json; charset="utf-7"',
        b"application/json; charset=utf-8; charset=utf-7",
    ],
)
def test_a_body_in_a_charset_the_policy_does_not_read_is_refused(content_type):
    verdict = decided(content_type, SMUGGLED)
    assert (verdict.status, verdict.outcome) == (415, "encoding_refused"), verdict
    assert content_type.decode() in verdict.message  # the answer says what was refused


@pytest.mark.parametrize(
    "body",
    [
        DIRECT.decode().encode("utf-16"),  # with a BOM: json.loads would have read it
        DIRECT.decode().encode("utf-16-le"),
        DIRECT.decode().encode("utf-32"),
        b"\xef\xbb\xbf" + DIRECT,  # a UTF-8 BOM is no JSON text either (RFC 8259 8.1)
        ECHO.replace(b"echo", b"ech\xff"),  # not UTF-8 at all
    ],
    ids=["utf-16", "utf-16-le", "utf-32", "utf-8-bom", "invalid-utf-8"],
)
def test_a_body_that_is_not_utf_8_is_a_parse_error_not_a_guess(body):
    with pytest.raises(jsonrpc.Malformed) as e:
        jsonrpc.parse_calls(body)
    assert e.value.code == jsonrpc.PARSE_ERROR


def test_utf_8_beyond_ascii_is_read():
    body = ECHO.replace(b'"arguments":{}', '"arguments":{"text":"h\u00e9"}'.encode())
    [call], batch = jsonrpc.parse_calls(body)
    assert (call.name, call.arguments, batch) == ("echo", {"text": "h\u00e9"}, False)


def test_a_notification_named_like_a_response_is_decided_by_policy():
    # the stranger has no rule on the server (default deny): each of its calls is refused,
    # and a notification may be named anything, "(response)" included
    req = decide.Request(b"POST", b"/mcp", {b"host": [b"127.0.0.1:8080"]})
    for body in (
        b'{"jsonrpc":"2.0","method":"notifications/initialized"}',
        b'{"jsonrpc":"2.0","method":"(response)"}',
    ):
        verdict, records, *_ = decide.decide_body(
            body, req, SERVERS["broker"], CALLERS["stranger"], policy_engine()
        )
        assert verdict.outcome == "policy_denied", body
        assert [r.event for r in records] == ["call.denied"], body


def test_a_response_to_the_servers_request_is_no_call():
    req = decide.Request(b"POST", b"/mcp", {b"host": [b"127.0.0.1:8080"]})
    verdict, records, *_ = decide.decide_body(
        b'{"jsonrpc":"2.0","id":7,"result":{}}',
        req,
        SERVERS["broker"],
        CALLERS["stranger"],
        policy_engine(),
    )
    assert (verdict.action, records) == (decide.FORWARD, [])


class Placeholders:
    """The phantom check: one value is a placeholder issued to another identity."""

    def __init__(self, stolen: bytes):
        self.stolen = stolen

    def binding(self, authorization: bytes) -> Binding | None:
        if authorization == self.stolen:
            return Binding("spiffe://example.org/victim", "tools", "jti-v", 2**31)
        return None


@pytest.mark.parametrize("where", ["alone", "first", "second"])
def test_a_stolen_placeholder_is_misuse_in_any_authorization_field(where):
    stolen = b"Bearer victims.placeholder.jwt"
    values = {"alone": [stolen], "first": [stolen, b"Bearer x"], "second": [b"Bearer x", stolen]}
    fields = b"".join(b"Authorization: %s\r\n" % v for v in values[where])
    req = request(
        b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n%sContent-Length: 0\r\n\r\n" % fields
    )
    up = dataclasses.replace(SERVERS["broker"], mode="phantom")
    verdict = decide.decide(req, up, CALLERS["attested"], SETTINGS, None, Placeholders(stolen))
    # refused, audited as misuse and the victim's token revoked: not only "two fields"
    assert verdict.outcome == "phantom_misuse", verdict
    assert verdict.misuse is not None and verdict.misuse.spiffe_id.endswith("/victim")
