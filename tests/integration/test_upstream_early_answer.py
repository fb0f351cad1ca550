"""An MCP server that answers a request whole before its body has arrived, on the real
kernel with the real agent: what the workload sends after that answer never reaches the
server.

A server may answer early (an error it can give from the head alone) and then read what
follows on its connection as the next request: a workload could write one there, in the
body of its own, and have the server act on it with no decision by credless (no policy, no
audit), and answer it in place of the workload's next request. Before, the agent went on
sending the body after the answer, and then pooled the connection (found by review,
stop 32). Now it stops sending at the answer, drops the rest of the body, and closes that
connection: the workload's own connection stays in step for its next request.
"""

from __future__ import annotations

import socket
import threading

import pytest

from tests.helpers import wait_for
from tests.integration.test_upstream_resets import OK, answering, request, world

pytestmark = pytest.mark.kernel

PADDING = 70_000  # more than the agent gathers (64 KiB) before it sends: the head goes up
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"


class EarlyAnswer:
    """Reads a request's head, answers 200 at once (keeping the connection), then records
    every byte that comes after the head until the connection ends."""

    def __init__(self) -> None:
        self.after_head = bytearray()
        self.ended = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        conn.settimeout(30)  # never blocks the test for good (it fails instead)
        buf = bytearray()
        with conn:
            try:
                while b"\r\n\r\n" not in buf:
                    buf += conn.recv(65536)
                self.after_head += bytes(buf).partition(b"\r\n\r\n")[2]
                conn.sendall(OK)
                while data := conn.recv(65536):
                    self.after_head += data
            except OSError:
                pass
            finally:
                self.ended.set()


def test_what_the_workload_sends_after_an_early_answer_never_reaches_the_server(tmp_path):
    server = EarlyAnswer()
    with world(tmp_path, server, answering) as (_agent, _script, w):
        full = request(w.port, b"p" * PADDING + SMUGGLED)
        head_and_padding = full[: len(full) - len(SMUGGLED)]
        w.send(head_and_padding)
        assert w.read()["status"] == 200  # the server's early answer, relayed
        # the rest of the body: bytes a server reading on would take for a request
        w.send(full[len(head_and_padding) :])
        wait_for(
            lambda: server.ended.is_set() or b"/smuggled" in server.after_head,
            what="the server's connection to end",
        )
        # what had gone up before the answer, and nothing after it
        assert bytes(server.after_head) == b"p" * len(server.after_head)
        # the workload's connection is where its next request begins: served, on a new
        # connection to the server
        w.send(request(w.port))
        assert w.read()["status"] == 200
