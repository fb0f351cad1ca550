"""The echo upstream of the proxy's kernel tests: a threaded HTTP/1.1 server in the test
process that records what each request carried (Upstream.seen) and answers POSTs with
their JSON body; some GET paths answer in ways the proxy must handle (a stream, an early
hint, a body ended by closing, one that outlasts its reader, one larger than any buffer).
The `upstream` fixture (tests/conftest.py) runs it on a free loopback port; tls_upstream()
over TLS. hangup_server() is an upstream that never answers."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

from tests.helpers import serving
from tests.tlsca import TestCA

BIG_BODY = bytes(range(256)) * (64 << 10)  # 16 MiB


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: ClassVar[list] = []

    def do_POST(self):
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while size := int(self.rfile.readline(), 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        Upstream.seen.append(
            {
                "auth": self.headers.get("Authorization"),
                "peer_port": self.client_address[1],
                "body": body.decode(),
            }
        )
        out = json.dumps({"echo": json.loads(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):
        if self.path == "/close":  # closes its connection after every answer
            Upstream.seen.append({"peer_port": self.client_address[1], "path": self.path})
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"ok")
            self.close_connection = True
            return
        if self.path == "/early":  # an interim 103 Early Hints before the answer
            self.send_response_only(103)
            self.send_header("Link", "</style.css>; rel=preload")
            self.end_headers()
            self.send_response(200)
            self.send_header("Content-Length", "11")
            self.end_headers()
            self.wfile.write(b"after hints")
            return
        if self.path == "/eof":  # a body delimited by closing the connection
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until the end")
            self.close_connection = True
            return
        if self.path == "/forever":  # one event, then silence until its reader is gone
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"9\r\ndata: 0\n\n\r\n")
            self.wfile.flush()
            t0 = time.monotonic()
            while time.monotonic() - t0 < 30:
                readable, _, _ = select.select([self.connection], [], [], 0.1)
                if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                    Upstream.seen.append({"path": self.path, "closed_after": time.monotonic() - t0})
                    break
            self.close_connection = True
            return
        if self.path == "/big":  # BIG_BODY, more than the socket buffers hold
            self.send_response(200)
            self.send_header("Content-Length", str(len(BIG_BODY)))
            self.end_headers()
            self.wfile.write(BIG_BODY)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(3):
            data = f"data: {i}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            time.sleep(0.3)  # a slow stream: events must reach the client one by one
        self.wfile.write(b"0\r\n\r\n")

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()

    def log_message(self, *a):
        pass


@contextlib.contextmanager
def raw_server(handle: Callable[[socket.socket], object]) -> Iterator[int]:
    """A loopback port whose server thread hands each connection it accepts to handle."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)  # how soon the thread sees it is to stop
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                handle(srv.accept()[0])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        srv.close()


def hangup_server() -> contextlib.AbstractContextManager[int]:
    """A port where a server accepts, reads a request, and closes without answering."""

    def read_and_close(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)

    return raw_server(read_and_close)


@contextlib.contextmanager
def tls_upstream(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """The echo upstream over TLS, its port and the file of the CA that issued its
    certificate; its record of requests starts empty."""
    ca = TestCA(tmp_path, "test upstream CA")
    cert, key = ca.issue("up", ("127.0.0.1",))
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    srv.socket = sctx.wrap_socket(srv.socket, server_side=True)
    with serving(srv, "upstream-tls"):
        Upstream.seen = []
        yield srv.server_address[1], ca.cert_path
