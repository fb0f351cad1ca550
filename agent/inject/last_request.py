"""The workload's connections of an agent that handed over (agent/handover.py): each one's
next request is its last here.

After a handover the old agent accepts nothing more, but its open connections are the
workloads' kept-alive ones. Closing one between requests loses a request the workload sends
at that moment; serving them on for ever keeps the workload on the old agent. So each is
armed: its next request is served here, its answer says `Connection: close`, and the
connection is closed after it; the workload's HTTP client makes its next request on a new
connection, which reaches the new agent. An answer in flight (an SSE stream) is not touched.
"""

from __future__ import annotations

from agent.inject.flows import ClientSide


def with_connection_close(data: bytes) -> bytes | None:
    """data, a write that begins a final response head, with `Connection: close` (in place
    of any Connection field); None if the head does not end in it or is an interim (1xx)
    one."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or data[9:10] == b"1":
        return None
    lines = data[:end].split(b"\r\n")
    kept = [lines[0]] + [ln for ln in lines[1:] if not ln.lower().startswith(b"connection:")]
    return b"\r\n".join([*kept, b"Connection: close"]) + data[end:]


class HandedOverClient(ClientSide):
    """A workload's connection, which a handover can arm (last_request()): its next request
    is still served here, answered with `Connection: close`, and the connection closed after
    it, so the workload's client makes its next one to the new agent. Between requests
    nothing is closed under the client: a request it sends meanwhile would be lost."""

    _armed = False
    _closing_head = False  # the answer to write next gets Connection: close

    def last_request(self) -> None:
        self._armed = True

    def data_received(self, data: bytes) -> None:
        if self._armed and not self.draining:
            # before the bytes are parsed or taken by the fast lane: this request is the last
            # (its serving coroutine runs only after this callback, with it queued)
            self._closing_head = True
            self.drain_and_close()
        super().data_received(data)

    def write(self, data: bytes) -> None:
        if self._closing_head and data.startswith(b"HTTP/1."):
            closing = with_connection_close(data)
            if closing is not None:
                data, self._closing_head = closing, False
        super().write(data)
