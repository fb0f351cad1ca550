"""agent/inject/last_request.py: the last answer on a connection after a handover says
Connection: close, and nothing else about it changes."""

from __future__ import annotations

from agent.inject.last_request import with_connection_close


def test_a_final_head_gets_connection_close_in_place_of_its_own():
    data = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    assert with_connection_close(data) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n"
    )


def test_a_head_without_connection_field_gets_one():
    out = with_connection_close(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\n{}")
    assert out == b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"


def test_interim_answers_and_heads_cut_short_are_left_alone():
    assert with_connection_close(b"HTTP/1.1 100 Continue\r\n\r\n") is None
    assert with_connection_close(b"HTTP/1.1 200 OK\r\nContent-Len") is None
