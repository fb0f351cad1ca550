"""A small threaded HTTP/1.1 server for GET-only operator and discovery endpoints.

Used by the metrics endpoint and the bundle endpoint: both serve a handful of small,
computed documents at low rates, where the standard library server is enough and adds no
dependency. It binds in start(), so a bad or busy address fails the agent's start-up.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A route returns (status, body, content type).
Route = Callable[[], "tuple[int, bytes, str]"]
TEXT = "text/plain; charset=utf-8"


class HttpEndpoint:
    def __init__(self, host: str, port: int, routes: dict[str, Route], name: str = "http"):
        self._addr = (host, port)
        self._routes = routes
        self._name = name
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def requested_address(self) -> tuple[str, int]:
        return self._addr

    @property
    def address(self) -> tuple[str, int]:
        if self._httpd is None:
            raise RuntimeError("the metrics endpoint is not started")
        host, port = self._httpd.socket.getsockname()[:2]  # (IPv6 adds flow info, scope)
        return host, port

    def start(self) -> None:
        routes = self._routes

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    known = ", ".join(sorted(routes))
                    self._send(404, f"not found; this endpoint serves {known}\n".encode(), TEXT)
                    return
                self._send(*route())

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # requests are not diagnostics
                pass

        family = socket.AF_INET6 if ":" in self._addr[0] else socket.AF_INET
        server_cls = type(
            "Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True}
        )
        self._httpd = server_cls(self._addr, Handler)
        threading.Thread(target=self._httpd.serve_forever, name=self._name, daemon=True).start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
