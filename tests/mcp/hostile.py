"""Hostile peers for the discovery tests: an HTTP server that says whatever a test tells it
to (an MCP server's 401 challenge and metadata, or a whole authorization server), and
records every request that reaches it; and an httpx transport that refuses to dial anything
but loopback, so a test may name a non-loopback endpoint without any packet leaving the host.

Everything runs in the test's own process (one thread per server) on loopback addresses;
`stop()` (or leaving the `with` block) shuts the server down and closes its socket. What is
recorded is the shape of a request (method, path, header names, form field names), never a
value: what a test wants to know is whether an assertion arrived, not what it said.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

import httpx

from agent.observe.serving import serve_in_background, stop_serving

# request fields that carry a credential of the agent's: their arrival is what tests assert on
CREDENTIAL_FIELDS = ("client_assertion", "assertion", "software_statement", "client_secret")


@dataclass
class Seen:
    method: str
    path: str
    headers: tuple[str, ...]  # names only, lowercase
    fields: tuple[str, ...] = ()  # form or JSON member names of the body

    @property
    def carries_credential(self) -> bool:
        return (
            any(f in CREDENTIAL_FIELDS for f in self.fields)
            or "authorization" in self.headers
            or "dpop" in self.headers
        )


@dataclass
class Route:
    status: int = 200
    body: object = None  # JSON-encoded when not bytes
    headers: dict = field(default_factory=dict)


class HostilePeer:
    """A tiny HTTP/1.1 server on (host, port 0): routes[(METHOD, path)] answers, anything
    else is 404. `seen` lists every request in arrival order."""

    def __init__(self, host: str = "127.0.0.1"):
        self.routes: dict[tuple[str, str], Route] = {}
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                names: tuple[str, ...] = ()
                if raw and ctype == "application/x-www-form-urlencoded":
                    names = tuple(k for k, _ in parse_qsl(raw.decode("latin-1")))
                elif raw and ctype == "application/json":
                    try:
                        doc = json.loads(raw)
                        names = tuple(doc) if isinstance(doc, dict) else ()
                    except ValueError:
                        pass
                path = self.path.split("?", 1)[0]
                with peer._lock:
                    peer.seen.append(
                        Seen(self.command, path, tuple(k.lower() for k in self.headers), names)
                    )
                    route = peer.routes.get((self.command, path))
                if route is None:
                    route = Route(404, {"error": "not_found"})
                body = (
                    route.body if isinstance(route.body, bytes) else json.dumps(route.body).encode()
                )
                self.send_response(route.status)
                self.send_header("Content-Type", "application/json")
                for k, v in route.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.host, self.port = host, self.server.server_address[1]
        self.origin = f"http://{host}:{self.port}"
        self._thread = serve_in_background(self.server, f"hostile-{host}:{self.port}")

    def route(
        self,
        method: str,
        path: str,
        body: object = None,
        status: int = 200,
        headers: dict | None = None,
    ) -> None:
        with self._lock:
            self.routes[(method, path)] = Route(status, body, headers or {})

    def received(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def stop(self) -> None:
        stop_serving(self.server)
        self._thread.join()

    def __enter__(self) -> HostilePeer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class HostileMcpServer(HostilePeer):
    """An MCP server at <origin>/mcp whose 401 challenge and protected-resource metadata are
    the test's to choose."""

    def __init__(self, host: str = "127.0.0.1"):
        super().__init__(host)
        self.url = f"{self.origin}/mcp"
        self.prm_url = f"{self.origin}/.well-known/oauth-protected-resource/mcp"
        self.challenge(f'Bearer resource_metadata="{self.prm_url}"')

    def challenge(self, www_authenticate: str) -> None:
        self.route(
            "POST", "/mcp", {"error": "unauthorized"}, 401, {"WWW-Authenticate": www_authenticate}
        )

    def metadata(
        self,
        authorization_servers: list[str],
        resource: str | None = None,
        path: str = "/.well-known/oauth-protected-resource/mcp",
        **extra,
    ) -> None:
        self.route(
            "GET",
            path,
            {
                "resource": self.url if resource is None else resource,
                "authorization_servers": authorization_servers,
                **extra,
            },
        )


class RecordingAuthorizationServer(HostilePeer):
    """An authorization server that publishes RFC 8414 metadata (issuer = its own origin
    unless told otherwise) and records whatever reaches it. Its token endpoint answers
    `token_response` (by default an error, so nothing it says can be mistaken for a token)."""

    def __init__(self, host: str = "127.0.0.2"):
        super().__init__(host)
        self.issuer = self.origin
        self.publish()
        self.token_response({"error": "invalid_client"}, 401)

    def publish(self, **overrides) -> None:
        doc = {
            "issuer": self.issuer,
            "token_endpoint": f"{self.origin}/token",
            "registration_endpoint": f"{self.origin}/register",
            "jwks_uri": f"{self.origin}/jwks",
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "response_types_supported": ["code"],
        }
        doc.update(overrides)
        self.route("GET", "/.well-known/oauth-authorization-server", doc)

    def token_response(self, body: object, status: int = 200) -> None:
        self.route("POST", "/token", body, status)

    def credentials_received(self) -> list[Seen]:
        """Requests that carried anything of the agent's: an assertion, a software statement,
        an Authorization or DPoP header."""
        return [s for s in self.received() if s.carries_credential]


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class LoopbackOnlyTransport(httpx.AsyncBaseTransport):
    """httpx transport for the agent's OAuth client in tests: requests to a loopback host go
    out; any other destination is never dialled, only recorded in `refused` (and the request
    fails as a connection error would). Lets a test name a non-loopback endpoint and show the
    agent never tried it, while keeping the rule that tests only ever talk to loopback."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.refused: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not _loopback(request.url.host):
            self.refused.append(f"{request.method} {request.url}")
            raise httpx.ConnectError(
                "test guard: not a loopback destination, not dialled", request=request
            )
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        # the agent's client closes its transport when it stops; a restarted agent in the
        # same test gets the same guard (and its record), with fresh connections
        inner, self.inner = self.inner, httpx.AsyncHTTPTransport()
        await inner.aclose()
