"""agent/observe/serving.py: a server's stop does not wait for its serve loop's next poll.

Each server here polls once an hour: `shutdown()` alone would return an hour later. The
stop runs on a thread joined with a generous bound; the bound is there so that a regression
fails the test instead of hanging the suite, not as a measure of speed."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.observe.serving import serve_in_background, stop_serving

AN_HOUR = 3600.0
HANG = 60.0  # far beyond any stop, far below the poll interval


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args: object) -> None:
        pass


class Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


def stopped_without_waiting_for_a_poll(
    server: socketserver.BaseServer, meanwhile: Callable[[], None] = lambda: None
) -> None:
    """Serve (doing meanwhile while it serves), stop, and check the stop came at once and
    closed the listening socket."""
    loop = serve_in_background(server, "under-test", poll_interval=AN_HOUR)
    meanwhile()
    stopper = threading.Thread(target=stop_serving, args=(server,), daemon=True)
    stopper.start()
    stopper.join(HANG)
    assert not stopper.is_alive(), "stop_serving waited for the serve loop's next poll"
    loop.join(HANG)
    assert not loop.is_alive()
    assert server.socket.fileno() == -1  # closed


def test_a_tcp_server_that_served_stops_at_once_and_closes_its_port() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    port = server.server_address[1]

    def one_request() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=HANG) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert c.makefile("rb").read().endswith(b"hello")

    stopped_without_waiting_for_a_poll(server, one_request)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=HANG).close()


def test_an_idle_tcp_server_stops_at_once() -> None:
    stopped_without_waiting_for_a_poll(ThreadingHTTPServer(("127.0.0.1", 0), Hello))


def test_an_idle_unix_socket_server_stops_at_once(tmp_path: Path) -> None:
    server = socketserver.ThreadingUnixStreamServer(str(tmp_path / "s.sock"), Echo)
    stopped_without_waiting_for_a_poll(server)


def test_a_server_stopped_before_its_loop_ran_stops() -> None:
    """The stop can come first (a start-up that fails right after binding): the loop,
    when it runs, finds the flag and leaves."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    stopper = threading.Thread(target=stop_serving, args=(server,), daemon=True)
    stopper.start()
    loop = serve_in_background(server, "under-test", poll_interval=AN_HOUR)
    for t in (stopper, loop):
        t.join(HANG)
        assert not t.is_alive()
