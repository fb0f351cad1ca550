"""The fast lane relays a request line as read, so it takes only the one spelling the full
path would render: llhttp (httptools) also accepts others, which servers may read apart."""

from __future__ import annotations

import pytest

from tests.unit.test_fast_path import BODY, World, in_loop


def read(request_line: bytes) -> bytes:
    return b"%s\r\nHost: 127.0.0.1:8080\r\nContent-Length: %d\r\n\r\n%s" % (
        request_line,
        len(BODY),
        BODY,
    )


@pytest.mark.parametrize(
    "line",
    [
        b"POST /mcp RTSP/1.1",  # llhttp: version 1.1, keep-alive
        b"POST  /mcp HTTP/1.1",  # two spaces (h11 and Go refuse it; llhttp reads /mcp)
        b"POST /mcp  HTTP/1.1",
    ],
)
@in_loop
def test_what_the_lane_sends_is_an_http_1_1_request_line(line):
    w = World()
    taken = w.lane.offer(read(line))
    sent = w.upstream.transport.out
    # the full path sends "POST /mcp HTTP/1.1" for each; the lane must send that or decline
    assert not taken and sent == b"", sent.split(b"\r\n")[0]  # the full path takes it


@in_loop
def test_the_canonical_request_line_is_taken():
    w = World()
    assert w.lane.offer(read(b"POST /mcp HTTP/1.1"))
    assert w.upstream.transport.out.startswith(b"POST /mcp HTTP/1.1\r\n")
