"""What the decision reads of a request head (agent/inject/request.py): the exact bytes the
policy is shown, which body encodings and charsets it refuses, and which Connection names it
lets through. Sans-IO: heads are parsed by the proxy's own parser (agent/inject/http1.py)."""

from __future__ import annotations

import pytest

from agent.inject import http1
from agent.inject.request import Request
from tests.unit.test_decide import parsed


def head(*lines: bytes, body: bytes = b"") -> bytes:
    return (
        b"POST /mcp HTTP/1.1\r\nHost: tools\r\n"
        + b"".join(ln + b"\r\n" for ln in lines)
        + (b"Content-Length: %d\r\n\r\n" % len(body) + body)
    )


def full_path(data: bytes) -> Request:
    return Request.from_head(parsed(data))


def lane(data: bytes) -> Request | None:
    whole = http1.WholeMessage()
    assert whole.one(data)
    return Request.from_read(data, whole.head_end, whole.method, whole.url)


def typed(content_type: bytes) -> Request:
    return full_path(head(b"Content-Type: " + content_type))


def encoded(*codings: bytes) -> Request:
    return full_path(head(*(b"Content-Encoding: " + c for c in codings)))


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/json; charset=utf-8X",  # a charset that only starts like UTF-8
        b"application/json; charset=Xutf-8X",
        b"application/json; Xcharset=utf-8",  # not a charset parameter at all
        b"application/json; charsetX=utf-8",
        b'application/json; charset="utf-8X"',
    ],
)
def test_a_charset_that_is_not_exactly_utf8_is_refused_naming_the_declared_type(content_type):
    # the server decodes the charset (or parameter) the workload named, not UTF-8: the
    # policy must not read the body as UTF-8, and the refusal names what was declared
    assert typed(content_type).body_charset() == content_type


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/json",
        b"application/json; charset=utf-8",
        b"application/json;  charset = UTF-8 ",
        b'application/json; charset="utf-8"',
    ],
)
def test_utf8_declared_or_not_is_read(content_type):
    assert typed(content_type).body_charset() is None


@pytest.mark.parametrize(
    "codings",
    [
        (b"identity,identity",),
        (b"identity, identity",),
        (b"identity", b"IDENTITY"),
    ],
)
def test_identity_listed_any_number_of_times_is_no_encoding(codings):
    assert encoded(*codings).body_coding() is None


@pytest.mark.parametrize(
    ("codings", "offending"),
    [
        ((b"identity, gzip",), b"gzip"),
        ((b"identity,br",), b"br"),
        ((b"identity", b"deflate"), b"deflate"),
        ((b"identityX",), b"identityX"),  # a coding that only starts like identity
        ((b"Xidentity",), b"Xidentity"),
    ],
)
def test_any_other_coding_anywhere_in_the_list_is_refused_by_name(codings, offending):
    assert encoded(*codings).body_coding() == offending


def test_no_connection_field_names_no_field():
    assert full_path(head()).connection_names_a_field() == b""
    assert Request(b"POST", b"/mcp", {}).connection_names_a_field() == b""


def test_the_lane_does_not_read_fields_out_of_the_body():
    # a body line that looks like a field is body, not head: the lane reads the same head
    # as the full path, and does not give the request up for a "field" it cannot carry (or
    # one named with `_`, which it leaves to the full path in a head)
    data = head(
        b"Content-Type: application/json",
        body=b'{"a":1}\r\nAuthorization: Bearer x\r\nMcp-Name: other\r\nHost: elsewhere'
        b"\r\nMcp_Name: other",
    )
    read = lane(data)
    assert read is not None
    assert read.fields == full_path(data).fields
    assert read.get(b"host") == b"tools" and read.get(b"mcp-name") is None


@pytest.mark.parametrize(
    ("line", "aliased"),
    [
        # the name's one `_` in the last two bytes of the head (its last field, empty): a
        # field a proxy vouches for (x-forwarded-...) to a CGI server
        (b"X-Forwarded_:", b"x-forwarded_"),
        (b"Mcp_Name: secret_tool", b"mcp_name"),
        (b"X_Trace_Id: 7", b""),  # an alias of nothing credless reads: relayed
    ],
)
def test_the_lane_leaves_a_head_with_any_underscore_name_to_the_full_path(line, aliased):
    # the full path's reading names an alias (Request.aliased, which decide refuses); the
    # lane's names none, so it must not take a request with a `_` in any field name, the
    # head's last included
    data = b"GET /mcp HTTP/1.1\r\nHost: tools\r\n" + line + b"\r\n\r\n"
    assert lane(data) is None
    assert full_path(data).aliased == aliased


def test_the_lane_reads_field_values_byte_for_byte_as_the_full_path():
    # only the surrounding spaces and tabs are dropped, in the first and every repeated
    # field alike: the policy sees "echoX", never "echo"
    data = head(
        b"Mcp-Method: tools/callX",
        b"Mcp-Name: \tXechoX \t",
        b"Mcp-Name: XaddX",
        b"Content-Type: application/json; charset=utf-8X",
    )
    read = lane(data)
    assert read is not None
    assert read.fields == full_path(data).fields
    assert read.fields[b"mcp-name"] == [b"XechoX", b"XaddX"]
    assert read.get(b"mcp-method") == b"tools/callX"
    assert read.body_charset() is not None


@pytest.mark.parametrize("body", [b"x", b"xy"])
def test_the_lane_reads_a_body_of_one_byte_or_more_as_a_body(body):
    # a GET with a body is refused (decide: body_refused) by what the head frames: the lane,
    # which has the whole message, must say "bodied" as the full path does, to the last byte
    data = b"GET /mcp HTTP/1.1\r\nHost: tools\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    read = lane(data)
    assert read is not None
    assert read.bodied is full_path(data).bodied is True


def test_a_request_made_of_its_head_alone_frames_no_body():
    # Request's own default (tests and callers that build one by hand): no body unless said
    req = Request(b"GET", b"/mcp", {b"host": [b"tools"]})
    assert req.bodied is False and req.vouched == ()
