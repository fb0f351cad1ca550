"""A request that arrives while the proxy awaits a token, on the real kernel.

The first request of an identity has no cached token: the connection's coroutine awaits one
from the authorization server (oidc-provider, stopped with SIGSTOP here so the wait is long
and certain). A second request pipelined on the same connection meanwhile must wait its
turn: it may not take the fast lane ahead of the first, nor go out without a token, and the
answers must come back in order.
"""

from __future__ import annotations

import json
import os
import signal
from urllib.parse import urlsplit

import pytest

from tests.helpers import audit_events, tcp_unread, wait_for
from tests.kernel import start_python
from tests.upstreams.echo import Upstream
from tests.world import build_world, server_table

pytestmark = pytest.mark.kernel

SID = "spiffe://example.org/test/waiter"

# Sends request 1, says so; on a line from the test sends request 2 (so in a read of its
# own), says so, and reads both answers.
CLIENT = r"""
import json, socket, sys
port = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", port), timeout=30)
def request(n, close=False):
    body = json.dumps({"n": n}).encode()
    return (b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (port, len(body),
            b"Connection: close\r\n" if close else b"", body))
s.sendall(request(1))
print("sent 1", flush=True)
sys.stdin.readline()
s.sendall(request(2, close=True))
print("sent 2", flush=True)
data = b""
while chunk := s.recv(65536):
    data += chunk
print(json.dumps(data.decode("latin-1")))
"""


def test_a_request_pipelined_while_a_token_is_awaited_waits_its_turn(tmp_path, upstream):
    up = f"http://127.0.0.1:{upstream}/mcp"
    with build_world(tmp_path, SID) as w:
        oidc = w.authorization_server([up], dpop=False, own_process=True)  # SIGSTOP
        agent = w.start_agent(server_table("up", up, issuer=oidc.issuer, dpop="never"))
        # the agent reads the AS's metadata at start (agent/oauth/audiences.py): once read,
        # what the stopped AS holds unread below is request 1's call, not that read
        wait_for(
            lambda: any(
                e.get("event") == "authorization server metadata read" for e in agent.log_events()
            ),
            what="the agent's read of the authorization server's metadata",
        )
        os.kill(oidc.proc.pid, signal.SIGSTOP)  # the token request hangs
        stopped = True
        client = start_python(CLIENT, upstream, cgroup=w.cg)
        try:
            assert client.stdout.readline().strip() == "sent 1"
            wait_for(
                lambda: tcp_unread(urlsplit(oidc.issuer).port),
                what="request 1's call to the authorization server, held there unread",
            )
            client.stdin.write("go\n")
            client.stdin.flush()
            assert client.stdout.readline().strip() == "sent 2"
            # both requests are with the proxy; neither may have gone out without a token
            # (one sent early would show below too: out of order, or without the token)
            assert Upstream.seen == []
            os.kill(oidc.proc.pid, signal.SIGCONT)
            stopped = False
            out, err = client.communicate(timeout=60)
        finally:
            if stopped:
                os.kill(oidc.proc.pid, signal.SIGCONT)
            if client.poll() is None:
                client.kill()
                client.wait()
        assert client.returncode == 0, err[-2000:]
        answers = json.loads(out)
        assert answers.count("HTTP/1.1 200") == 2
        assert answers.index('{"echo": {"n": 1}}') < answers.index('{"echo": {"n": 2}}')
        assert [s["body"] for s in Upstream.seen] == ['{"n": 1}', '{"n": 2}']
        tokens = {s["auth"] for s in Upstream.seen}
        assert len(tokens) == 1 and tokens.pop().startswith("Bearer ey")  # the AS's JWT
        events = audit_events(
            agent.stdout_path, lambda evs: [e["event"] for e in evs].count("request.injected") >= 2
        )
        injected = [e for e in events if e["event"] == "request.injected"]
        assert len(injected) == 2 and all(e["spiffe_id"] == SID for e in injected)
