"""What an event-stream answer (text/event-stream) has carried to the workload so far:
whether it stopped between two events, and the ids of the JSON-RPC responses in it. Sans-IO.

A workload may close its connection while such an answer is still open without giving up on
it: MCP clients close a POST's stream as soon as the JSON-RPC response they wait for is in
(the Python SDK's response.aclose(), while the server's last chunk may still be on its
way). That exchange was answered, and the audit says so (exchange.finished()); a workload
that leaves before its response came, or in the middle of an event, did abort it.

The upstream side feeds this the answer's body as it relays it (UpstreamSide.events,
agent/inject/flows.py); only event-stream answers are looked into.
"""

from __future__ import annotations

import json
from typing import Any

from agent import jsondoc
from agent.inject import http1

# an event longer than this is not kept to be parsed (its end is still found)
MAX_EVENT = 1 << 20


def is_event_stream(content_type: bytes | None) -> bool:
    return http1.media_type(content_type) == b"text/event-stream"


def response_ids(message: Any) -> list[str]:
    """The ids (as JSON text) of the JSON-RPC responses in a message: an object with an id
    and a result or an error, and no method; or a batch of them."""
    items = message if isinstance(message, list) else [message]
    return [
        json.dumps(m["id"])
        for m in items
        if isinstance(m, dict)
        and "id" in m
        and "method" not in m
        and ("result" in m or "error" in m)
    ]


class EventStream:
    """One answer's events, fed its body as relayed (feed), in any pieces."""

    __slots__ = ("_buf", "_cr", "_skip", "responses")

    def __init__(self) -> None:
        self._buf = bytearray()  # the event under way, line ends made LF
        self._cr = False  # the last piece ended in CR: an LF next is that CRLF's
        self._skip = False  # the event under way outgrew MAX_EVENT: not parsed
        self.responses: set[str] = set()  # ids (JSON text) of the responses carried

    @property
    def between_events(self) -> bool:
        """Whether what has been relayed ends where an event ends (or before any)."""
        return not self._buf and not self._skip

    def feed(self, data: bytes) -> None:
        if self._cr and data[:1] == b"\n":
            data = data[1:]  # the LF of a CRLF whose CR ended the last piece
        self._cr = data[-1:] == b"\r"
        # SSE lines end in CRLF, LF or CR (WHATWG HTML, server-sent events)
        buf = self._buf
        buf += data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        while (end := buf.find(b"\n\n")) >= 0:
            event, skip = bytes(buf[:end]), self._skip
            del buf[: end + 2]
            self._skip = False
            if not skip:
                self._event(event)
        while buf[:1] == b"\n":  # a blank line with no event before it dispatches nothing
            del buf[:1]
        if len(buf) > MAX_EVENT:
            buf.clear()
            self._skip = True

    def _event(self, event: bytes) -> None:
        data = [
            line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
        ]
        if not data:
            return
        try:
            message = jsondoc.loads(b"\n".join(data))
        except ValueError:
            return
        self.responses.update(response_ids(message))
