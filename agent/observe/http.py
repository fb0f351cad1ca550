"""A small threaded HTTP/1.1 server for GET-only operator and discovery endpoints.

Used by the metrics endpoint and the bundle endpoint: both serve a handful of small,
computed documents at low rates, where the standard library server is enough and adds no
dependency. It binds in start(), so a bad or busy address fails the agent's start-up.

With a certificate (cert_file, key_file) it serves https only: an authorization server on
another host fetches the bundle endpoint's JWKS to verify credless's client assertions, and
a key document fetched over plain http could be replaced on the way. The handshake runs in
the connection's own thread (a client that stalls in it holds up nobody else), and a
certificate file replaced on disk (renewed) is loaded for the next connection.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent.observe.serving import serve_in_background, stop_serving

# A route returns (status, body, content type).
Route = Callable[[], "tuple[int, bytes, str]"]
TEXT = "text/plain; charset=utf-8"


# a connection that does not finish its handshake or request in this time is closed
CONNECTION_TIMEOUT = 10.0


class CertificateError(ValueError):
    """The configured certificate or key cannot be used (not an address problem)."""


class ServerCertificate:
    """The TLS server context of an endpoint, loaded again when its files change."""

    def __init__(self, cert_file: str, key_file: str):
        self.cert_file, self.key_file = cert_file, key_file
        self._lock = threading.Lock()
        self._stamp: tuple[float, float] | None = None  # the files' mtimes when loaded
        self._ctx: ssl.SSLContext | None = None
        self.context()  # a missing or unreadable file fails start-up, not the first client

    def _load(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as e:
            raise CertificateError(
                f"cannot load the certificate {self.cert_file} with its key {self.key_file}: "
                f"{getattr(e, 'strerror', None) or e}; check both files (PEM, the chain leaf "
                "first, the key matching the leaf)"
            ) from None
        return ctx

    def context(self) -> ssl.SSLContext:
        try:
            stamp = (os.stat(self.cert_file).st_mtime, os.stat(self.key_file).st_mtime)
        except OSError:
            stamp = None  # renamed away while being renewed: _load says so if it is gone
        with self._lock:
            if self._ctx is None or stamp != self._stamp:
                try:
                    self._ctx = self._load()
                except CertificateError:
                    if self._ctx is None:
                        raise
                    # a renewal caught half-written: keep serving the previous certificate
                    return self._ctx
                self._stamp = stamp
            return self._ctx


class HttpEndpoint:
    def __init__(
        self,
        host: str,
        port: int,
        routes: dict[str, Route],
        name: str = "http",
        cert_file: str = "",
        key_file: str = "",
    ):
        self._addr = (host, port)
        self._routes = routes
        self._name = name
        self._httpd: ThreadingHTTPServer | None = None
        self._tls = (cert_file, key_file) if cert_file else None

    @property
    def scheme(self) -> str:
        return "https" if self._tls else "http"

    @property
    def requested_address(self) -> tuple[str, int]:
        return self._addr

    @property
    def address(self) -> tuple[str, int]:
        if self._httpd is None:
            raise RuntimeError(f"the {self._name} endpoint is not started")
        host, port = self._httpd.socket.getsockname()[:2]  # (IPv6 adds flow info, scope)
        return host, port

    def start(self) -> None:
        routes = self._routes
        cert = ServerCertificate(*self._tls) if self._tls else None

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = CONNECTION_TIMEOUT

            def setup(self) -> None:
                if cert is not None:
                    # no I/O yet: the handshake happens at the first read, in handle(), on
                    # this connection's thread and under its timeout
                    self.request = cert.context().wrap_socket(
                        self.request, server_side=True, do_handshake_on_connect=False
                    )
                super().setup()

            def handle(self) -> None:
                try:
                    super().handle()
                except (ssl.SSLError, OSError):
                    pass  # a failed handshake, a client gone: no one to answer

            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    if cert is not None:  # wrap_socket took the server's socket over
                        self.request.close()

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

            def log_message(self, *args: Any) -> None:  # requests are not diagnostics
                pass

        family = socket.AF_INET6 if ":" in self._addr[0] else socket.AF_INET
        server_cls = type(
            "Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True}
        )
        self._httpd = server_cls(self._addr, Handler)
        serve_in_background(self._httpd, self._name)

    def stop(self) -> None:
        if self._httpd is not None:
            stop_serving(self._httpd)
            self._httpd = None
