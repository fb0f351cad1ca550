"""What a workload sees of the proxy's refusals (agent/inject/decide.py): the status, the
JSON-RPC error code, and the message naming the offending value, quoted and cut to a bound
(never the query string, never an unbounded echo of what the workload sent). Sans-IO."""

from __future__ import annotations

from agent.config import InjectSection
from agent.inject import decide
from agent.inject.upstreams import Upstream
from agent.policy import jsonrpc
from tests.unit.test_decide import SERVERS, parsed

SETTINGS = InjectSection(unattested="deny", workload_authorization="strip")
CALLER = decide.Caller(True, "spiffe://example.org/bot")
FORM = b"application/x-www-form-urlencoded"


def server(mode: str) -> Upstream:
    return SERVERS[mode]


def verdict(mode: str, target: bytes, *lines: bytes, host: bytes = b"127.0.0.1:8080"):
    data = (
        b"POST " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
        + b"".join(ln + b"\r\n" for ln in lines)
        + b"Content-Length: 0\r\n\r\n"
    )  # fmt: skip
    req = decide.Request.from_head(parsed(data))
    return decide.decide(req, server(mode), CALLER, SETTINGS, None)


def assert_refused(v, status: int, outcome: str) -> None:
    assert v.action == decide.ANSWER
    assert (v.status, v.outcome) == (status, outcome)
    assert v.message.startswith("credless: ")


def test_an_encoded_token_request_is_a_jsonrpc_invalid_request_naming_the_coding():
    coding = b"x" * 100 + b"Q" * 50
    v = verdict("assertion", b"/token", b"Content-Type: " + FORM, b"Content-Encoding: " + coding)
    assert_refused(v, 415, "encoding_refused")
    assert v.rpc_code == jsonrpc.INVALID_REQUEST
    assert repr("x" * 100) in v.message  # the coding, cut to its first 100 bytes
    assert "Q" not in v.message


def test_a_token_request_in_another_charset_is_a_jsonrpc_invalid_request_naming_it():
    declared = FORM + b"; charset=" + b"l" * 250
    v = verdict("assertion", b"/token", b"Content-Type: " + declared)
    assert_refused(v, 415, "encoding_refused")
    assert v.rpc_code == jsonrpc.INVALID_REQUEST
    assert repr(declared[:200].decode()) in v.message  # cut to its first 200 bytes


def test_a_connection_field_naming_a_field_is_refused_naming_it_cut_to_100_bytes():
    v = verdict("assertion", b"/token", b"Content-Type: " + FORM, b"Connection: " + b"n" * 150)
    assert_refused(v, 400, "framing_refused")
    assert v.close
    assert repr("n" * 100) in v.message


def test_a_misdirected_host_is_named_cut_to_200_bytes():
    v = verdict("broker", b"/mcp", host=b"h" * 250)
    assert_refused(v, 421, "host_refused")
    assert repr("h" * 200) in v.message


def test_a_target_that_is_not_a_path_is_named_cut_to_200_bytes():
    target = b"http://127.0.0.1:8080/" + b"a" * 250
    v = verdict("broker", target)
    assert_refused(v, 400, "target_refused")
    assert repr(target[:200].decode()) in v.message


def test_a_path_outside_the_endpoint_is_named_without_its_query():
    path = b"/other/" + b"p" * 250
    v = verdict("broker", path + b"?secret=1?more=2")
    assert_refused(v, 403, "path_refused")
    assert repr(path[:200].decode()) in v.message
    assert "secret" not in v.message


def test_a_token_post_to_a_path_that_is_not_plain_is_named_without_its_query():
    path = b"/%74oken"
    v = verdict("assertion", path + b"?secret=1?more=2", b"Content-Type: " + FORM)
    assert_refused(v, 400, "target_refused")
    assert repr(path.decode()) in v.message
    assert "secret" not in v.message and "?" not in v.message.split("'")[1]


def test_a_long_target_that_is_not_plain_is_named_cut_to_200_bytes():
    path = b"/%74oken/" + b"p" * 250
    v = verdict("assertion", path, b"Content-Type: " + FORM)
    assert_refused(v, 400, "target_refused")
    assert repr(path[:200].decode()) in v.message


def test_a_field_named_like_a_decided_one_with_underscores_is_refused_naming_both():
    # Mcp_Name is Mcp-Name to a CGI or WSGI server: the refusal names the field as read
    # (lower case) and the field it is there
    v = verdict("broker", b"/mcp", b"Mcp_Name: secret_tool")
    assert_refused(v, 400, "framing_refused")
    assert v.close
    assert repr("mcp_name") in v.message and repr("mcp-name") in v.message


def test_a_long_alias_is_named_cut_to_100_bytes():
    name = "x_forwarded_" + "f" * 150  # X-Forwarded-fff... to a CGI server: a vouched field
    v = verdict("broker", b"/mcp", name.encode() + b": 203.0.113.9")
    assert_refused(v, 400, "framing_refused")
    assert repr(name[:100]) in v.message


def test_a_long_alias_names_the_field_it_is_cut_to_100_bytes_too():
    # a name of up to the head's 64 KiB limit: neither quote of it may echo it unbounded
    name = "x_forwarded_" + "f" * 150
    v = verdict("broker", b"/mcp", name.encode() + b": 203.0.113.9")
    assert_refused(v, 400, "framing_refused")
    assert "f" * 101 not in v.message
    assert repr("x-forwarded-" + "f" * 88) in v.message  # the field it is, cut at 100
