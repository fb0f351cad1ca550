"""Whether a workload that closed its connection under an event-stream answer had its
answer (agent/inject/answered.py, exchange.answered): the stream relayed to the end of an
event, and a response for each of its requests. Sans-IO: the pieces are fed as a relay
would, split anywhere."""

from __future__ import annotations

import json

import pytest

from agent.inject import answers
from agent.inject.answered import MAX_EVENT, EventStream, is_event_stream
from agent.inject.exchange import answered
from agent.inject.record import AuditBase
from agent.policy.jsonrpc import Call

RESPONSE = b'event: message\r\ndata: {"jsonrpc":"2.0","id":7,"result":{}}\r\n\r\n'
PROGRESS = b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n'


def fed(*pieces: bytes) -> EventStream:
    s = EventStream()
    for p in pieces:
        s.feed(p)
    return s


@pytest.mark.parametrize("at", range(len(RESPONSE) + 1))
def test_a_response_is_found_wherever_the_stream_is_split(at):
    s = fed(PROGRESS, RESPONSE[:at], RESPONSE[at:])
    assert s.responses == {"7"} and s.between_events
    # a lone CR ends a line too: the event is whole at its last CR
    whole = at >= len(RESPONSE) - 1
    partial = fed(PROGRESS, RESPONSE[:at])
    assert partial.between_events == (at == 0 or whole)
    assert partial.responses == ({"7"} if whole else set())


def test_line_ends_data_lines_and_what_is_not_a_response():
    s = fed(b'data: {"jsonrpc":"2.0",\rdata: "id":"a","error":{"code":1}}\r\r')
    assert s.responses == {'"a"'}  # CR line ends; data lines joined
    s = fed(PROGRESS, b'data: {"jsonrpc":"2.0","id":3,"method":"sampling/createMessage"}\n\n')
    assert s.responses == set() and s.between_events  # a request of the server's, a note
    s = fed(b"data: not json\n\n", b": a comment\n\n", b'data: [{"id":1,"result":1}]\n\n')
    assert s.responses == {"1"}  # a batch's responses


def test_an_oversized_event_is_skipped_and_its_end_still_found():
    s = fed(b"data: " + b"x" * (MAX_EVENT + 1))
    assert not s.between_events
    s.feed(b"\n\n" + RESPONSE)
    assert s.between_events and s.responses == {"7"}


def test_content_types():
    assert is_event_stream(b"text/event-stream; charset=utf-8")
    assert is_event_stream(b"Text/Event-Stream")
    assert not is_event_stream(b"application/json") and not is_event_stream(None)


class Conn:
    """What answered() reads of an upstream connection."""

    def __init__(self, events: EventStream | None, status: int = 200):
        self.events, self.status = events, status


def base(method: str, asked: answers.Asked = answers.PLAIN) -> AuditBase:
    return AuditBase({"method": method, "path": "/mcp"}, "", asked)


def test_a_workload_leaving_is_done_only_once_it_had_its_responses():
    call = Call("tools/call", "echo", 7, True)
    note = Call("notifications/initialized", None, None, False)
    post = base("POST", answers.Asked(True, (call, note)))
    assert answered(Conn(fed(RESPONSE)), post)  # type: ignore[arg-type]
    assert not answered(Conn(fed(PROGRESS)), post)  # type: ignore[arg-type]
    assert not answered(Conn(fed(RESPONSE[:-2])), post)  # type: ignore[arg-type]
    other = base("POST", answers.Asked(True, (Call("ping", None, 8, True),)))
    assert not answered(Conn(fed(RESPONSE)), other)  # type: ignore[arg-type]
    # the body was not read: any response will do
    assert answered(Conn(fed(RESPONSE)), base("POST"))  # type: ignore[arg-type]
    assert not answered(Conn(fed(PROGRESS)), base("POST"))  # type: ignore[arg-type]
    # a GET stream answers no request: left by the workload, it was cut short
    assert not answered(Conn(fed(PROGRESS)), base("GET"))  # type: ignore[arg-type]
    # no event stream, or no answer at all: aborted
    assert not answered(Conn(None), base("POST"))  # type: ignore[arg-type]
    assert not answered(Conn(fed(), status=0), base("POST"))  # type: ignore[arg-type]
    assert json.dumps(7) == "7"  # ids are compared as JSON text: 7 and "7" differ
