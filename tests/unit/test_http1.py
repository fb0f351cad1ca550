"""HTTP/1.1 framing helpers: header lookups and hop-by-hop connection headers."""

from __future__ import annotations

import pytest

from agent.inject import http1
from agent.inject.http1 import BODY, END, HEAD

STRIP_CASES = [
    # (headers in, headers kept)
    ([(b"Host", b"a"), (b"Connection", b"close")], [(b"Host", b"a")]),
    (
        [
            (b"Connection", b"keep-alive, X-Hop"),
            (b"X-Hop", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-End", b"2"),
        ],
        [(b"X-End", b"2")],
    ),
    (
        [(b"Proxy-Connection", b"keep-alive"), (b"Content-Length", b"3")],
        [(b"Content-Length", b"3")],
    ),
    # framing is never dropped, even when Connection names it
    (
        [(b"Connection", b"Transfer-Encoding"), (b"Transfer-Encoding", b"chunked")],
        [(b"Transfer-Encoding", b"chunked")],
    ),
    ([(b"Host", b"a")], [(b"Host", b"a")]),
]


@pytest.mark.parametrize("headers,kept", STRIP_CASES)
def test_connection_headers_are_stripped(headers, kept):
    head = http1.Head(headers=list(headers))
    http1.strip_connection_headers(head)
    assert head.headers == kept
    assert head.names == {k.lower() for k, _ in kept}


def test_lookups_are_case_insensitive_and_follow_add_and_remove():
    head = http1.Head(headers=[(b"Content-Type", b"application/json")])
    assert head.get(b"content-type") == b"application/json" and head.get(b"accept") is None
    head.add(b"Authorization", b"Bearer x")
    assert head.get(b"authorization") == b"Bearer x"
    assert head.remove(b"authorization", b"dpop") == [b"Authorization"]
    assert head.get(b"authorization") is None and head.remove(b"dpop") == []


def test_parsed_request_carries_names_and_framing():
    r = http1.Reader()
    events = r.feed(
        b"POST /mcp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    )
    assert [e[0] for e in events] == [HEAD, BODY, END]
    head = events[0][1]
    assert head.chunked and not head.keep_alive
    assert head.names == {b"host", b"transfer-encoding", b"connection"}


def test_garbage_is_a_protocol_error():
    with pytest.raises(http1.ProtocolError):
        http1.Reader().feed(b"NOT HTTP AT ALL\r\n\r\n")


# The fast path's field patterns (decide.Request.from_read) rely on llhttp refusing every
# other way of writing a field: if one of these were accepted, a credential field could be
# written in a form the pattern does not see.
LENIENT_FORMS = {
    "space before the colon": b"POST / HTTP/1.1\r\nAuthorization : x\r\nContent-Length: 0\r\n\r\n",
    "tab before the colon": b"POST / HTTP/1.1\r\nAuthorization\t: x\r\nContent-Length: 0\r\n\r\n",
    "folded line": b"POST / HTTP/1.1\r\nHost: x\r\n Authorization: x\r\nContent-Length: 0\r\n\r\n",
    "bare LF": b"POST / HTTP/1.1\r\nHost: x\nAuthorization: x\r\nContent-Length: 0\r\n\r\n",
    "bare CR": b"POST / HTTP/1.1\r\nHost: x\rAuthorization: x\r\nContent-Length: 0\r\n\r\n",
    "bare LF line ends": b"POST / HTTP/1.1\nAuthorization: x\nContent-Length: 0\n\n",
    "NUL in the name": b"POST / HTTP/1.1\r\nAuthori\x00zation: x\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("raw", LENIENT_FORMS.values(), ids=LENIENT_FORMS.keys())
def test_llhttp_refuses_every_other_spelling_of_a_field(raw):
    with pytest.raises(http1.ProtocolError):
        http1.Reader().feed(raw)
    assert not http1.WholeMessage().one(raw)


def test_whole_message_is_one_message_from_the_first_byte_and_says_where_its_head_ends():
    request = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    whole = http1.WholeMessage()
    assert whole.one(request) and whole.head_end == request.index(b"\r\n\r\n")
    # llhttp skips empty lines before a message; the test does not
    for before in (b"\r\n", b"\r\n\r\n", b"\n"):
        assert not whole.one(before + request)
    assert whole.one(request)  # and is ready for the next read


# Request framing the proxy accepts: no body, one Content-Length, or one Transfer-Encoding
# field saying chunked. Everything else is refused before a head reaches the decision, so
# the proxy and any server behind it agree on where each request ends.
def post(*fields: bytes, body: bytes = b"") -> bytes:
    return (
        b"POST /mcp HTTP/1.1\r\nHost: x\r\n"
        + b"".join(f + b"\r\n" for f in fields)
        + b"\r\n"
        + body
    )


FRAMING = {
    "Content-Length and Transfer-Encoding": (
        post(b"Content-Length: 5", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
        400,
    ),
    "Content-Length twice, even equal": (
        post(b"Content-Length: 2", b"Content-Length: 2", body=b"{}"),
        400,
    ),
    "Transfer-Encoding split over two fields": (
        post(
            b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked", body=b"2\r\n{}\r\n0\r\n\r\n"
        ),
        400,
    ),
    "chunked, identity": (post(b"Transfer-Encoding: chunked, identity"), 400),
    "a coding other than chunked": (post(b"Transfer-Encoding: gzip", body=b"xx"), 400),
    "chunked twice in one field": (post(b"Transfer-Encoding: chunked, chunked"), 400),
    "an invalid chunk size": (post(b"Transfer-Encoding: chunked", body=b"zz\r\n"), 400),
    "trailer fields": (
        post(
            b"Transfer-Encoding: chunked",
            body=b"2\r\n{}\r\n0\r\nAuthorization: Bearer OWN\r\nMcp-Name: secret_tool\r\n\r\n",
        ),
        400,
    ),
}


@pytest.mark.parametrize("raw,status", FRAMING.values(), ids=FRAMING.keys())
def test_framing_other_than_one_length_or_chunked_is_refused(raw, status):
    with pytest.raises(http1.ProtocolError) as err:
        http1.Reader().feed(raw)
    assert err.value.status == status


def test_trailers_never_reach_the_head_even_when_the_body_was_already_taken():
    reader = http1.Reader()
    events = reader.feed(post(b"Transfer-Encoding: chunked", body=b"2\r\n{}\r\n0\r\n"))
    head = events[0][1]
    with pytest.raises(http1.ProtocolError, match="trailer"):
        reader.feed(b"Authorization: Bearer OWN\r\n\r\n")
    assert head.get(b"authorization") is None and b"authorization" not in head.names


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b" chunked ", b"CHUNKED"])
def test_one_chunked_coding_in_any_case_and_spacing_frames_a_chunked_body(value):
    events = http1.Reader().feed(post(b"Transfer-Encoding: " + value, body=b"2\r\n{}\r\n0\r\n\r\n"))
    assert events[0][1].chunked and [e[0] for e in events] == [HEAD, BODY, END]


LIMITS = {
    "a head over the byte limit in one read": [post(b"X-Big: " + b"a" * 2000)],
    "a field growing over many reads": [post()[:-2] + b"X-Big: "] + [b"a" * 300] * 10,
    "too many fields": [post(*[b"X-%d: 1" % i for i in range(20)])],
}


@pytest.mark.parametrize("reads", LIMITS.values(), ids=LIMITS.keys())
def test_a_head_over_the_limits_is_refused_431_before_it_is_held_whole(reads):
    reader = http1.Reader(max_head=1024, max_fields=16)
    fed = 0
    with pytest.raises(http1.ProtocolError) as err:
        for data in reads:
            fed += len(data)
            reader.feed(data)
    assert err.value.status == 431
    assert fed <= 1024 + max(len(r) for r in reads)


@pytest.mark.parametrize("whole", [True, False], ids=["ended", "unended"])
def test_a_servers_head_over_the_limit_is_refused_before_it_is_held_whole(whole):
    """A hostile MCP server's answer: its head is bounded, though not by the workload's
    limits (its 401 challenge is parsed; before, a head of any size was held and read)."""
    limit = http1.MAX_RESPONSE_HEAD_BYTES
    reader = http1.Reader(response=True, max_head=1024)
    head = b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: DPoP " + b"(" * limit
    with pytest.raises(http1.ProtocolError, match=f"response head larger than {limit} bytes"):
        reader.feed(head + (b"\r\nContent-Length: 0\r\n\r\n" if whole else b""))


@pytest.mark.parametrize(
    "fields,chunked",
    [
        (b"Transfer-Encoding: chunked\r\n", True),
        (b"Transfer-Encoding: gzip, chunked\r\n", True),
        (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", True),  # was False
        (b"Transfer-Encoding: chunked, gzip\r\nContent-Length: 0\r\n", None),
    ],
    ids=["chunked", "gzip-chunked", "two-fields", "chunked-not-last"],
)
def test_a_response_is_chunked_as_llhttp_reads_it_over_every_field(fields, chunked):
    reader = http1.Reader(response=True)
    data = b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n" + b"3\r\nabc\r\n0\r\n\r\n"
    try:
        events = reader.feed(data)
    except http1.ProtocolError:
        assert chunked is None  # llhttp refuses it: never relayed
        return
    assert chunked is not None and events[0][1].chunked is chunked
    assert b"".join(e[1] for e in events if e[0] == BODY) == b"abc"


def test_many_requests_on_one_connection_do_not_add_up_to_the_head_limit():
    reader = http1.Reader(max_head=1024, max_fields=16)
    one = post(b"Content-Length: 2", b"X-Pad: " + b"p" * 400, body=b"{}")
    for _ in range(50):
        assert [e[0] for e in reader.feed(one)] == [HEAD, BODY, END]
    # and a head arriving in pieces just under the limit is still accepted
    head = post(b"Content-Length: 2", b"X-Pad: " + b"p" * 900, body=b"{}")
    events = reader.feed(head[:500]) + reader.feed(head[500:])
    assert [e[0] for e in events] == [HEAD, BODY, END]
