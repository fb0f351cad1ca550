"""The Prometheus registry and the HTTP endpoint that serves /metrics, /healthz and /readyz.

One registry per daemon (not prometheus_client's global one) so tests can run several agents
in one process. Components register their series on `Metrics.registry` when they start.
"""

from __future__ import annotations

import platform
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import (CollectorRegistry, Info, PlatformCollector, ProcessCollector,
                               generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent import __version__

ReadyCheck = Callable[[], "tuple[bool, str]"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info("credless_build", "credless build information", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version()})
        self._ready_checks: dict[str, ReadyCheck] = {}

    def add_ready_check(self, name: str, check: ReadyCheck) -> None:
        """Register a readiness condition; /readyz is 200 only when all of them pass."""
        self._ready_checks[name] = check

    def readiness(self) -> tuple[bool, list[str]]:
        lines, ok = [], True
        for name, check in self._ready_checks.items():
            passed, detail = check()
            ok &= passed
            lines.append(f"{'ok' if passed else 'FAIL'} {name}: {detail}")
        return ok, lines


class MetricsServer:
    """A small threaded HTTP server; binds in start() so a bad address fails start-up."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._metrics = metrics
        self._addr = (host, port)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._httpd is not None
        return self._httpd.server_address[:2]

    def start(self) -> None:
        metrics = self._metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    ok, lines = metrics.readiness()
                    self._send(200 if ok else 503, ("\n".join(lines) + "\n").encode())
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes are not diagnostics
                pass

        server_cls = ThreadingHTTPServer
        if ":" in self._addr[0]:
            import socket

            class V6(ThreadingHTTPServer):
                address_family = socket.AF_INET6

            server_cls = V6
        server_cls.daemon_threads = True
        self._httpd = server_cls(self._addr, Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
