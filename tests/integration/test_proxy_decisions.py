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
import subprocess
import sys

import pytest

from tests.helpers import AgentProcess, audit_events, free_port, wait_for, write_config
from tests.integration.test_proxy_passthrough import Upstream, upstream  # noqa: F401
from tests.kernel import cgroup_child, enter_cgroup
from tests.oidc.peer import OidcProvider

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
def world(tmp_path, up_port: int, entry: bool = True, inject: str = "", policy: str = ""):
    bundle_port, port = free_port(), free_port()
    resources = {f"http://127.0.0.1:{up_port}/mcp": {"format": "jwt", "scope": "tools"}}
    with (
        cgroup_child() as cg,
        OidcProvider(
            tmp_path,
            resources=resources,
            dpop=False,
            clients=[{"client_id": SID, "jwks_uri": f"http://127.0.0.1:{bundle_port}/jwks.json"}],
        ) as oidc,
    ):
        entries = tmp_path / "entries.toml"
        entries.write_text(
            f'[[entry]]\nid = "decided"\nspiffe_id = "{SID}"\n'
            f'selectors = ["cgroup:path:/{cg.name}"]\n'
            if entry
            else ""
        )
        policy_section = ""
        if policy:
            (tmp_path / "policy.toml").write_text(policy)
            policy_section = f'[policy]\nfile = "{tmp_path / "policy.toml"}"\n'
        cfg = write_config(
            tmp_path,
            bundle_port=bundle_port,
            extra=(
                f"[inject]\nlisten_port = {port}\nlisten_port6 = {port}\n"
                f'managed_cgroups = ["/{cg.name}"]\n{inject}\n{policy_section}'
                f'[[servers]]\nname = "up"\nurl = "http://127.0.0.1:{up_port}/mcp"\n'
                f'issuer = "{oidc.issuer}"\ndpop = "never"\n'
            ),
        )
        with AgentProcess(cfg, tmp_path) as agent:
            agent.wait_ready()
            client = subprocess.Popen(
                [sys.executable, "-c", CLIENT, str(up_port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=enter_cgroup(cg),
            )
            try:

                def send(request: str) -> str:
                    client.stdin.write(json.dumps(request) + "\n")
                    client.stdin.flush()
                    return json.loads(client.stdout.readline())

                yield type("World", (), dict(agent=agent, send=send, entries=entries))
            finally:
                client.kill()
                client.wait()


def test_removing_the_entry_revokes_the_identity_on_a_live_connection(tmp_path, upstream):
    with world(tmp_path, upstream) as w:
        assert w.send(post(upstream)).startswith("HTTP/1.1 200")
        w.entries.write_text("")  # the operator removes the entry
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
        denied = [e for e in audit_events(w.agent.stdout_path) if e["event"] == "request.denied"]
        assert len(denied) == 1 and denied[0]["spiffe_id"] == SID
        assert "registration entries changed" in denied[0]["reason"]


def test_an_unattested_process_is_passed_through_as_sent_when_configured(tmp_path, upstream):
    with world(tmp_path, upstream, entry=False, inject='unattested = "passthrough"') as w:
        answer = w.send(post(upstream, '{"n": 1}', "Authorization: Bearer its-own"))
        assert answer.startswith("HTTP/1.1 200") and '{"echo": {"n": 1}}' in answer
        assert [s["auth"] for s in Upstream.seen] == ["Bearer its-own"]  # nothing added
        events = [e["event"] for e in audit_events(w.agent.stdout_path)]
        assert "request.forwarded" in events and "request.injected" not in events


def test_an_unattested_process_is_refused_by_default(tmp_path, upstream):
    with world(tmp_path, upstream, entry=False) as w:
        assert w.send(post(upstream)).startswith("HTTP/1.1 403")
        assert Upstream.seen == []


def test_reject_mode_refuses_a_workload_that_sends_its_own_credentials(tmp_path, upstream):
    with world(tmp_path, upstream, inject='workload_authorization = "reject"') as w:
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
    with world(tmp_path, upstream, policy=policy) as w:
        answer = w.send(f"DELETE /mcp HTTP/1.1\r\nHost: 127.0.0.1:{upstream}\r\n\r\n")
        assert answer.startswith("HTTP/1.1 403") and "DELETE denied by policy" in answer
        assert Upstream.seen == []
        denied = [e for e in audit_events(w.agent.stdout_path) if e["event"] == "request.denied"]
        assert [d["method"] for d in denied] == ["DELETE"]
