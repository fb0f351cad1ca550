"""HTTP/1.1 framing rules the rest of the suite left unpinned (found by `make mutate`): the
head limits at their exact bounds and on every message of a connection, what bodies and
empty lines count toward them, the framing a request or response head is read with, each
refusal's status and words, and the bytes the proxy writes (heads, chunks, its own answers)."""

from __future__ import annotations

import pytest

from agent.inject import http1
from agent.inject.http1 import BODY, END, HEAD
from tests.unit.test_http1 import post

LIMIT = 1024  # max_head of the readers below


def reader(max_fields: int = 16) -> http1.Reader:
    return http1.Reader(max_head=LIMIT, max_fields=max_fields)


def kinds(events) -> list[int]:
    return [e[0] for e in events]


def padded(counted: int) -> bytes:
    """A request head the limit counts as `counted` bytes: the target, and each field's name
    and value with 4 for its ": " and CRLF (post(): target /mcp, Host: x)."""
    fixed = len(b"/mcp") + len(b"Host") + len(b"x") + 4 + len(b"X-Pad") + 4
    return post(b"X-Pad: " + b"p" * (counted - fixed))


# ---------------------------------------------------------------- the head limits
@pytest.mark.parametrize("split", [None, 7], ids=["one read", "target split over two reads"])
def test_a_head_of_exactly_the_limit_is_read_and_one_byte_more_is_refused(split):
    for counted, refused in ((LIMIT, False), (LIMIT + 1, True)):
        raw = padded(counted)
        reads = [raw] if split is None else [raw[:split], raw[split:]]
        r = reader()
        if refused:
            with pytest.raises(http1.ProtocolError) as err:
                for data in reads:
                    r.feed(data)
            assert err.value.status == 431
            assert str(err.value) == f"request head larger than {LIMIT} bytes"
        else:
            events = [ev for data in reads for ev in r.feed(data)]
            assert kinds(events) == [HEAD, END] and events[0][1].target == b"/mcp"


@pytest.mark.parametrize("earlier", [0, 1, 3], ids=lambda n: f"after {n} message(s)")
def test_an_unfinished_head_may_hold_exactly_the_limit_on_every_message(earlier):
    r = reader()
    for _ in range(earlier):
        assert kinds(r.feed(post(b"Content-Length: 2", body=b"{}"))) == [HEAD, BODY, END]
    unfinished = post()[:-2] + b"X-Big: "
    unfinished += b"a" * (LIMIT - len(unfinished))
    assert r.feed(unfinished) == []  # held: exactly the limit
    with pytest.raises(http1.ProtocolError) as err:
        r.feed(b"a")
    assert (err.value.status, str(err.value)) == (431, f"request head larger than {LIMIT} bytes")


def test_exactly_max_header_fields_are_read_and_one_more_is_refused():
    fields = [b"X-%d: 1" % i for i in range(15)]  # and Host: 16
    assert kinds(reader(16).feed(post(*fields))) == [HEAD, END]
    with pytest.raises(http1.ProtocolError) as err:
        reader(16).feed(post(*fields, b"X-16: 1"))
    assert (err.value.status, str(err.value)) == (431, "more than 16 header fields")


def test_bodies_never_count_toward_the_head_limit_on_any_message():
    r = reader()
    body = b"b" * 5000
    for _ in range(3):
        assert kinds(r.feed(post(b"Content-Length: 5000"))) == [HEAD]
        assert kinds(r.feed(body[:2500])) == [BODY]
        assert kinds(r.feed(body[2500:])) == [BODY, END]


def test_empty_lines_before_a_request_count_toward_the_head_limit():
    r = reader()
    r.feed(b"\r\n" * 300)  # llhttp skips them; they still cost a read each
    with pytest.raises(http1.ProtocolError) as err:
        r.feed(b"\r\n" * 300)
    assert err.value.status == 431


# ---------------------------------------------------------------- how a head is read
@pytest.mark.parametrize(
    "raw,version,keep_alive",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "1.1", True),
        (b"GET / HTTP/1.0\r\nHost: x\r\n\r\n", "1.0", False),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "1.1", False),
    ],
)
def test_a_request_head_says_its_version_and_whether_the_connection_stays(raw, version, keep_alive):
    head = http1.Reader().feed(raw)[0][1]
    assert (head.version, head.keep_alive, head.method) == (version, keep_alive, b"GET")


@pytest.mark.parametrize(
    "fields,chunked",
    [
        ([b"Content-Length: 2"], False),
        ([], False),
        ([b"Transfer-Encoding: chunked"], True),
    ],
)
def test_only_a_chunked_transfer_coding_frames_a_request_as_chunked(fields, chunked):
    body = b"2\r\n{}\r\n0\r\n\r\n" if chunked else b"{}" if fields else b""
    assert http1.Reader().feed(post(*fields, body=body))[0][1].chunked is chunked


@pytest.mark.parametrize(
    "fields,refusal",
    [
        # one field whose last coding is chunked: llhttp frames it chunked; refused here
        ([b"Transfer-Encoding: gzip, chunked"], "got 'gzip, chunked'"),
        ([b"Transfer-Encoding: x,chunked"], "got 'x,chunked'"),
        ([b"Transfer-Encoding: Xchunked"], "got 'Xchunked'"),
        ([b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"], "got 'gzip', 'chunked'"),
    ],
)
def test_a_transfer_encoding_other_than_one_chunked_field_is_refused_by_name(fields, refusal):
    with pytest.raises(http1.ProtocolError) as err:
        http1.Reader().feed(post(*fields, body=b"2\r\n{}\r\n0\r\n\r\n"))
    assert err.value.status == 400
    assert str(err.value) == "Transfer-Encoding must be one field saying chunked, " + refusal


def test_each_refusal_says_what_was_wrong():
    with pytest.raises(http1.ProtocolError) as err:
        http1.Reader().feed(b"NOT HTTP AT ALL\r\n\r\n")
    assert "method" in str(err.value).lower()  # llhttp's reason, passed on
    with pytest.raises(http1.ProtocolError) as err:
        http1.Reader().feed(
            post(b"Transfer-Encoding: chunked", body=b"2\r\n{}\r\n0\r\nX-T: 1\r\n\r\n")
        )
    assert str(err.value) == "trailer fields after a chunked body are not accepted"


def test_a_target_or_reason_arriving_in_pieces_is_read_whole():
    r = http1.Reader()
    assert r.feed(b"GET /aaa") == []
    assert r.feed(b"bbb HTTP/1.1\r\nHost: x\r\n\r\n")[0][1].target == b"/aaabbb"
    r = http1.Reader(response=True)
    assert r.feed(b"HTTP/1.1 404 Not Fo") == []
    head = r.feed(b"und\r\nContent-Length: 0\r\n\r\n")[0][1]
    assert (head.status, head.reason) == (404, b"Not Found")


@pytest.mark.parametrize(
    "field,chunked",
    [
        (b"Transfer-Encoding: chunked", True),
        (b"transfer-encoding: CHUNKED", True),
        (b"Transfer-Encoding: gzip, chunked", True),
        (b"Content-Length: 0", False),
    ],
)
def test_a_response_is_read_as_chunked_when_its_transfer_encoding_says_so(field, chunked):
    head = http1.Reader(response=True).feed(b"HTTP/1.1 200 OK\r\n" + field + b"\r\n\r\n")[0][1]
    assert (head.status, head.version, head.keep_alive) == (200, "1.1", True)
    assert head.chunked is chunked


def test_the_end_of_input_adds_nothing_and_never_raises():
    r = http1.Reader(response=True)
    assert kinds(r.feed(b"HTTP/1.1 200 OK\r\n\r\nabc")) == [HEAD, BODY]  # ends at close
    assert b"".join(ev[1] for ev in r.feed_eof() if ev[0] == BODY) == b""
    broken = http1.Reader(response=True)
    with pytest.raises(http1.ProtocolError):
        broken.feed(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
    assert broken.feed_eof() == []  # the server closed after a bad head: nothing more
    assert http1.Reader().feed_eof() == []  # a request's end is never the connection's


def test_connection_may_name_hop_by_hop_fields_without_spaces():
    head = http1.Head(headers=[(b"Connection", b"X-A,X-B"), (b"X-A", b"1"), (b"X-B", b"2")])
    http1.strip_connection_headers(head)
    assert head.headers == []


# ---------------------------------------------------------------- the bytes written
def test_heads_chunks_and_the_proxys_own_answers_render_exactly():
    request = http1.Head(
        method=b"POST", target=b"/mcp", headers=[(b"Host", b"x"), (b"Content-Length", b"2")]
    )
    assert request.request_bytes() == b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
    response = http1.Head(status=204, reason=b"No Content", headers=[(b"X-A", b"1")])
    assert response.response_bytes() == b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"
    assert http1.Head(status=200, reason=b"OK").response_bytes() == b"HTTP/1.1 200 OK\r\n\r\n"
    assert http1.chunk(b"hello") == b"5\r\nhello\r\n"
    assert http1.chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert http1.LAST_CHUNK == b"0\r\n\r\n"
    assert http1.simple_response(403, b"Forbidden", b'{"e":1}') == (
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
        b'Content-Length: 7\r\n\r\n{"e":1}'
    )
    assert http1.simple_response(
        408, b"Request Timeout", b"", b"text/plain", [(b"Connection", b"close")]
    ) == (
        b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    )


def test_what_the_proxy_writes_is_read_back_as_written():
    """Round trip through the parser the workload and the server use (llhttp)."""
    raw = http1.simple_response(200, b"OK", b"[1]", extra=[(b"Transfer-Encoding-Note", b"none")])
    events = http1.Reader(response=True).feed(raw)
    assert kinds(events) == [HEAD, BODY, END] and events[1][1] == b"[1]"
    assert events[0][1].get(b"content-type") == b"application/json"


# ---------------------------------------------------------------- heads of either kind
def test_a_new_head_is_an_empty_http_1_1_message_without_framing():
    h = http1.Head()
    assert (h.method, h.target, h.status, h.reason, h.version) == (b"", b"", 0, b"", "1.1")
    assert (h.keep_alive, h.chunked, h.upgrade) == (True, False, False)
    assert (h.headers, h.names) == ([], set())


def test_a_parsed_head_has_the_fields_of_its_kind_and_none_of_the_others():
    request = http1.Reader().feed(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")[0][1]
    assert (request.status, request.reason) == (0, b"")
    response = http1.Reader(response=True).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    head = response[0][1]
    assert (head.method, head.target, head.upgrade) == (b"", b"", False)


def test_the_head_limits_are_the_workloads_not_the_servers():
    """A server's response head is not bounded by inject.max_head_bytes/max_header_fields
    (they protect the proxy from workloads), and its trailers are dropped, not refused."""
    r = http1.Reader(response=True, max_head=LIMIT, max_fields=4)
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 200) for i in range(10))
    assert r.feed(head[:1000]) == []
    assert r.feed(head[1000:]) == []
    events = r.feed(b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: 1\r\n\r\n")
    assert kinds(events) == [HEAD, BODY, END] and events[0][1].chunked
    assert events[0][1].get(b"x-trailer") is None and len(events[0][1].headers) == 11


# ---------------------------------------------------------------- one whole message
REQUEST = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


def test_whole_message_recovers_after_a_read_it_declined_and_after_a_closing_message():
    whole = http1.WholeMessage()
    assert not whole.one(b"NOT HTTP\r\n\r\n")
    assert whole.one(REQUEST) and whole.url == b"/mcp" and whole.method == b"POST"
    closing = REQUEST.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
    assert whole.one(closing) and not whole.keep_alive
    assert whole.one(REQUEST) and whole.keep_alive  # a fresh parser: llhttp took no more


def test_whole_message_head_ends_at_the_first_blank_line_even_with_one_in_the_body():
    body = b'{"a":"\r\n\r\n"}'
    request = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    whole = http1.WholeMessage()
    assert whole.one(request) and whole.head_end == request.index(b"\r\n\r\n")
