"""The policy's body limit, end to end on the real kernel: a JSON-RPC body larger than
policy.max_body_bytes is refused with 413 and reaches no upstream, whatever its framing.

Policy reads a POST body whole before deciding on it; without a limit a workload could make
the agent hold any amount of memory per connection. The world is test_proxy_decisions': a
broker-mode echo upstream behind a real token from oidc-provider, and a real workload
process in a managed cgroup writing raw requests on its socket.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import audit_events
from tests.integration.test_proxy_decisions import CLIENT, SID, post
from tests.kernel import start_python
from tests.upstreams.echo import Upstream
from tests.world import build_world, server_table, table

pytestmark = pytest.mark.kernel

LIMIT = 1024


def echo_call(size: int) -> str:
    """A tools/call of exactly `size` bytes."""
    empty = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "text": ""}}
    )
    body = empty.replace('"text": ""', '"text": "' + "x" * (size - len(empty)) + '"')
    assert len(body) == size
    return body


def chunked(port: int, body: str, pieces: int = 4) -> str:
    """A POST whose body comes in `pieces` chunks, each under the limit on its own."""
    step = -(-len(body) // pieces)
    chunks = "".join(
        f"{len(body[i : i + step]):x}\r\n{body[i : i + step]}\r\n"
        for i in range(0, len(body), step)
    )
    return (
        f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: chunked\r\n\r\n{chunks}0\r\n\r\n"
    )


def test_a_body_over_the_policy_limit_is_refused_and_reaches_no_upstream(tmp_path, upstream):
    with build_world(tmp_path, SID) as w:
        up = f"http://127.0.0.1:{upstream}/mcp"
        oidc = w.authorization_server([up], dpop=False)
        w.start_agent(
            server_table("up", up, issuer=oidc.issuer, dpop="never"),
            policy=table("[[rule]]", id="all", spiffe_id=SID, server="up", methods=["*"]),
            policy_settings=f"max_body_bytes = {LIMIT}\n",
        )
        client = w.enter(start_python(CLIENT, upstream, cgroup=w.cg))
        w.stack.callback(client.kill)

        def send(request: str) -> str:
            client.stdin.write(json.dumps(request) + "\n")
            client.stdin.flush()
            return json.loads(client.stdout.readline())

        at_limit, over = echo_call(LIMIT), echo_call(LIMIT + 1)
        assert send(post(upstream, at_limit)).startswith("HTTP/1.1 200")
        answer = send(chunked(upstream, over))
        head, _, body = answer.partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 413"), answer[:300]
        assert "Connection: close" in head
        assert f"request body larger than {LIMIT} bytes" in json.loads(body)["error"]["message"]
        assert [s["body"] for s in Upstream.seen] == [at_limit]
        denied = audit_events(w.agent.stdout_path, "request.denied")
        assert [
            (d["spiffe_id"], d["status"]) for d in denied if d["event"] == "request.denied"
        ] == [(SID, 413)]
