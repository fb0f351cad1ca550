"""The proxy's decisions that depend on the caller and the settings, on the real kernel:
revocation of a live connection's identity, unattested processes, a workload's own
credentials in reject mode, and policy over requests that carry no JSON-RPC body.

A broker-mode server (the passthrough tests' echo upstream, which records what it received)
behind a real token from oidc-provider; the workload is a real process in a managed cgroup
writing raw requests on its socket.
"""

from __future__ import annotations

import contextlib
import json
import signal

import pytest

from tests.helpers import audit_events, wait_for
from tests.kernel import run_python, start_python
from tests.upstreams.echo import Upstream
from tests.world import build_world, entry_table, server_table

pytestmark = pytest.mark.kernel

SID = "spiffe://example.org/test/decided"

# Sends each request given on stdin (one JSON string a line) on one connection and prints
# what came back for it as a JSON string ("" once the proxy has closed the connection).
CLIENT = r"""
import json, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
for line in sys.stdin:
    s.sendall(json.loads(line).encode("latin-1"))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    if data:   # the rest of the answer, by its Content-Length
        head, _, body = data.partition(b"\r\n\r\n")
        length = [int(v) for k, v in (ln.split(b":", 1) for ln in head.split(b"\r\n")[1:])
                  if k.lower() == b"content-length"]
        while length and len(body) < length[0]:
            body += s.recv(65536)
        data = head + b"\r\n\r\n" + body
    print(json.dumps(data.decode("latin-1")), flush=True)
"""


def post(port: int, body: str = '{"n": 1}', *fields: str) -> str:
    extra = "".join(f"{f}\r\n" for f in fields)
    return (
        f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json"
        f"\r\n{extra}Content-Length: {len(body)}\r\n\r\n{body}"
    )


@contextlib.contextmanager
def decided_world(
    tmp_path, up_port: int, entry: bool = True, policy=None, uid: int | None = None, **inject
):
    """The agent in broker mode for the upstream at up_port (Bearer tokens from
    oidc-provider), SID's entry for its cgroup (and uid, if given) unless `entry` is false;
    yields send(), one request on the workload's connection and its answer."""
    with build_world(tmp_path, SID) as w:
        up = f"http://127.0.0.1:{up_port}/mcp"
        oidc = w.authorization_server([up], dpop=False)
        selectors = [w.selector] + ([f"unix:uid:{uid}"] if uid is not None else [])
        w.start_agent(
            server_table("up", up, issuer=oidc.issuer, dpop="never"),
            entries=entry_table("workload", SID, selectors) if entry else "",
            policy=policy,
            inject=inject,
        )
        client = w.enter(start_python(CLIENT, up_port, cgroup=w.cg))
        w.stack.callback(client.kill)  # before Popen's own exit: it waits for the process

        def send(request: str) -> str:
            client.stdin.write(json.dumps(request) + "\n")
            client.stdin.flush()
            return json.loads(client.stdout.readline())

        w.send = send
        yield w


def test_removing_the_entry_revokes_the_identity_on_a_live_connection(tmp_path, upstream):
    with decided_world(tmp_path, upstream) as w:
        assert w.send(post(upstream)).startswith("HTTP/1.1 200")
        w.entries_path.write_text("")  # the operator removes the entry
        w.agent.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: any(
                e.get("event") == "registration entries reloaded" for e in w.agent.log_events()
            ),
            what="entries reloaded",
        )
        # the same keep-alive connection: closed, nothing sent with the revoked identity
        assert w.send(post(upstream, '{"n": 2}')) == ""
        assert [s["body"] for s in Upstream.seen] == ['{"n": 1}']
        denied = [
            e
            for e in audit_events(w.agent.stdout_path, "request.denied")
            if e["event"] == "request.denied"
        ]
        assert len(denied) == 1 and denied[0]["spiffe_id"] == SID
        assert "registration entries changed" in denied[0]["reason"]


# A process attested at its exec (root, in the world's cgroup: SID) asks once on its first
# connection; then it becomes something SID's entry does not describe, by setuid or by
# moving to a cgroup below, and opens a second connection. Printed: both answers' status
# lines ("" when the proxy closed the connection unanswered).
BECOMES_CLIENT = r"""
import json, os, socket, sys
port, how, elsewhere = int(sys.argv[1]), sys.argv[2], sys.argv[3]
REQ = (b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
       b"Content-Length: 8\r\n\r\n{\"n\": 1}" % port)
def ask():
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(REQ)
    data = b""
    while not data.endswith(b"}}"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return data.decode().split("\r\n")[0]
first = ask()
if how == "setuid":
    os.setuid(65534)
else:
    os.mkdir(elsewhere)
    with open(os.path.join(elsewhere, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
print(json.dumps({"first": first, "second": ask()}))
"""


@pytest.mark.parametrize("how", ["setuid", "cgroup"])
def test_a_process_that_changed_since_its_exec_is_not_served_as_its_attestation(
    tmp_path, upstream, how
):
    with decided_world(tmp_path, upstream, uid=0) as w:
        elsewhere = w.cg / "elsewhere"  # below the managed cgroup: managed, no entry
        out = json.loads(run_python(BECOMES_CLIENT, upstream, how, elsewhere, cgroup=w.cg))
        assert out["first"] == "HTTP/1.1 200 OK"
        assert out["second"] == ""  # closed unanswered: not served as SID
        assert [s["auth"].split()[0] for s in Upstream.seen] == ["Bearer"]  # the first only
        denied = [
            e
            for e in audit_events(w.agent.stdout_path, "request.denied")
            if e["event"] == "request.denied"
        ]
        assert len(denied) == 1 and denied[0]["spiffe_id"] == SID
        changed = "uid 65534" if how == "setuid" else "another cgroup"
        assert changed in denied[0]["reason"], denied[0]["reason"]


def test_an_unattested_process_is_passed_through_as_sent_when_configured(tmp_path, upstream):
    with decided_world(tmp_path, upstream, entry=False, unattested="passthrough") as w:
        answer = w.send(post(upstream, '{"n": 1}', "Authorization: Bearer its-own"))
        assert answer.startswith("HTTP/1.1 200") and '{"echo": {"n": 1}}' in answer
        assert [s["auth"] for s in Upstream.seen] == ["Bearer its-own"]  # nothing added
        events = [e["event"] for e in audit_events(w.agent.stdout_path, "request.forwarded")]
        assert "request.forwarded" in events and "request.injected" not in events


def test_an_unattested_process_is_refused_by_default(tmp_path, upstream):
    with decided_world(tmp_path, upstream, entry=False) as w:
        assert w.send(post(upstream)).startswith("HTTP/1.1 403")
        assert Upstream.seen == []


def test_reject_mode_refuses_a_workload_that_sends_its_own_credentials(tmp_path, upstream):
    with decided_world(tmp_path, upstream, workload_authorization="reject") as w:
        answer = w.send(post(upstream, '{"n": 1}', "Authorization: Bearer its-own"))
        assert answer.startswith("HTTP/1.1 400") and "must not send Authorization" in answer
        assert w.send(post(upstream, '{"n": 2}')).startswith("HTTP/1.1 200")  # still open
        assert [(s["body"], s["auth"].split()[0]) for s in Upstream.seen] == [
            ('{"n": 2}', "Bearer")
        ]


def test_policy_decides_requests_without_a_body_too(tmp_path, upstream):
    policy = (
        'default_unlisted = "deny"\n[[rule]]\nid = "someone-else"\n'
        'spiffe_id = "spiffe://example.org/other"\nserver = "up"\nmethods = ["*"]\n'
    )
    with decided_world(tmp_path, upstream, policy=policy) as w:
        answer = w.send(f"DELETE /mcp HTTP/1.1\r\nHost: 127.0.0.1:{upstream}\r\n\r\n")
        assert answer.startswith("HTTP/1.1 403") and "DELETE denied by policy" in answer
        assert Upstream.seen == []
        denied = [
            e
            for e in audit_events(w.agent.stdout_path, "request.denied")
            if e["event"] == "request.denied"
        ]
        assert [d["method"] for d in denied] == ["DELETE"]


def test_a_condition_decides_requests_without_a_body_by_their_method(tmp_path, upstream):
    # a session's DELETE is refused by a conditional deny rule; its POSTs still go through
    policy = (
        'default_unlisted = "deny"\n[[rule]]\nid = "calls"\n'
        f'spiffe_id = "{SID}"\nserver = "up"\nmethods = ["*"]\n'
        '[[rule]]\nid = "keep-sessions"\n'
        f'spiffe_id = "{SID}"\nserver = "up"\nmethods = ["*"]\neffect = "deny"\n'
        'when = \'method == "http:DELETE" && spiffe.path == "/test/decided"\'\n'
    )
    with decided_world(tmp_path, upstream, policy=policy) as w:
        answer = w.send(f"DELETE /mcp HTTP/1.1\r\nHost: 127.0.0.1:{upstream}\r\n\r\n")
        assert answer.startswith("HTTP/1.1 403") and "rule 'keep-sessions'" in answer
        ping = '{"jsonrpc": "2.0", "id": 1, "method": "ping"}'
        assert w.send(post(upstream, ping)).startswith("HTTP/1.1 200")
        assert [s["body"] for s in Upstream.seen] == [ping]
