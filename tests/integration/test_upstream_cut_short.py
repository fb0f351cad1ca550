"""An answer the MCP server cuts short reaches the workload cut short, never looking whole,
and the request is on the audit record as failed.

The server below answers a credentialed request with a chunked body and closes two bytes
into its chunk. The proxy re-chunks what it relays; it used to render the empty body piece
llhttp gives at that EOF as chunk(b""), which is the last-chunk: the workload read a
complete, well-framed answer that the server never finished (a JSON-RPC result or an SSE
stream cut mid-event passed as done). Real kernel, real agent and oidc-provider; the
workload reads what it got on a raw socket and parses it with h11.
"""

from __future__ import annotations

import base64
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import h11
import pytest

from tests.helpers import audit_events, serving
from tests.kernel import run_python
from tests.world import build_world, server_table

pytestmark = pytest.mark.kernel
SPIFFE_ID = "spiffe://example.org/agent/cut-short"

# one tools/list POST on a raw socket; prints what came back (base64) once the proxy closes
WORKLOAD = r"""
import base64, json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
body = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
s = socket.create_connection((host, port), timeout=30)
s.sendall(b"POST /mcp HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
          b"Accept: application/json, text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
          % (host.encode(), port, len(body), body))
got = b""
while chunk := s.recv(65536):
    got += chunk
print(json.dumps({"got": base64.b64encode(got).decode()}))
"""


class CutShort(BaseHTTPRequestHandler):
    """401 with its protected-resource metadata until a credential comes; then a chunked
    answer cut two bytes into its first chunk, and the connection closed."""

    protocol_version = "HTTP/1.1"
    issuer = ""

    def do_GET(self) -> None:  # the RFC 9728 metadata
        origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        doc = json.dumps({"resource": f"{origin}/mcp", "authorization_servers": [self.issuer]})
        self._send(200, doc.encode(), {"Content-Type": "application/json"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.headers.get("Authorization"):
            origin = f"http://127.0.0.1:{self.server.server_address[1]}"
            prm = f"{origin}/.well-known/oauth-protected-resource/mcp"
            self._send(401, b"{}", {"WWW-Authenticate": f'Bearer resource_metadata="{prm}"'})
            return
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"js'
        )
        self.wfile.flush()
        self.close_connection = True

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_chunked_answer_the_server_cuts_short_is_cut_short_for_the_workload(tmp_path):
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), CutShort), "cut-short") as server:
        port = server.server_address[1]
        url = f"http://127.0.0.1:{port}/mcp"
        with build_world(tmp_path, SPIFFE_ID) as w:
            oidc = w.authorization_server([url])
            CutShort.issuer = oidc.issuer
            w.start_agent(server_table("cut", url))
            out = json.loads(run_python(WORKLOAD, "127.0.0.1", port, cgroup=w.cg))
            # the credentialed request reached the server: it is on the record, as failed
            events = audit_events(w.agent.stdout_path, "request.failed")
    done = [e for e in events if e["event"].startswith("request.")]
    assert [(e["event"], e["status"]) for e in done] == [("request.failed", 200)], done
    assert "cut short" in done[0]["reason"] and done[0]["spiffe_id"] == SPIFFE_ID
    assert done[0]["token_sha256"] == next(
        e["token_sha256"] for e in events if e["event"] == "token.obtained"
    )
    got = base64.b64decode(out["got"])
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]
    # the workload's own HTTP parser: the answer must not end
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(method="POST", target="/mcp", headers=[("Host", "x"), ("Content-Length", "0")])
    )
    conn.send(h11.EndOfMessage())
    conn.receive_data(got)
    conn.receive_data(b"")
    events = []
    with pytest.raises(h11.RemoteProtocolError):
        while (ev := conn.next_event()) is not h11.NEED_DATA:
            events.append(ev)
            if isinstance(ev, h11.EndOfMessage):
                break
    assert not any(isinstance(e, h11.EndOfMessage) for e in events), got
