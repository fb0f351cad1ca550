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
import subprocess
import sys
import time

import pytest

from tests.helpers import AgentProcess, audit_events, free_port, write_config
from tests.integration.test_proxy_passthrough import Upstream, upstream  # noqa: F401
from tests.kernel import cgroup_child, enter_cgroup
from tests.oidc.peer import OidcProvider

pytestmark = pytest.mark.kernel

SID = "spiffe://example.org/test/waiter"

# Sends request 1, then (in a read of its own) request 2, says so, and reads both answers.
CLIENT = r"""
import json, socket, sys, time
port = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", port), timeout=30)
def request(n, close=False):
    body = json.dumps({"n": n}).encode()
    return (b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (port, len(body),
            b"Connection: close\r\n" if close else b"", body))
s.sendall(request(1))
time.sleep(0.3)
s.sendall(request(2, close=True))
print("sent", flush=True)
data = b""
while chunk := s.recv(65536):
    data += chunk
print(json.dumps(data.decode("latin-1")))
"""


def test_a_request_pipelined_while_a_token_is_awaited_waits_its_turn(tmp_path, upstream):
    bundle_port = free_port()
    resources = {f"http://127.0.0.1:{upstream}/mcp": {"format": "jwt", "scope": "tools"}}
    with (
        cgroup_child() as cg,
        OidcProvider(
            tmp_path,
            resources=resources,
            dpop=False,
            clients=[{"client_id": SID, "jwks_uri": f"http://127.0.0.1:{bundle_port}/jwks.json"}],
        ) as oidc,
    ):
        (tmp_path / "entries.toml").write_text(
            f'[[entry]]\nid = "waiter"\nspiffe_id = "{SID}"\n'
            f'selectors = ["cgroup:path:/{cg.name}"]\n'
        )
        port = free_port()
        cfg = write_config(
            tmp_path,
            bundle_port=bundle_port,
            extra=(
                f"[inject]\nlisten_port = {port}\nlisten_port6 = {port}\n"
                f'managed_cgroups = ["/{cg.name}"]\n'
                f'[[servers]]\nname = "up"\nurl = "http://127.0.0.1:{upstream}/mcp"\n'
                f'issuer = "{oidc.issuer}"\ndpop = "never"\n'
            ),
        )
        with AgentProcess(cfg, tmp_path) as agent:
            agent.wait_ready()
            os.kill(oidc.proc.pid, signal.SIGSTOP)  # the token request hangs
            stopped = True
            client = subprocess.Popen(
                [sys.executable, "-c", CLIENT, str(upstream)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=enter_cgroup(cg),
            )
            try:
                assert client.stdout.readline().strip() == "sent"
                time.sleep(0.5)
                # both requests are with the proxy; neither may have gone out without a token
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
            injected = [
                e for e in audit_events(agent.stdout_path) if e["event"] == "request.injected"
            ]
            assert len(injected) == 2 and all(e["spiffe_id"] == SID for e in injected)
