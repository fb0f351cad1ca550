"""What an event-stream answer carried (agent/inject/answered.py), found by mutation testing:
a CRLF split between two pieces inside an event of several data lines, events back to back
in one piece, blank lines between events, `data:` without its optional space, an event of
exactly MAX_EVENT bytes, and an object naming a method that is never a response. Sans-IO:
the pieces are fed as a relay would."""

from __future__ import annotations

import json

import pytest

from agent.inject.answered import MAX_EVENT, EventStream

# one event, its JSON split over two data lines, its lines ending in CRLF
PROGRESS = b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n'
TWO_LINES = b'data: {"jsonrpc":"2.0",\r\ndata: "id":5,"result":{}}\r\n\r\n'


def fed(*pieces: bytes) -> EventStream:
    s = EventStream()
    for p in pieces:
        s.feed(p)
    return s


@pytest.mark.parametrize("at", range(1, len(TWO_LINES)))
def test_an_event_of_several_data_lines_is_whole_wherever_a_crlf_is_split(at):
    s = fed(TWO_LINES[:at], TWO_LINES[at:])
    assert s.responses == {"5"} and s.between_events


def test_a_crlf_split_then_more_pieces_each_keeps_its_first_byte():
    s = fed(b'data: {"jsonrpc":"2.0",\r', b"\n", b'data: "id":6,', b'"result":{}}\r', b"\n\r\n")
    assert s.responses == {"6"} and s.between_events


def test_events_back_to_back_in_one_piece_are_each_read():
    first = b'data: {"jsonrpc":"2.0","id":1,"result":{}}\n\n'
    second = b'data: {"jsonrpc":"2.0","id":2,"result":{}}\n\n'
    assert fed(first + second).responses == {"1", "2"}


def test_blank_lines_between_events_leave_the_stream_between_events():
    s = fed(b'data: {"jsonrpc":"2.0","id":1,"result":{}}\n\n\n')
    assert s.responses == {"1"} and s.between_events
    # an event under way after a blank line keeps its first byte
    s = fed(PROGRESS + b'\ndata: {"jsonrpc":"2.0","id":2,"result":{}}', b"\n")
    assert not s.between_events
    s.feed(b"\n")
    assert s.responses == {"2"} and s.between_events


def test_a_data_line_without_its_optional_space_is_read():
    s = fed(b'data:{"jsonrpc":"2.0","id":"x","result":{}}\n\n')
    assert s.responses == {'"x"'}


def test_an_event_of_exactly_max_event_bytes_is_kept_to_be_parsed():
    head, tail = b'data: {"jsonrpc":"2.0","id":9,"result":"', b'"}'
    event = head + b"p" * (MAX_EVENT - len(head) - len(tail)) + tail
    assert len(event) == MAX_EVENT
    s = fed(b"\n", event)
    s.feed(b"\n\n")
    assert s.responses == {"9"}
    # after a blank line in the same piece too
    s = fed(b"\n" + event)
    s.feed(b"\n\n")
    assert s.responses == {"9"}
    # one byte more and it is not kept: its end is still found
    s = fed(event + b" ")
    assert not s.between_events
    s.feed(b"\n\n")
    assert s.responses == set() and s.between_events


def test_an_object_naming_a_method_is_not_a_response_whatever_else_it_carries():
    call = {"jsonrpc": "2.0", "id": 3, "method": "sampling/createMessage", "result": {}}
    s = fed(b"data: " + json.dumps(call).encode() + b"\n\n")
    assert s.responses == set() and s.between_events
